"""Other packs that register our node ids: ComfyUI keeps whichever pack loads last, silently.

At load we look at ComfyUI's node table before ours goes in: an id already there from another module
is one we are about to override. (The other direction, a pack loading after us, shows in the node
definitions the browser receives; the web extension reports that one.) Each is said once, in the log
and through the web extension.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping

log = logging.getLogger("remote_vae")

FOUND: list[str] = []  # messages for the web extension (GET /remote_vae/conflicts)


def overridden(existing: Mapping[str, type], ours: Mapping[str, type]) -> list[str]:
    """One message per node id of ours that another module registered first."""
    messages = []
    for node_id, cls in ours.items():
        theirs = existing.get(node_id)
        if (
            theirs is None
            or theirs is cls
            or getattr(theirs, "__module__", "").startswith(cls.__module__.split(".")[0])
        ):
            continue
        pack = getattr(theirs, "RELATIVE_PYTHON_MODULE", None) or theirs.__module__
        messages.append(
            f"Remote VAE: the node id {node_id} was registered by {pack} too; remote-vae loaded later and "
            f"replaces it, so workflows made for {pack}'s {node_id} now run remote-vae's node. "
            "Uninstall or disable one of the two packs."
        )
    return messages


def check_comfyui_table(ours: Mapping[str, type]) -> list[str]:
    """Compare with ComfyUI's node table (when running inside ComfyUI), log and keep what is found."""
    comfy_nodes = sys.modules.get("nodes")
    table = getattr(comfy_nodes, "NODE_CLASS_MAPPINGS", None)
    if not isinstance(table, dict) or "VAEDecode" not in table:  # not ComfyUI's own `nodes` module
        return []
    found = [m for m in overridden(table, ours) if m not in FOUND]
    for message in found:
        log.warning("%s", message)
    FOUND.extend(found)
    return found
