"""Real diffusers VAEs of every preset with seeded, non-trivial random weights."""

from __future__ import annotations

import math
from typing import Literal

import torch

from ..remote.presets import PRESETS

Size = Literal["micro", "tiny", "comfy", "full"]
Init = Literal["varied", "default"]

# GroupNorm's group count leaves no trace in the weights, so a single file read back without a config gets the
# published 32 groups: tiny widths stay multiples of 32.
TINY_WIDTHS = (32, 32, 64, 64)  # 4 levels, so spatial compression stays 8
# comfy/sd.py hard-codes ch=128, ch_mult [1,2,4,4], num_res_blocks 2 for SD-family KL VAEs and HunyuanVideo.
COMFY_WIDTHS = (128, 256, 512, 512)
_KL_SIZES: dict[Size, dict] = {
    "micro": {"block_out_channels": (16, 16, 32, 32), "layers_per_block": 1, "norm_num_groups": 8},
    "tiny": {"block_out_channels": TINY_WIDTHS, "layers_per_block": 1, "norm_num_groups": 32},
    "comfy": {"block_out_channels": COMFY_WIDTHS, "layers_per_block": 2, "norm_num_groups": 32},
    "full": {},  # the preset's own architecture, else the class's defaults
}
# ComfyUI reads a Wan 2.1 VAE's width from `decoder.head.0.gamma` (dim_mult and num_res_blocks are fixed,
# and diffusers' Wan converter also assumes 2 blocks per level), so one small Wan serves both purposes.
_WAN_SIZES: dict[Size, dict] = {  # Wan 2.1's architecture, Qwen-Image's too
    "micro": {"base_dim": 8, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1},
    "tiny": {"base_dim": 16},
    "comfy": {"base_dim": 16},
    "full": {},
}
# Wan 2.2's decoder is wider than its encoder: below full size it gets the encoder's width.
_WAN_CLASS_SIZES = {
    size: {**arch, "decoder_base_dim": None} if arch else arch for size, arch in _WAN_SIZES.items()
}
# Conv3d is slow on a CPU: a micro HunyuanVideo is narrower still.
_HUNYUAN_SIZES: dict[Size, dict] = {
    **_KL_SIZES,
    "micro": {"block_out_channels": (8, 8, 16, 16), "layers_per_block": 1, "norm_num_groups": 4},
}
_SIZES = {
    "AutoencoderKL": _KL_SIZES,
    "AutoencoderKLHunyuanVideo": _HUNYUAN_SIZES,
    "AutoencoderKLWan": _WAN_CLASS_SIZES,
    "AutoencoderKLQwenImage": _WAN_SIZES,
}


def random_vae(
    preset: str, seed: int = 0, *, size: Size = "tiny", init: Init = "varied", **config
) -> torch.nn.Module:
    """`preset`'s diffusers VAE class with seeded weights, in eval mode, on the CPU, in float32.

    size: "micro" (the cheapest with the same compression; its GroupNorm groups are not the 32 a single file
    is read back with), "tiny" (cheap, and a single file of it loads without a config), "comfy" (the
    smallest architecture ComfyUI's own VAE code loads) or "full" (the published widths). `config` overrides the architecture (e.g. a bench's own
    widths). init: "varied" draws every weight so that each layer passes a varied signal on; "default" is
    the class's own initialisation (better-conditioned GroupNorm statistics, a saturated decoder output).
    The same arguments give the same weights in every process; the global random state is left alone.
    """
    import diffusers

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: pick one of {', '.join(PRESETS)}")
    if size not in _KL_SIZES:
        raise ValueError(f"size {size!r} is not one of {', '.join(_KL_SIZES)}")
    spec = PRESETS[preset]
    cls = getattr(diffusers, spec.diffusers_class)
    config = {**spec.config, **_SIZES[spec.diffusers_class][size], **config}
    model = _default_init(cls, config, seed) if init == "default" else _varied_init(cls, config, seed)
    return model.train(False).requires_grad_(False)


def _default_init(cls: type, config: dict, seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls.from_config(config)


def _varied_init(cls: type, config: dict, seed: int) -> torch.nn.Module:
    from accelerate import init_empty_weights

    with init_empty_weights():  # every parameter is drawn below: skip the default init (seconds at full size)
        model = cls.from_config(config)
    model = model.to_empty(device="cpu")
    assert not list(model.buffers()), "to_empty() left buffers unset"
    _randomise(model, seed)
    return model


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Norm scales near 1, small biases, weights ~ N(0, 1/fan_in): every layer passes a varied signal on.

    Default initialisation saturates a decoder's output, and clamping would then hide transfer errors.
    """
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
