"""Remote VAE Loader inside a real ComfyUI 0.3.75 (headless, CPU), against our server's comfy backend.

One ComfyUI and one VAE server per module. The server runs with `--comfyui` on the very ComfyUI tree the
ComfyUI runs from and serves the VAE files that ComfyUI's VAELoader loads: random-weight files in
ComfyUI's own layouts, made by ComfyUI's own model classes (support/comfy_vaes.py; in a subprocess, so
this process never imports ComfyUI). Every prompt (API format, through /prompt) runs a core node twice,
once on `RemoteVAELoader`'s VAE and once on `VAELoader`'s, and the outputs are compared: VAE Decode,
VAE Decode (Tiled), VAE Encode, VAE Encode (Tiled), VAE Encode (for Inpainting), InpaintModelConditioning,
WanImageToVideo. (Not LTXVImgToVideo: 0.3.75's VAELoader drops a file's metadata, so it cannot load a
small LTX-Video whose config is in the metadata, which the server, like later ComfyUI versions, reads.) And the
ComfyUI that runs a RemoteVAELoader workflow loads no VAE weights: its peak memory during that prompt
stays within MEMORY_BOUND of what it used before, where the same prompt with VAELoader grows by the VAE.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from support.comfyui_harness import REPO, comfyui_dir, running_vae_server, status_of
from support.comfyui_harness import Prompt as HarnessPrompt

pytestmark = pytest.mark.timeout(900)

# name on the server (the file's stem, as a --comfyui server names the files it finds) -> family
FILES = {"sd15_comfy": "sd15", "taesd_comfy": "taesd", "wan21_comfy": "wan21"}
IMAGE = "photo.png"  # 70x52 RGBA with a transparent hole: LoadImage's MASK; cropped to 64x48 by the VAE
WIDE = "wide.png"  # 200x136 RGB: several 128-pixel tiles
LATENTS = {"sd15_comfy": "sd15.latent", "taesd_comfy": "taesd.latent", "wan21_comfy": "wan21.latent"}
LATENT_SHAPES = {"sd15_comfy": (2, 4, 6, 8), "taesd_comfy": (1, 4, 20, 12), "wan21_comfy": (1, 16, 2, 4, 6)}
# Every output is bit-identical (measured: 0) except VAE Encode (Tiled)'s, which ComfyUI's tiler computes from
# IMAGE pixels p in [0,1] where the server gets the wire's float pixels 2p-1 and takes (x+1)/2: a float32
# rounding of p for p < 0.5, measured 9.8e-7 in the latents.
TILED_ENCODE_LIMIT = 1e-5
# What a RemoteVAELoader prompt may add to ComfyUI's peak resident memory: the pack's lazy imports, the
# HTTP client and the images; measured 5 MiB, against 479 MiB for the same prompt with VAELoader (the
# SD 1.5 VAE is 335 MB in float32, plus its activations).
MEMORY_BOUND = 64 << 20
VAE_WEIGHTS = 250 << 20

BUILD = """
import sys
from pathlib import Path
from remote_vae.local_server.comfyui_import import import_comfyui
from support.comfy_vaes import FAMILIES, save_vae_file

comfy = import_comfyui(sys.argv[1], cpu=True)
for seed, (family, path) in enumerate(zip(sys.argv[2::2], sys.argv[3::2]), start=1):
    save_vae_file(comfy, FAMILIES[family], Path(path), seed=seed)
"""

# Test-only nodes: a CONDITIONING from nothing (WanImageToVideo needs one; there is no text encoder here)
# and one that saves the tensors WanImageToVideo put into it.
CONDITIONING_PROBE = """
import os
import torch
import folder_paths
from safetensors.torch import save_file


class RemoteVAETestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "_for_testing"

    def make(self):
        return ([[torch.zeros(1, 1, 8), {}]],)


class RemoteVAETestSaveConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",), "name": ("STRING", {"default": "cond"})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing"

    def save(self, conditioning, name):
        found = {k: v.float().contiguous().cpu() for k, v in conditioning[0][1].items() if isinstance(v, torch.Tensor)}
        save_file(found, os.path.join(folder_paths.get_output_directory(), name + ".safetensors"))
        return {}


