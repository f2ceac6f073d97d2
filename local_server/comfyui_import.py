"""ComfyUI's model code, imported from an installation the user names (`--comfyui DIR`).

Only its `comfy` package and `folder_paths` are imported: no server, no prompt queue, no custom nodes.
ComfyUI parses `sys.argv` when `comfy.cli_args` is imported unless `comfy.options.args_parsing` is off
(it is off by default in recent versions; older ones had no switch): both guards are applied, so our
command line never reaches its parser. Its device choice is set before `comfy.model_management` is
imported (that module picks the device at import): `--cpu` when we run on the CPU.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

log = logging.getLogger("remote_vae.server")

COMFYUI_ENV = "REMOTE_VAE_COMFYUI_DIR"


class ComfyUIError(ValueError):
    """The named directory is not a usable ComfyUI installation; the message says why."""


@dataclass(frozen=True)
class ComfyUI:
    """The imported modules of one ComfyUI installation."""

    directory: Path
    version: str
    sd: ModuleType  # comfy.sd: VAE
    utils: ModuleType  # comfy.utils: load_torch_file
    model_management: ModuleType
    folder_paths: ModuleType

    def describe(self) -> str:
        return f"ComfyUI {self.version} at {self.directory}"


_lock = threading.Lock()
_imported: ComfyUI | None = None


def import_comfyui(directory: str | Path, *, cpu: bool) -> ComfyUI:
    """ComfyUI's modules from `directory` (imported once per process; `cpu`: its --cpu, for CPU-only hosts)."""
    global _imported
    root = Path(directory).expanduser().resolve()
    with _lock:
        if _imported is not None:
            if _imported.directory != root:
                raise ComfyUIError(f"--comfyui {directory}: this process already uses {_imported.describe()}")
            return _imported
        _check_tree(root, directory)
        _check_not_shadowed(root)
        if (
            str(root) not in sys.path
        ):  # ComfyUI's own imports are absolute (`import comfy.utils`, `folder_paths`)
            sys.path.insert(0, str(root))
        with _quiet_argv():
            _imported = _import(root, cpu)
        log.info("using %s", _imported.describe())
        return _imported


def _check_tree(root: Path, given: str | Path) -> None:
    missing = [
        name
        for name in ("comfy/sd.py", "comfy/cli_args.py", "folder_paths.py")
        if not (root / name).is_file()
    ]
    if missing:
        raise ComfyUIError(
            f"--comfyui {given}: not a ComfyUI installation ({', '.join(missing)} missing); "
            f"name the folder that holds ComfyUI's main.py"
        )


def _check_not_shadowed(root: Path) -> None:
    """A `comfy` package imported from elsewhere would be used instead of the one named."""
    module = sys.modules.get("comfy")
    if module is None:
        return
    where = [Path(p).parent for p in getattr(module, "__path__", [])]  # a namespace package: no __file__
    if root not in where:
        shown = ", ".join(map(str, where)) or "an unknown place"
        raise ComfyUIError(f"--comfyui {root}: this process already imported ComfyUI from {shown}")


@contextlib.contextmanager
def _quiet_argv() -> Iterator[None]:
    """ComfyUI versions without `comfy.options` parse sys.argv at import: show them no arguments."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


def _import(root: Path, cpu: bool) -> ComfyUI:
    with contextlib.suppress(ImportError):  # versions before the switch have no comfy.options
        importlib.import_module("comfy.options").args_parsing = False
    cli_args = importlib.import_module("comfy.cli_args")
    if cpu:
        cli_args.args.cpu = True  # before model_management is imported: it picks the device at import
    try:
        sd = importlib.import_module("comfy.sd")
    except Exception as exc:
        raise ComfyUIError(
            f"--comfyui {root}: importing ComfyUI's comfy.sd failed: {type(exc).__name__}: {exc}"
        ) from exc
    return ComfyUI(
        directory=root,
        version=_version(root),
        sd=sd,
        utils=importlib.import_module("comfy.utils"),
        model_management=importlib.import_module("comfy.model_management"),
        folder_paths=importlib.import_module("folder_paths"),
    )


def _version(root: Path) -> str:
    """comfyui_version.py's __version__ (read, not imported), or "unknown"."""
    path = root / "comfyui_version.py"
    found = (
        re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", path.read_text(encoding="utf-8"))
        if path.is_file()
        else None
    )
    return found[1] if found else "unknown"
