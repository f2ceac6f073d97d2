"""The pack imports light (no ComfyUI, no server extra, no torch) and declares exactly the documented nodes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from remote_vae.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from remote_vae.nodes.choices import preset_choices
from remote_vae.remote.presets import PRESETS

# Run in a fresh interpreter where these cannot be imported at all: what importing the pack needs must
# not include them (ComfyUI's own modules, the server extra, and the heavy libraries the work needs).
BLOCKED = [
    "comfy", "server", "folder_paths", "nodes", "comfy_api", "torch", "requests", "numpy", "PIL",
    "diffusers", "starlette", "uvicorn", "av", "aiohttp", "safetensors",
]  # fmt: skip

IMPORT_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    BLOCKED = set(json.loads(sys.argv[1]))

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked for this test")
            return None

    sys.meta_path.insert(0, Block())
    import remote_vae

    print(json.dumps({
        "nodes": sorted(remote_vae.NODE_CLASS_MAPPINGS),
        "names": remote_vae.NODE_DISPLAY_NAME_MAPPINGS,
        "web": remote_vae.WEB_DIRECTORY,
        "categories": sorted({c.CATEGORY for c in remote_vae.NODE_CLASS_MAPPINGS.values()}),
        "returns": {k: list(c.RETURN_TYPES) for k, c in remote_vae.NODE_CLASS_MAPPINGS.items()},
        "routes_loaded": "remote_vae.nodes.routes" in sys.modules,
        "heavy": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED),
    }))
    """
)


def test_pack_imports_without_comfyui_server_extra_or_torch():
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_SCRIPT, json.dumps(BLOCKED)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["nodes"] == ["RemoteVAEDecode", "RemoteVAEEncode", "RemoteVAELoader", "RemoteVideoDecode"]
    assert seen["names"] == {
        "RemoteVAEDecode": "Remote VAE Decode",
        "RemoteVAEEncode": "Remote VAE Encode",
        "RemoteVideoDecode": "Remote Video Decode",
        "RemoteVAELoader": "Remote VAE Loader",
    }
    assert seen["web"] == "./web"
    assert seen["categories"] == ["latent/remote"]
    assert seen["returns"] == {
        "RemoteVAEDecode": ["IMAGE"],
        "RemoteVAEEncode": ["LATENT"],
        "RemoteVideoDecode": ["IMAGE"],
        "RemoteVAELoader": ["VAE"],
    }
    assert seen["routes_loaded"] is False  # no ComfyUI `server` module: the web routes are skipped
    assert seen["heavy"] == []


def _widgets(node_type: str) -> dict:
    return NODE_CLASS_MAPPINGS[node_type].INPUT_TYPES()


@pytest.mark.parametrize("node_type", ["RemoteVAEDecode", "RemoteVideoDecode"])
def test_decode_inputs(node_type):
    spec = _widgets(node_type)
    assert list(spec["required"]) == ["samples", "preset", "endpoint", "transfer", "timeout"]
    assert list(spec["optional"]) == ["vae"]  # no token input: tokens are bound to servers locally
    assert spec["hidden"] == {"unique_id": "UNIQUE_ID"}
    assert spec["required"]["samples"][0] == "LATENT"
    assert spec["required"]["endpoint"] == ("STRING", spec["required"]["endpoint"][1])
    assert spec["required"]["endpoint"][1]["default"] == ""
    timeout = spec["required"]["timeout"]
    assert timeout[0] == "INT" and timeout[1]["default"] == 300 and timeout[1]["min"] == 5
    assert spec["optional"]["vae"][0] == "VAE"
    presets, preset_options = spec["required"]["preset"]
    transfers, transfer_options = spec["required"]["transfer"]
    assert preset_options["default"] == "auto" and transfer_options["default"] == "auto"
    if node_type == "RemoteVAEDecode":
        assert presets == ["auto", *PRESETS]
        assert transfers == ["auto", "lossless", "exact", "compact"]
    else:
        assert presets == ["auto", "hunyuan_video", "wan21", "wan22"]
        assert transfers == ["auto", "lossless", "near-lossless", "exact"]


def test_encode_inputs():
    spec = _widgets("RemoteVAEEncode")
    assert list(spec["required"]) == ["pixels", "preset", "endpoint", "transfer", "timeout"]
    assert spec["required"]["pixels"][0] == "IMAGE"
    assert spec["required"]["preset"][0] == ["auto", *PRESETS]
    assert spec["required"]["transfer"][0] == ["lossless", "exact"]
    assert list(spec["optional"]) == ["vae"]
    assert spec["hidden"] == {"unique_id": "UNIQUE_ID"}


def test_loader_inputs():
    spec = _widgets("RemoteVAELoader")
    assert list(spec["required"]) == ["endpoint", "transfer", "timeout"]
    assert set(spec) == {"required"}  # no token input, no preset: the server describes its model
    assert spec["required"]["endpoint"][1]["default"] == ""
    assert spec["required"]["transfer"][0] == ["exact", "lossless"]
    assert spec["required"]["transfer"][1]["default"] == "exact"  # equal to the file loaded locally
    timeout = spec["required"]["timeout"]
    assert timeout[0] == "INT" and timeout[1]["default"] == 300 and timeout[1]["min"] == 5
    loader = NODE_CLASS_MAPPINGS["RemoteVAELoader"]
    assert loader.RETURN_TYPES == ("VAE",) and loader.CATEGORY == "latent/remote"


def test_display_names_and_functions():
    assert NODE_DISPLAY_NAME_MAPPINGS == {
        "RemoteVAEDecode": "Remote VAE Decode",
        "RemoteVAEEncode": "Remote VAE Encode",
        "RemoteVideoDecode": "Remote Video Decode",
        "RemoteVAELoader": "Remote VAE Loader",
    }
    for cls in NODE_CLASS_MAPPINGS.values():
        assert callable(getattr(cls(), cls.FUNCTION))
        assert not hasattr(cls, "IS_CHANGED")  # same inputs, same outputs: ComfyUI may cache


def test_video_preset_choices_exclude_image_models():
    assert "qwen_image" in preset_choices() and "qwen_image" not in preset_choices(video_only=True)
