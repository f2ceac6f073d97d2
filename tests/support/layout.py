"""Node boxes on the ComfyUI canvas, for the layout checks of the example workflows (offline and in the browser)."""

from __future__ import annotations

import itertools

from remote_vae.nodes import NODE_CLASS_MAPPINGS

Box = tuple[float, float, float, float]  # left, top, right, bottom in canvas units

TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT: the title bar is drawn above `pos`
# The frontend grows a node with our panel (web/remote_vae.js) to at least this height; the browser test
# checks that every example node is drawn at its saved size, so saved boxes are what the canvas shows.
PANEL_NODE_MIN_HEIGHT = 220
PANEL_INPUTS = {"preset", "endpoint", "transfer", "timeout"}  # web/remote_vae.js: SIGNATURE


def has_panel(node_type: str) -> bool:
    """Our web extension adds its panel to nodes with all of our inputs."""
    node_class = NODE_CLASS_MAPPINGS.get(node_type)
    return node_class is not None and PANEL_INPUTS <= set(node_class.INPUT_TYPES()["required"])


def saved_box(node: dict) -> Box:
    """A saved (UI-format) node's box as drawn: the title bar above `pos`, our panel's minimum height."""
    (x, y), (width, height) = node["pos"], node["size"]
    if has_panel(node["type"]):
        height = max(height, PANEL_NODE_MIN_HEIGHT)
    return x, y - TITLE_HEIGHT, x + width, y + height


def intersect(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def overlapping(boxes: dict[str, Box]) -> list[tuple[str, str]]:
    """The pairs of named boxes that overlap."""
    return [
        (a, b)
        for (a, box_a), (b, box_b) in itertools.combinations(boxes.items(), 2)
        if intersect(box_a, box_b)
    ]
