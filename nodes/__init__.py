"""ComfyUI glue for remote-vae: the node classes and what they run.

Importing this package stays light (no torch, no requests); the work modules load when a node runs.
"""

from .vae_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
