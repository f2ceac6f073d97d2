"""example_workflows/*.json: UI-format workflows (as ComfyUI's Save writes them) that load and make sense.

Checked here without a running ComfyUI: the schema, link consistency, node types (ComfyUI 0.3.75's core
list read from its source, ours, or frontend-only ones), our nodes' widget values and the layout (no two
nodes overlap, links run left to right). The integration test checks the core nodes' widget values
against a real ComfyUI's /object_info; the browser test checks the layout as the frontend draws it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from remote_vae.nodes import NODE_CLASS_MAPPINGS
from remote_vae.nodes.resolve import endpoint_url
from remote_vae.remote.presets import PRESETS
from support.comfyui_harness import core_node_types
from support.layout import has_panel, overlapping, saved_box

FOLDER = Path(__file__).resolve().parents[2] / "example_workflows"
WORKFLOWS = sorted(FOLDER.glob("*.json"))
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
NODE_KEYS = {
    "id",
    "type",
    "pos",
    "size",
    "flags",
    "order",
    "mode",
    "inputs",
    "outputs",
    "properties",
    "widgets_values",
}
OUR_WIDGETS = ["preset", "endpoint", "transfer", "timeout"]
LOADER = "RemoteVAELoader"
LOADER_WIDGETS = ["endpoint", "transfer", "timeout"]


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def ours(workflow: dict) -> list[dict]:
    """Our decode and encode nodes (those with a preset); the loader is checked on its own."""
    return [
        node for node in workflow["nodes"] if node["type"] in NODE_CLASS_MAPPINGS and node["type"] != LOADER
    ]


def test_the_promised_examples_are_there():
    assert [p.stem for p in WORKFLOWS] == [
        "flux_remote_vae_decode",
        "hunyuan_video_remote_decode",
        "img2img_remote_vae_encode_decode",
        "sd15_remote_vae_decode",
        "sdxl_remote_vae_decode",
        "self_hosted_remote_vae",
        "wan21_i2v_remote_vae_loader",
        "wan21_remote_decode",
    ]
    uses = {(node["type"], node["widgets_values"][0]) for path in WORKFLOWS for node in ours(load(path))}
    assert {
        ("RemoteVAEDecode", "sd15"),
        ("RemoteVAEDecode", "sdxl"),
        ("RemoteVAEDecode", "flux"),
        ("RemoteVAEEncode", "sd15"),
        ("RemoteVideoDecode", "hunyuan_video"),
        ("RemoteVideoDecode", "wan21"),
    } <= uses
    self_hosted = ours(load(FOLDER / "self_hosted_remote_vae.json"))
    assert [node["widgets_values"][1] for node in self_hosted] == ["http://127.0.0.1:8190/sd15"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_ui_format_schema(path):
    workflow = load(path)
    assert workflow["version"] == 0.4
    assert {"last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra"} <= set(workflow)
    ids = [node["id"] for node in workflow["nodes"]]
    assert len(ids) == len(set(ids)) and workflow["last_node_id"] >= max(ids)
    link_ids = [link[0] for link in workflow["links"]]
    assert len(link_ids) == len(set(link_ids)) and workflow["last_link_id"] >= max(link_ids)
    for node in workflow["nodes"]:
        assert NODE_KEYS <= set(node), node["id"]
        assert len(node["pos"]) == 2 and len(node["size"]) == 2
        assert node["mode"] == 0  # nothing muted or bypassed
    assert sorted(node["order"] for node in workflow["nodes"]) == list(range(len(ids)))
    notes = [node for node in workflow["nodes"] if node["type"] == "Note"]
    assert len(notes) == 1 and len(notes[0]["widgets_values"][0]) > 80  # a short explanation for the user


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_links_are_consistent_at_both_ends(path):
    workflow = load(path)
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = {}
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        output = nodes[src]["outputs"][src_slot]
        target = nodes[dst]["inputs"][dst_slot]
        assert link_id in output["links"], (path.stem, link_id)
        assert target["link"] == link_id, (path.stem, link_id)
        assert output["type"] == target["type"] == kind, (path.stem, link_id)
        links[link_id] = (src, src_slot, dst, dst_slot)
    order = {node["id"]: node["order"] for node in workflow["nodes"]}
    for node in workflow["nodes"]:
        for slot, socket in enumerate(node["inputs"]):
            if socket["link"] is not None:
                src, _, dst, dst_slot = links[socket["link"]]
                assert (dst, dst_slot) == (node["id"], slot)
                assert order[src] < order[dst]  # `order` is an execution order
            else:
                assert socket.get("shape") == 7, (
                    f"{path.stem}: required input {socket['name']} of {node['type']}"
                )
        for slot, socket in enumerate(node["outputs"]):
            for link_id in socket["links"] or []:
                assert links[link_id][:2] == (node["id"], slot)
    # every node contributes to an output: no dangling loaders
    used = {src for src, *_ in links.values()}
    outputs = {"SaveImage", "SaveAnimatedWEBP"}
    for node in workflow["nodes"]:
        assert node["id"] in used or node["type"] in outputs | FRONTEND_ONLY, (path.stem, node["type"])


def test_every_node_type_is_known():
    known = core_node_types() | set(NODE_CLASS_MAPPINGS) | FRONTEND_ONLY
    assert {"KSampler", "VAEDecode", "EmptyHunyuanLatentVideo", "FluxGuidance"} <= known  # the reader works
    for path in WORKFLOWS:
        unknown = {node["type"] for node in load(path)["nodes"]} - known
        assert not unknown, f"{path.stem}: {unknown}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_our_widget_values_are_valid_and_runnable(path):
    for node in ours(load(path)):
        spec = NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES()
        values = dict(zip(OUR_WIDGETS, node["widgets_values"]))
        assert len(node["widgets_values"]) == len(OUR_WIDGETS)
        assert values["preset"] in spec["required"]["preset"][0]
        assert values["transfer"] in spec["required"]["transfer"][0]
        timeout = spec["required"]["timeout"][1]
        assert isinstance(values["timeout"], int) and timeout["min"] <= values["timeout"] <= timeout["max"]
        assert not any(
            "TOKEN" in str(value).upper() for value in node["widgets_values"]
        )  # no secret, no variable
        # an explicit preset whose endpoint resolves: the workflow runs without editing (or says where to point)
        assert values["preset"] in PRESETS
        operation = "encode" if node["type"] == "RemoteVAEEncode" else "decode"
        assert endpoint_url(values["endpoint"], PRESETS[values["preset"]], operation).startswith(
            ("http://", "https://")
        )
        sockets = {socket["name"]: socket["type"] for socket in node["inputs"]}
        first = next(iter(spec["required"]))
        assert sockets == {first: spec["required"][first][0], "vae": "VAE"}
        assert [out["type"] for out in node["outputs"]] == list(
            NODE_CLASS_MAPPINGS[node["type"]].RETURN_TYPES
        )
        assert node["properties"]["Node name for S&R"] == node["type"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_no_two_nodes_overlap(path):
    nodes = load(path)["nodes"]
    assert has_panel("RemoteVAEDecode") and not has_panel("VAEDecode")  # the panel rule works
    boxes = {f"{node['type']} #{node['id']}": saved_box(node) for node in nodes}
    assert overlapping(boxes) == [], f"{path.stem}: these nodes overlap on the canvas"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_links_run_left_to_right(path):
    """A readable flow: every link leaves a node for one that starts right of where it ends."""
    workflow = load(path)
    nodes = {node["id"]: node for node in workflow["nodes"]}
    backwards = [
        (nodes[src]["type"], nodes[dst]["type"])
        for _, src, _, dst, _, _ in workflow["links"]
        if saved_box(nodes[src])[2] >= saved_box(nodes[dst])[0]
    ]
    assert backwards == [], f"{path.stem}: these links run right to left"


def test_the_loader_example_feeds_core_nodes_from_a_hosted_file():
    workflow = load(FOLDER / "wan21_i2v_remote_vae_loader.json")
    nodes = {node["id"]: node for node in workflow["nodes"]}
    [loader] = [node for node in nodes.values() if node["type"] == LOADER]
    spec = NODE_CLASS_MAPPINGS[LOADER].INPUT_TYPES()["required"]
    values = dict(zip(LOADER_WIDGETS, loader["widgets_values"]))
    assert len(loader["widgets_values"]) == len(LOADER_WIDGETS) and loader["inputs"] == []
    assert (
        values["endpoint"] == "http://127.0.0.1:8190/wan_2.1_vae"
    )  # ComfyUI's file name, as a --comfyui server names it
    assert values["transfer"] == "exact" and values["transfer"] in spec["transfer"][0]
    assert spec["timeout"][1]["min"] <= values["timeout"] <= spec["timeout"][1]["max"]
    assert loader["outputs"][0]["type"] == "VAE" and loader["properties"]["Node name for S&R"] == LOADER
    fed = {nodes[dst]["type"] for _, src, _, dst, _, _ in workflow["links"] if src == loader["id"]}
    assert fed == {"WanImageToVideo", "VAEDecode"}
