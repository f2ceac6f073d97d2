"""A VAE saved the ways users have them: a diffusers folder, or one file in ComfyUI's `models/vae` layout.

ComfyUI's files keep the original key names: LDM names for SD-family KL VAEs and HunyuanVideo, the
original Wan names for Wan and Qwen-Image.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..local_server import single_file
from ..remote.presets import PRESETS

# The presets both ways cover (wan22's original layout is not known here).
PRESET_NAMES = ("sd15", "sdxl", "flux", "sd3", "hunyuan_video", "wan21", "qwen_image")


def save_diffusers_folder(model: torch.nn.Module, path: str | Path) -> Path:
    """`model` as a diffusers folder (config.json + diffusion_pytorch_model.safetensors)."""
    model.save_pretrained(str(path), safe_serialization=True)
    return Path(path)


def save_comfy_single_file(model: torch.nn.Module, preset_name: str, path: str | Path) -> Path:
    """`model`'s weights in the original key layout ComfyUI's models/vae files use, as one .safetensors."""
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    cls = PRESETS[preset_name].diffusers_class
    if cls in ("AutoencoderKL", "AutoencoderKLHunyuanVideo"):
        original = single_file.diffusers_to_ldm(state_dict)
    elif cls in ("AutoencoderKLWan", "AutoencoderKLQwenImage"):
        original = wan_to_original(state_dict)
    else:
        raise ValueError(f"no original layout known for {cls}")
    save_file({k: v.contiguous() for k, v in original.items()}, str(path))
    return Path(path)


# --------------------------------------------------------------------------- Wan: diffusers -> original names

# A residual block's parts: diffusers name -> index in the original `residual` Sequential (or `shortcut`).
_WAN_RESIDUAL = {
    "norm1.gamma": "residual.0.gamma",
    "conv1.": "residual.2.",
    "norm2.gamma": "residual.3.gamma",
    "conv2.": "residual.6.",
    "conv_shortcut.": "shortcut.",
}
_WAN_BLOCK = re.compile(
    r"^(encoder\.down_blocks\.\d+|(?:en|de)coder\.mid_block\.resnets\.\d+|decoder\.up_blocks\.\d+\.resnets\.\d+)\."
    r"(norm1\.gamma|conv1\.|norm2\.gamma|conv2\.|conv_shortcut\.)"
)


def wan_to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of diffusers' `convert_wan_vae_to_diffusers` for Wan 2.1-style VAEs."""
    resnets = {m[1] for k in state_dict if (m := re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", k))}
    stride = (
        len(resnets) + 1
    )  # the original decoder is one flat list: each level's blocks, then its upsampler
    return {_wan_key(key, stride): tensor for key, tensor in state_dict.items()}


def _wan_key(key: str, stride: int) -> str:
    key = _WAN_BLOCK.sub(lambda m: f"{m[1]}.{_WAN_RESIDUAL[m[2]]}", key)
    for diffusers_name, original in (("quant_conv.", "conv1."), ("post_quant_conv.", "conv2.")):
        if key.startswith(diffusers_name):
            return original + key[len(diffusers_name) :]
    key = re.sub(r"^(encoder|decoder)\.conv_in\.", r"\1.conv1.", key)
    key = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.head.0.", key)
    key = re.sub(r"^(encoder|decoder)\.conv_out\.", r"\1.head.2.", key)
    key = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".middle.{2 * int(m[1])}.", key)
    key = key.replace(".mid_block.attentions.0.", ".middle.1.")
    key = key.replace("encoder.down_blocks.", "encoder.downsamples.")
    key = re.sub(
        r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
        lambda m: f"decoder.upsamples.{stride * int(m[1]) + int(m[2])}.",
        key,
    )
    return re.sub(
        r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
        lambda m: f"decoder.upsamples.{stride * int(m[1]) + stride - 1}.",
        key,
    )
