"""remote-vae: ComfyUI nodes that run VAE decode/encode on a remote server.

ComfyUI imports this file; it must stay light and never start a server.
"""

import importlib
import logging
import sys

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes.conflicts import check_comfyui_table

WEB_DIRECTORY = "./web"


def _comfyui_server_present() -> bool:
    """ComfyUI's `server` module (with PromptServer) is importable; the web routes need it."""
    try:
        module = sys.modules.get("server") or importlib.import_module("server")
    except Exception:  # not ComfyUI: no routes, and no reason to fail
        return False
    return hasattr(module, "PromptServer")


check_comfyui_table(NODE_CLASS_MAPPINGS)  # another pack registered our ids first: say so (nodes/conflicts.py)

if _comfyui_server_present():
    try:
        from .nodes import routes  # noqa: F401  (registers /remote_vae/* on ComfyUI's PromptServer)
    except Exception:  # the nodes must load even if the web routes cannot
        logging.getLogger("remote_vae").exception("remote-vae: web routes not registered")

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
