"""Random-weight VAE files in ComfyUI's own layouts, made with ComfyUI's own model classes.

`comfy.sd.VAE` picks an architecture from a few tensors of a state dict (and, for LTX-Video, a config in
the file's metadata). Handing it just those tensors builds the model class a real file of that family
gets; its state dict, with seeded weights, saved as one safetensors file, is then a file ComfyUI's
VAELoader loads as that family: the files users have, at the size ComfyUI's detection fixes (tiny where
it reads the width from the weights: Wan 2.1 / Qwen-Image, LTX-Video's metadata config, the tiny decoders).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

# A tiny LTX-Video: ComfyUI fixes 128 latent channels and 32x / 8x compression (patch 4, three 2x stages);
# the decoder runs its blocks in reverse, and detection needs a res_x block first.
LTX_TINY = {
    "vae": {
        "dims": 3, "latent_channels": 128, "patch_size": 4, "norm_layer": "pixel_norm", "latent_log_var": "uniform",
        "encoder_blocks": [["res_x", {"num_layers": 1}], ["compress_all", {}], ["compress_all", {}], ["compress_all", {}]],
        "decoder_blocks": [["compress_all", {}], ["compress_all", {}], ["compress_all", {}], ["res_x", {"num_layers": 1}]],
        "causal_decoder": False, "timestep_conditioning": False,  # with it, ComfyUI adds unseeded noise to every decode
    }
}  # fmt: skip


@dataclass(frozen=True)
class Family:
    """One VAE family as ComfyUI 0.3.75's detection sees it."""

    name: str
    detect: dict[str, tuple[int, ...]]  # the tensors (name -> shape) ComfyUI's detection reads
    latent: tuple[int, ...]  # a small latent to test with
    metadata: dict[str, Any] = field(default_factory=dict)
    encodes: bool = True
    note: str = ""


_KL_DOWN = {"encoder.down.2.downsample.conv.weight": (512, 512, 3, 3)}

FAMILIES = {
    f.name: f
    for f in (
        Family("sd15", {"decoder.conv_in.weight": (512, 4, 3, 3), "post_quant_conv.weight": (4, 4, 1, 1), **_KL_DOWN}, (1, 4, 8, 8)),
        Family("sdxl", {"decoder.conv_in.weight": (512, 4, 3, 3), "post_quant_conv.weight": (4, 4, 1, 1), **_KL_DOWN}, (1, 4, 6, 10),
               note="the SD 1.5 architecture; only the weights differ"),
        Family("flux", {"decoder.conv_in.weight": (512, 16, 3, 3), **_KL_DOWN}, (1, 16, 8, 8)),
        Family("flux2", {"decoder.conv_in.weight": (512, 32, 3, 3), "post_quant_conv.weight": (32, 32, 1, 1),
                         "bn.running_mean": (128,), **_KL_DOWN}, (1, 128, 4, 4)),
        Family("wan21", {"decoder.middle.0.residual.0.gamma": (64, 1, 1, 1), "decoder.head.0.gamma": (16, 1, 1, 1)}, (1, 16, 2, 4, 4)),
        Family("qwen_image", {"decoder.middle.0.residual.0.gamma": (64, 1, 1, 1), "decoder.head.0.gamma": (16, 1, 1, 1)}, (1, 16, 1, 6, 6),
               note="the Wan 2.1 architecture with one latent frame"),
        Family("wan22", {"decoder.middle.0.residual.0.gamma": (1024, 1, 1, 1),
                         "decoder.upsamples.0.upsamples.0.residual.2.weight": (1024, 1024, 3, 3, 3)}, (1, 48, 2, 2, 2),
               note="705M parameters: too slow for the CPU suite"),
        Family("hunyuan_video", {"decoder.conv_in.conv.weight": (512, 16, 3, 3, 3), "post_quant_conv.weight": (16, 16, 1, 1, 1)},
               (1, 16, 2, 2, 2)),
        Family("hunyuan_video15", {"decoder.conv_in.conv.weight": (1024, 32, 3, 3, 3)}, (1, 32, 2, 2, 2),
               note="1.26G parameters: too slow for the CPU suite"),
        Family("ltxv", {"decoder.up_blocks.0.res_blocks.0.conv1.conv.weight": (128, 128, 3, 3, 3)}, (1, 128, 2, 2, 2),
               metadata={"config": json.dumps(LTX_TINY)}),
        Family("stable_audio", {"decoder.layers.1.layers.0.beta": (2048,)}, (1, 64, 4)),
        Family("taesd", {"taesd_decoder.1.weight": (64, 4, 3, 3)}, (1, 4, 8, 8)),
        Family("taehv", {"decoder.22.bias": (3,), "decoder.1.weight": (256, 16, 3, 3)}, (1, 16, 2, 4, 4),
               note="its output is 0..1 already (ComfyUI's process_output is the identity)"),
        Family("lighttaew22", {"decoder.22.bias": (12,), "decoder.1.weight": (256, 48, 3, 3)}, (1, 48, 1, 2, 2),
               encodes=False, note="a decoder only"),
    )
}  # fmt: skip


