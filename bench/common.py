"""What every benchmark needs: a server subprocess it owns, CPU time and peak memory of processes, statistics."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def default_threads() -> int:
    """Torch threads for compute on both sides: the cores there are, at most 2 (this box has 2)."""
    return max(1, min(2, os.cpu_count() or 1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m bench.serve` in a subprocess; `with Server(...) as server:` waits until /health answers.

    models: "NAME=PRESET:MODEL" specs (see bench/serve.py). `prefix` runs it under another command
    (`ip netns exec NS`), `host` is the address it listens on and clients use.
    """

    def __init__(  # noqa: PLR0913 - keyword-only options, like subprocess.Popen's
        self,
        models: Sequence[str],
        *,
        threads: int,
        dtype: str = "float32",
        device: str = "cpu",
        batching: str = "auto",
        host: str = "127.0.0.1",
        prefix: Sequence[str] = (),
        start_timeout: float = 600.0,
    ) -> None:
        self.host, self.port = host, free_port()
        self.url = f"http://{host}:{self.port}"
        cmd = [*prefix, sys.executable, "-m", "bench.serve", "--host", host, "--port", str(self.port)]
        cmd += ["--threads", str(threads), "--dtype", dtype, "--device", device, "--batching", batching]
        for spec in models:
            cmd += ["--model", spec]
        self.cmd = cmd
        self.start_timeout = start_timeout
        # Open for the server's lifetime (closed in __exit__), so not a `with` block.
        self.log = tempfile.NamedTemporaryFile(prefix="bench-server-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bench server exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                if requests.get(self.url + "/health", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.__exit__(None, None, None)
        raise RuntimeError(
            f"bench server did not answer /health within {self.start_timeout:.0f} s:\n{self.log_text()}"
        )

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)

    def peak_rss_mib(self) -> float:
        return peak_rss_mib(self.pid)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads (Linux /proc; 1/CLK_TCK resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def peak_rss_mib(pid: int) -> float:
    """A live process's peak resident set (VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def metrics(url: str) -> dict[str, float] | None:
    """The server's /metrics samples by full name (labels included), or None when it has no /metrics."""
    try:
        response = requests.get(url + "/metrics", timeout=5)
    except requests.RequestException:
        return None
    if response.status_code != 200:
        return None
    samples = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def metric_total(samples: dict[str, float] | None, prefix: str) -> float:
    """Sum of the samples whose name (with labels) starts with `prefix`; 0 without /metrics."""
    return sum(v for k, v in (samples or {}).items() if k.startswith(prefix))


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): an observed value, no interpolation."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def mib(n_bytes: float) -> float:
    return n_bytes / (1 << 20)


# Issue 12's natural content: 4 photographs of 1024x1024 and one 81x480x832 clip (Wan 2.1's shapes);
# a --quick smoke run sends 2 of 256x256 and 17x128x208.
PHOTOS, QUICK_PHOTOS = (4, 1024, 1024), (2, 256, 256)
CLIP, QUICK_CLIP = (81, 480, 832), (17, 128, 208)
QUICK_NATURAL_HELP = "smoke run: 2 images of 256x256, 17 frames of 128x208, 1 run"


def natural_shapes(quick: bool) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(count, height, width) of the photographs and (frames, height, width) of the clip."""
    return (QUICK_PHOTOS, QUICK_CLIP) if quick else (PHOTOS, CLIP)


def record_as_module(module: str) -> None:
    """Make `results.record` write the command as it is typed: `python -m bench.NAME ...`, not a file path."""
    sys.argv[:1] = ["-m", module]


def revision() -> str:
    """The code measured: the commit, and whether files outside bench/ had uncommitted changes."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
    dirty = [
        line
        for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
        if " bench/" not in line
    ]
    return f"code at {commit}" + (" with uncommitted changes" if dirty else "")