NODE_CLASS_MAPPINGS = {
    "RemoteVAETestConditioning": RemoteVAETestConditioning,
    "RemoteVAETestSaveConditioning": RemoteVAETestSaveConditioning,
}
"""


# --------------------------------------------------------------------------- fixtures


def _smooth(width: int, height: int, seed: int) -> np.ndarray:
    coarse = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    field = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)
    return (field.clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("comfyui_loader")
    vae_dir, inputs = root / "models" / "vae", root / "input"
    vae_dir.mkdir(parents=True)
    inputs.mkdir()
    pairs = [str(p) for name, family in FILES.items() for p in (family, vae_dir / f"{name}.safetensors")]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    subprocess.run(
        [sys.executable, "-c", BUILD, str(comfyui_dir()), *pairs], env=env, check=True, timeout=600
    )
    rgba = np.dstack([_smooth(70, 52, seed=0), np.full((52, 70), 255, np.uint8)])
    rgba[16:36, 20:44, 3] = 0  # the hole to inpaint
    Image.fromarray(rgba, "RGBA").save(inputs / IMAGE)
    Image.fromarray(_smooth(200, 136, seed=1)).save(inputs / WIDE)
    for seed, (name, file) in enumerate(LATENTS.items(), start=10):
        tensor = torch.randn(*LATENT_SHAPES[name], generator=torch.Generator().manual_seed(seed))
        save_file({"latent_tensor": tensor, "latent_format_version_0": torch.tensor([])}, str(inputs / file))
    (root / "custom_nodes").mkdir()
    (root / "custom_nodes" / "remote_vae_test_conditioning.py").write_text(CONDITIONING_PROBE)
    return root


@pytest.fixture(scope="module")
def vae_server(base) -> str:
    files = {name: base / "models" / "vae" / f"{name}.safetensors" for name in FILES}
    with running_vae_server(files, base / "vae_server.log", args=["--comfyui", str(comfyui_dir())]) as url:
        yield url


class Prompt(HarnessPrompt):
    """An API-format prompt (support.comfyui_harness.Prompt) with this file's shorthand."""

    def vaes(self, server: str, name: str) -> dict[str, str]:
        """The same file twice: {"remote": RemoteVAELoader, "local": VAELoader}."""
        return {
            "remote": self.add("RemoteVAELoader", endpoint=f"{server}/{name}", transfer="exact", timeout=300),
            "local": self.add("VAELoader", vae_name=f"{name}.safetensors"),
        }


def run_ok(comfy, prompt: Prompt) -> dict:
    entry = comfy.run(prompt.nodes)
    assert status_of(entry) == "success", json.dumps(entry["status"])[:3000]
    return entry


def output(comfy, name: str, key: str = "images") -> torch.Tensor:
    return load_file(str(comfy.output_dir / f"{name}.safetensors"))[key]


def saved_latent(comfy, entry: dict, node_id: str) -> torch.Tensor:
    item = entry["outputs"][node_id]["latents"][0]
    return load_file(str(comfy.output_dir / item["subfolder"] / item["filename"]))["latent_tensor"]


def compare(what: str, remote: torch.Tensor, local: torch.Tensor) -> float:
    assert remote.shape == local.shape, (what, remote.shape, local.shape)
    assert local.float().std() > 0.01, what  # a meaningful output, not a flat one
    difference = (remote.float() - local.float()).abs().max().item()
    print(f"{what}: max |RemoteVAELoader - VAELoader| = {difference:.3g}")
    return difference


# --------------------------------------------------------------------------- memory: no VAE weights here


