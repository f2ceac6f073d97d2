"""ComfyUI's runtime services, looked up lazily and guarded.

Inside ComfyUI these give the progress bar, the Cancel flag and the websocket; outside it (unit tests,
scripts) every function here degrades to a harmless no-op, so the nodes run anywhere.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from ..remote.tokens import TokenStore

log = logging.getLogger("remote_vae")


_MISSING: set[str] = set()  # outside ComfyUI: not searched for again on every call (~0.2 ms each)


def _module(name: str) -> ModuleType | None:
    module = sys.modules.get(name)  # inside ComfyUI, or put there since it was missing
    if module is not None or name in _MISSING:
        return module
    try:
        return importlib.import_module(name)
    except ImportError:
        _MISSING.add(name)
        return None


def interrupted() -> bool:
    """True once the user pressed Cancel in ComfyUI (never true outside ComfyUI)."""
    mm = _module("comfy.model_management")
    check = getattr(mm, "processing_interrupted", None)
    return bool(check()) if check else False


def raise_interrupt() -> None:
    """Raise ComfyUI's own interrupt exception if Cancel was pressed, so the run ends as 'interrupted'."""
    mm = _module("comfy.model_management")
    throw = getattr(mm, "throw_exception_if_processing_interrupted", None)
    if throw:
        throw()


class _NoProgress:
    def update(self, value: int) -> None:
        pass


def progress_bar(total: int, node_id: str | None) -> Any:
    """ComfyUI's ProgressBar for this node, or a stand-in with the same `update(n)`."""
    utils = _module("comfy.utils")
    bar = getattr(utils, "ProgressBar", None)
    return bar(total, node_id=node_id) if bar else _NoProgress()


def executing_node() -> str | None:
    """The id of the node ComfyUI is running now (e.g. a core node calling a Remote VAE Loader's VAE)."""
    get = getattr(_module("comfy_execution.utils"), "get_executing_context", None)
    return getattr(get() if get else None, "node_id", None)


def tokens_file() -> Path | None:
    """Where the settings entry keeps server tokens: `<ComfyUI user directory>/remote_vae/tokens.json`,
    beside (not inside) the per-user folders ComfyUI serves back to the browser; None outside ComfyUI."""
    get = getattr(_module("folder_paths"), "get_user_directory", None)
    return Path(get()) / "remote_vae" / "tokens.json" if get else None


def local_tokens() -> TokenStore:
    """The tokens this machine binds to servers: the settings file, then REMOTE_VAE_TOKENS."""
    return TokenStore.load(tokens_file())


def prompt_server() -> Any | None:
    """The running PromptServer, or None outside ComfyUI."""
    server = _module("server")
    cls = getattr(server, "PromptServer", None)
    return getattr(cls, "instance", None)
