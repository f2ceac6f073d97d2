"""Processes the tests start: our VAE server as `python -m remote_vae.local_server`, stopping one, and
the peak memory of one."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import requests

from .net import free_port

STARTUP_SECONDS = 180  # importing torch and diffusers on a busy 2-core machine
COMFYUI_ENV = (
    "REMOTE_VAE_COMFYUI_DIR"  # names the tests' ComfyUI tree, and makes a server use ComfyUI's VAE code
)


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a server process, without the ComfyUI directory unless `extra` sets
    it: a server started without --comfyui serves the diffusers backend, whatever the tests' environment."""
    env = {k: v for k, v in os.environ.items() if k != COMFYUI_ENV}
    return {**env, **(extra or {})}


@contextlib.contextmanager
def running_server(
    args: list[str], env: dict[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start `python -m remote_vae.local_server ARGS` and wait until /health answers."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "remote_vae.local_server",
        "--port",
        str(port),
        "--log-level",
        "warning",
        *args,
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=server_env(env)
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            assert process.poll() is None, f"server exited early: {process.communicate()[0]}"
            assert time.monotonic() < deadline, "server did not answer /health in time"
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(url + "/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.2)
        yield url, process
    finally:
        stop(process, grace=30)


def stop(process: subprocess.Popen, grace: float) -> None:
    """Terminate `process`; kill it if it has not exited `grace` seconds later."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=grace)


def reset_peak_rss(pid: int) -> Callable[[], int]:
    """Resets process `pid`'s peak resident memory to its current one (Linux: /proc/PID/clear_refs) and
    returns a function that reads the peak since then, in bytes (the kernel's high-water mark, VmHWM)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    status = Path(f"/proc/{pid}/status")
    return lambda: next(
        int(line.split()[1]) * 1024 for line in status.read_text().splitlines() if line.startswith("VmHWM:")
    )