def build_model(comfy: Any, family: Family) -> torch.nn.Module:
    """The model class ComfyUI's detection picks for `family` (weights not set yet)."""
    detect = {name: torch.zeros(shape) for name, shape in family.detect.items()}
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)  # ComfyUI warns about every key the detection tensors leave out
    try:
        vae = comfy.sd.VAE(
            sd=detect, metadata=dict(family.metadata) or None, device=torch.device("cpu"), dtype=torch.float32
        )
    finally:
        logger.setLevel(level)
    assert vae.first_stage_model is not None, f"ComfyUI did not detect {family.name}"
    return vae.first_stage_model


def save_vae_file(
    comfy: Any, family: Family, path: Path, *, seed: int = 0, dtype: torch.dtype = torch.float16
) -> Path:
    """`family`'s model with seeded weights, as one safetensors file (metadata included) at `path`."""
    model = build_model(comfy, family)
    state = randomised(model, seed)
    save_file(
        {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
        str(path),
        metadata=family.metadata or None,
    )
    return path


def randomised(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The model's state dict with every float tensor drawn from `seed`: weights ~ N(0, 1/fan_in), norm
    scales near 1, small biases, positive statistics, so that each layer passes a varied signal on."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            out[name] = tensor.clone()
            continue
        noise = torch.randn(tensor.shape, generator=generator)
        out[name] = _draw(name, tensor, noise).contiguous()
    return out


def _draw(name: str, tensor: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    last = name.rsplit(".", 1)[-1]
    if last == "bias" or "mean" in last or "shift" in last:
        return 0.05 * noise
    if "std" in last or "var" in last:
        return 1.0 + 0.1 * noise.abs()
    if last in ("gamma", "original0", "vae_scale") or (last == "weight" and tensor.ndim == 1):
        return 1.0 + 0.2 * noise  # norm scales, weight-norm magnitudes
    if tensor.ndim <= 1:
        return 0.2 * noise  # e.g. Snake activations' log-scale alpha and beta
    return noise / math.sqrt(tensor[0].numel())


def comfyui_installation(comfyui: Path, root: Path, *, extra_vae_dir: Path | None = None) -> Path:
    """A ComfyUI installation at `root` that runs `comfyui`'s code with its own `models/vae` (empty) and,
    with `extra_vae_dir`, an extra_model_paths.yaml adding that folder to `vae`. Everything is linked
    except folder_paths.py, copied: it finds `models/` beside its real path."""
    root.mkdir(parents=True, exist_ok=True)
    for entry in comfyui.iterdir():
        if entry.name in (
            "models",
            "extra_model_paths.yaml",
            "user",
            "output",
            "input",
            "temp",
            "folder_paths.py",
        ):
            continue
        (root / entry.name).symlink_to(entry)
    shutil.copy(comfyui / "folder_paths.py", root / "folder_paths.py")
    (root / "models" / "vae").mkdir(parents=True)
    if extra_vae_dir is not None:
        (root / "extra_model_paths.yaml").write_text(f"tests:\n    vae: {extra_vae_dir}\n")
    return root


@contextlib.contextmanager
def imported_comfyui(root: Path) -> Iterator[Any]:
    """ComfyUI's modules from `root`, imported into this process as the server does, and removed again
    afterwards (other tests must not find a ComfyUI: the nodes would use its folders and server)."""
    from remote_vae.local_server import comfyui_import

    root, before = root.resolve(), set(sys.modules)
    try:
        yield comfyui_import.import_comfyui(root, cpu=True)
    finally:
        ours = [name for name in set(sys.modules) - before if _under(sys.modules[name], root)]
        for name in ours:  # found first: a namespace package's path is read through its parent
            del sys.modules[name]
        with contextlib.suppress(ValueError):
            sys.path.remove(str(root))
        comfyui_import._imported = None


def _under(module: Any, root: Path) -> bool:
    places = [getattr(module, "__file__", None) or "", *getattr(module, "__path__", [])]  # namespace packages
    return any(str(place).startswith(str(root)) for place in places)


@contextlib.contextmanager
def imported_test_comfyui(root: Path, *, extra_vae_dir: Path | None = None) -> Iterator[Any]:
    """The harness's ComfyUI tree installed under `root` and imported; a skip where none can be had."""
    import pytest

    from .comfyui_harness import HarnessError, comfyui_dir

    try:
        source = comfyui_dir()
    except HarnessError as exc:  # offline without the cached wheel
        pytest.skip(f"no ComfyUI tree: {exc}")
    if extra_vae_dir is not None:
        extra_vae_dir.mkdir(parents=True, exist_ok=True)
    with imported_comfyui(
        comfyui_installation(source, root / "ComfyUI", extra_vae_dir=extra_vae_dir)
    ) as comfy:
        yield comfy