def _memory(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def peak_growth(comfy, prompt: Prompt) -> int:
    """Bytes ComfyUI's peak resident memory rose above its resident memory before `prompt`."""
    Path(f"/proc/{comfy.pid}/clear_refs").write_text("5")  # peak := current (Linux 4.0+)
    before = _memory(comfy.pid, "VmRSS")
    run_ok(comfy, prompt)
    return _memory(comfy.pid, "VmHWM") - before


def round_trip(server: str | None) -> Prompt:
    p = Prompt()
    if server is None:
        vae = p.add("VAELoader", vae_name="sd15_comfy.safetensors")
    else:
        vae = p.add("RemoteVAELoader", endpoint=f"{server}/sd15_comfy", transfer="exact", timeout=300)
    image = p.add("LoadImage", image=IMAGE)
    latent = p.add("VAEEncode", pixels=[image, 0], vae=[vae, 0])
    decoded = p.add("VAEDecode", samples=[latent, 0], vae=[vae, 0])
    p.add(
        "RemoteVAETestSaveTensor",
        images=[decoded, 0],
        name=f"round_trip_{'local' if server is None else 'remote'}",
    )
    return p


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/<pid>/clear_refs")
def test_a_remote_vae_workflow_loads_no_vae_weights(comfy, vae_server):
    remote = peak_growth(comfy, round_trip(vae_server))
    local = peak_growth(comfy, round_trip(None))
    print(f"peak memory growth: RemoteVAELoader {remote / 2**20:.1f} MiB, VAELoader {local / 2**20:.1f} MiB")
    assert remote <= MEMORY_BOUND
    assert local >= VAE_WEIGHTS  # the measure sees a VAE being loaded
    assert (
        compare(
            "VAEEncode + VAEDecode", output(comfy, "round_trip_remote"), output(comfy, "round_trip_local")
        )
        == 0.0
    )


# --------------------------------------------------------------------------- core nodes, remote vs local


def test_vae_decode(comfy, vae_server):
    p = Prompt()
    latent = p.add("LoadLatent", latent=LATENTS["sd15_comfy"])
    for kind, vae in p.vaes(vae_server, "sd15_comfy").items():
        images = p.add("VAEDecode", samples=[latent, 0], vae=[vae, 0])
        p.add("RemoteVAETestSaveTensor", images=[images, 0], name=f"decode_{kind}")
    run_ok(comfy, p)
    assert compare("VAE Decode", output(comfy, "decode_remote"), output(comfy, "decode_local")) == 0.0


def test_vae_decode_of_a_video(comfy, vae_server):
    p = Prompt()
    latent = p.add("LoadLatent", latent=LATENTS["wan21_comfy"])
    for kind, vae in p.vaes(vae_server, "wan21_comfy").items():
        frames = p.add("VAEDecode", samples=[latent, 0], vae=[vae, 0])
        p.add("RemoteVAETestSaveTensor", images=[frames, 0], name=f"video_{kind}")
    run_ok(comfy, p)
    remote, local = output(comfy, "video_remote"), output(comfy, "video_local")
    assert remote.shape == (5, 32, 48, 3)
    assert compare("VAE Decode (Wan 2.1 video)", remote, local) == 0.0


def test_vae_decode_tiled(comfy, vae_server):
    # 128-pixel tiles with a quarter overlap (16 and 4 latent pixels): what the server uses for a tile size
    p = Prompt()
    latent = p.add("LoadLatent", latent=LATENTS["taesd_comfy"])
    for kind, vae in p.vaes(vae_server, "taesd_comfy").items():
        images = p.add(
            "VAEDecodeTiled", samples=[latent, 0], vae=[vae, 0], tile_size=128, overlap=32, temporal_size=64,
            temporal_overlap=8,
        )  # fmt: skip
        p.add("RemoteVAETestSaveTensor", images=[images, 0], name=f"tiled_{kind}")
    run_ok(comfy, p)
    remote, local = output(comfy, "tiled_remote"), output(comfy, "tiled_local")
    assert remote.shape == (1, 160, 96, 3)
    assert compare("VAE Decode (Tiled)", remote, local) == 0.0


def test_vae_encode_and_encode_tiled(comfy, vae_server):
    p = Prompt()
    image, wide = p.add("LoadImage", image=IMAGE), p.add("LoadImage", image=WIDE)
    saves = {}
    for kind, vae in p.vaes(vae_server, "sd15_comfy").items():
        latent = p.add("VAEEncode", pixels=[image, 0], vae=[vae, 0])
        saves[("encode", kind)] = p.add(
            "SaveLatent", samples=[latent, 0], filename_prefix=f"latents/encode_{kind}"
        )
    for kind, vae in p.vaes(vae_server, "taesd_comfy").items():
        latent = p.add(
            "VAEEncodeTiled", pixels=[wide, 0], vae=[vae, 0], tile_size=128, overlap=16, temporal_size=64,
            temporal_overlap=8,
        )  # fmt: skip
        saves[("tiled", kind)] = p.add(
            "SaveLatent", samples=[latent, 0], filename_prefix=f"latents/tiled_{kind}"
        )
    entry = run_ok(comfy, p)
    latents = {key: saved_latent(comfy, entry, node) for key, node in saves.items()}
    assert latents[("encode", "remote")].shape == (1, 4, 6, 8)
    assert compare("VAE Encode", latents[("encode", "remote")], latents[("encode", "local")]) == 0.0
    assert latents[("tiled", "remote")].shape == (1, 4, 17, 25)
    assert (
        compare("VAE Encode (Tiled)", latents[("tiled", "remote")], latents[("tiled", "local")])
        <= TILED_ENCODE_LIMIT
    )


def test_vae_encode_for_inpainting_and_inpaint_model_conditioning(comfy, vae_server):
    p = Prompt()
    image, cond = p.add("LoadImage", image=IMAGE), p.add("RemoteVAETestConditioning")
    saves = {}
    for kind, vae in p.vaes(vae_server, "sd15_comfy").items():
        latent = p.add(
            "VAEEncodeForInpaint", pixels=[image, 0], vae=[vae, 0], mask=[image, 1], grow_mask_by=6
        )
        saves[kind] = p.add("SaveLatent", samples=[latent, 0], filename_prefix=f"latents/inpaint_{kind}")
        inpaint = p.add(
            "InpaintModelConditioning", positive=[cond, 0], negative=[cond, 0], vae=[vae, 0], pixels=[image, 0],
            mask=[image, 1], noise_mask=True,
        )  # fmt: skip
        p.add("RemoteVAETestSaveConditioning", conditioning=[inpaint, 0], name=f"inpaint_conditioning_{kind}")
        saves[f"original_{kind}"] = p.add(
            "SaveLatent", samples=[inpaint, 2], filename_prefix=f"latents/original_{kind}"
        )
    entry = run_ok(comfy, p)
    latents = {key: saved_latent(comfy, entry, node) for key, node in saves.items()}
    assert latents["remote"].shape == (1, 4, 6, 8)
    assert compare("VAE Encode (for Inpainting)", latents["remote"], latents["local"]) == 0.0
    remote, local = (
        output(comfy, f"inpaint_conditioning_{kind}", "concat_latent_image") for kind in ("remote", "local")
    )
    assert compare("InpaintModelConditioning (masked image)", remote, local) == 0.0
    assert latents["original_remote"].shape == (1, 4, 6, 8)  # the uncropped 70x52 image, cropped by the VAE
    assert (
        compare("InpaintModelConditioning (image)", latents["original_remote"], latents["original_local"])
        == 0.0
    )


def test_wan_image_to_video(comfy, vae_server):
    p = Prompt()
    start = p.add("LoadImage", image=IMAGE)
    cond = p.add("RemoteVAETestConditioning")
    for kind, vae in p.vaes(vae_server, "wan21_comfy").items():
        wan = p.add(
            "WanImageToVideo", positive=[cond, 0], negative=[cond, 0], vae=[vae, 0], width=48, height=32, length=5,
            batch_size=1, start_image=[start, 0],
        )  # fmt: skip
        p.add("RemoteVAETestSaveConditioning", conditioning=[wan, 0], name=f"wan_{kind}")
    run_ok(comfy, p)
    remote = output(comfy, "wan_remote", "concat_latent_image")
    assert remote.shape == (
        1,
        16,
        2,
        4,
        6,
    )  # 5 frames (the start image, then grey) -> one video of 2 latent frames
    assert compare("WanImageToVideo", remote, output(comfy, "wan_local", "concat_latent_image")) == 0.0
    assert torch.equal(output(comfy, "wan_remote", "concat_mask"), output(comfy, "wan_local", "concat_mask"))


def test_an_unknown_model_is_an_error_on_the_loader(comfy, vae_server):
    p = Prompt()
    vae = p.add("RemoteVAELoader", endpoint=f"{vae_server}/nope", transfer="exact", timeout=30)
    latent = p.add("LoadLatent", latent=LATENTS["sd15_comfy"])
    images = p.add("VAEDecode", samples=[latent, 0], vae=[vae, 0])
    p.add("RemoteVAETestSaveTensor", images=[images, 0], name="never_written")
    entry = comfy.run(p.nodes)
    assert status_of(entry) == "error"
    [error] = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
    assert error["node_type"] == "RemoteVAELoader"
    assert (
        "model 'nope' is not hosted there; hosted models: /sd15_comfy, /taesd_comfy, /wan21_comfy"
        in error["exception_message"]
    )
