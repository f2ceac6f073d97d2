"""Real diffusers VAEs with random weights for every preset, saved the ways users have them.

`make_vae(preset)` builds the preset's diffusers class, tiny by default, or with the architecture ComfyUI
0.3.75's `comfy.sd.VAE` hard-codes (`comfy_compatible=True`). `save_diffusers_folder` writes a diffusers
folder; `save_comfy_single_file` writes one .safetensors file in the key layout of ComfyUI's `models/vae`
files (original LDM names for SD-family KL VAEs and HunyuanVideo, original Wan names for Wan).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import diffusers
import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file

from remote_vae.local_server import single_file
from remote_vae.remote.presets import PRESETS

# GroupNorm's group count leaves no trace in the weights, so a single file read back without a config gets the
# published 32 groups: tiny widths stay multiples of 32.
TINY_WIDTHS = (32, 32, 64, 64)  # 4 levels, so spatial compression stays 8
# comfy/sd.py hard-codes ch=128, ch_mult [1,2,4,4], num_res_blocks 2 for SD-family KL VAEs and HunyuanVideo.
COMFY_WIDTHS = (128, 256, 512, 512)
# ComfyUI reads a Wan 2.1 VAE's width from `decoder.head.0.gamma` (dim_mult and num_res_blocks are fixed,
# and diffusers' Wan converter also assumes 2 blocks per level), so one small Wan serves both purposes.
WAN_BASE_DIM = 16
PRESET_NAMES = ("sd15", "sdxl", "flux", "sd3", "hunyuan_video", "wan21", "qwen_image")


def make_vae(preset_name: str, seed: int = 0, *, comfy_compatible: bool = False) -> torch.nn.Module:
    """A diffusers VAE of `preset_name`'s class with seeded, non-trivial random weights, in eval mode."""
    preset = PRESETS[preset_name]
    cls = getattr(diffusers, preset.diffusers_class)
    widths, layers = (COMFY_WIDTHS, 2) if comfy_compatible else (TINY_WIDTHS, 1)
    if preset.diffusers_class == "AutoencoderKL":
        config = {
            **preset.config,
            "block_out_channels": widths,
            "layers_per_block": layers,
            "norm_num_groups": 32,
        }
    elif preset.diffusers_class == "AutoencoderKLHunyuanVideo":
        config = {**preset.config, "block_out_channels": widths, "layers_per_block": layers}
    elif preset.diffusers_class in ("AutoencoderKLWan", "AutoencoderKLQwenImage"):
        config = {**preset.config, "base_dim": WAN_BASE_DIM}
    else:
        raise ValueError(f"make_vae does not know preset {preset_name} ({preset.diffusers_class})")
    with init_empty_weights():  # every parameter is drawn below: skip the default init (seconds at full size)
        model = cls.from_config(config)
    model = model.to_empty(device="cpu")
    _randomise(model, seed)
    return model.eval().requires_grad_(False)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Norm scales near 1, small biases, weights ~ N(0, 1/fan_in): every layer passes a varied signal on."""
    assert not list(model.buffers()), "to_empty() left buffers unset"
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name and name.endswith((".weight", ".gamma")):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                param.copy_(0.05 * noise)
            else:
                # A quieter last layer keeps most decoded values inside [-1, 1], where nothing clamps them.
                gain = 0.5 if name.startswith("decoder.conv_out.") else 1.0
                param.copy_(gain * noise / math.sqrt(param[0].numel()))


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
