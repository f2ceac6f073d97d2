"""Another pack registering our node ids: found at load and said once."""

from __future__ import annotations

import logging
import sys
import types

import pytest

from remote_vae.nodes import NODE_CLASS_MAPPINGS, conflicts


@pytest.fixture
def comfy_nodes(monkeypatch):
    """A stand-in for ComfyUI's top-level `nodes` module, with its node table."""
    module = types.ModuleType("nodes")
    module.NODE_CLASS_MAPPINGS = {"VAEDecode": type("VAEDecode", (), {})}
    monkeypatch.setitem(sys.modules, "nodes", module)
    monkeypatch.setattr(conflicts, "FOUND", [])
    return module.NODE_CLASS_MAPPINGS


def other_pack_node(name: str) -> type:
    return type(
        name, (), {"__module__": "other_pack.nodes", "RELATIVE_PYTHON_MODULE": "custom_nodes.other-pack"}
    )


def test_an_id_another_pack_registered_first_is_reported_once(comfy_nodes, caplog):
    comfy_nodes["RemoteVAEDecode"] = other_pack_node("RemoteVAEDecode")
    caplog.set_level(logging.WARNING, logger="remote_vae")
    found = conflicts.check_comfyui_table(NODE_CLASS_MAPPINGS)
    assert found == [
        "Remote VAE: the node id RemoteVAEDecode was registered by custom_nodes.other-pack too; remote-vae loaded "
        "later and replaces it, so workflows made for custom_nodes.other-pack's RemoteVAEDecode now run "
        "remote-vae's node. Uninstall or disable one of the two packs."
    ]
    assert conflicts.check_comfyui_table(NODE_CLASS_MAPPINGS) == []  # said once
    assert conflicts.FOUND == found and caplog.text.count("was registered by custom_nodes.other-pack") == 1


def test_our_own_classes_and_free_ids_are_no_conflict(comfy_nodes):
    comfy_nodes.update(NODE_CLASS_MAPPINGS)  # our own classes (a reload)
    comfy_nodes["SomethingElse"] = other_pack_node("SomethingElse")
    assert conflicts.check_comfyui_table(NODE_CLASS_MAPPINGS) == []


def test_outside_comfyui_nothing_is_checked(monkeypatch):
    monkeypatch.setitem(
        sys.modules, "nodes", types.ModuleType("nodes")
    )  # a module named nodes, not ComfyUI's
    assert conflicts.check_comfyui_table(NODE_CLASS_MAPPINGS) == []
