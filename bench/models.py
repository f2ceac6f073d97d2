"""The models the benchmarks run: real diffusers VAEs with seeded random weights, and cheap stand-ins.

No weights can be downloaded here, so every model is built from a config and filled with seeded random
values; the same name and seed give the same weights in every process (the server subprocess and the
benchmark compare outputs).

- `sd-full`: the published SD-family decoder architecture (49.5 M decoder parameters), for timings that
  must reflect the real compute.
- `sd-small`: the same class with tiny widths and no mid-block attention: cheap on a CPU, same latent
  and pixel shapes, so transfers and memory of big images can be measured.
- `sd-standin` / `hv-standin`: not VAEs. A 1x1 projection then smooth upsampling to exactly the pixel
  shape the real decoder gives (SD: [B,3,8H,8W]; HunyuanVideo: [B,3,4(T-1)+1,8H,8W]). They stand in
  where only the decoder's input/output shapes matter and its compute must be GPU-like (tens of ms), or,
  for video, where the real HunyuanVideo class costs about a minute per 61-frame clip on this CPU even at
  width 4 (its Conv3d has no fast CPU kernel).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F

FULL_WIDTHS = (128, 256, 512, 512)
SMALL_WIDTHS = (8, 8, 16, 16)


def kl_vae(widths: tuple[int, ...], *, layers: int, attention: bool, groups: int, seed: int) -> torch.nn.Module:
    """An SD-family `AutoencoderKL` (4 latent channels, 8x compression) with seeded weights."""
    from diffusers import AutoencoderKL

    model = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(widths),
        up_block_types=["UpDecoderBlock2D"] * len(widths),
        block_out_channels=widths,
        layers_per_block=layers,
        latent_channels=4,
        norm_num_groups=groups,
        sample_size=512,
        scaling_factor=0.18215,
        mid_block_add_attention=attention,
    )
    randomise(model, seed)
    return model.eval().requires_grad_(False)


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights that keep a varied signal through every layer and most outputs inside [-1, 1].

    Default initialisation saturates the decoder output, and clamping would then hide transfer errors.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name and name.endswith(".weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                param.copy_(0.05 * noise)
            else:
                gain = 0.5 if name.startswith("decoder.conv_out.") else 1.0
                param.copy_(gain * noise / math.sqrt(param[0].numel()))


class StandInDecoder(torch.nn.Module):
    """Same latent-in / pixels-out shapes as a real SD or HunyuanVideo decoder, at a tiny fraction of the work.

    A 1x1 projection to RGB, smooth (bi/trilinear) upsampling, tanh into (-1, 1). Its pixels are smooth,
    so lossy formats do better on them than on real decoder output.
    """

    def __init__(self, latent_channels: int, *, video: bool, seed: int) -> None:
        super().__init__()
        conv = torch.nn.Conv3d if video else torch.nn.Conv2d
        self.proj = conv(latent_channels, 3, kernel_size=1)
        self.video = video
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=generator) / math.sqrt(latent_channels))
            self.proj.bias.zero_()

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> SimpleNamespace:
        x = self.proj(z)
        if self.video:
            frames = 4 * (z.shape[2] - 1) + 1
            x = F.interpolate(x, size=(frames, z.shape[3] * 8, z.shape[4] * 8), mode="trilinear", align_corners=True)
        else:
            x = F.interpolate(x, scale_factor=8, mode="bilinear", align_corners=False)
        return SimpleNamespace(sample=torch.tanh(x))


BUILDERS: dict[str, Callable[[int], torch.nn.Module]] = {
    "sd-full": lambda seed: kl_vae(FULL_WIDTHS, layers=2, attention=True, groups=32, seed=seed),
    "sd-small": lambda seed: kl_vae(SMALL_WIDTHS, layers=1, attention=False, groups=8, seed=seed),
    "sd-standin": lambda seed: StandInDecoder(4, video=False, seed=seed).eval().requires_grad_(False),
    "hv-standin": lambda seed: StandInDecoder(16, video=True, seed=seed).eval().requires_grad_(False),
}


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The model `name` (see BUILDERS) with seeded weights, in `dtype`."""
    if name not in BUILDERS:
        raise SystemExit(f"unknown bench model {name!r}; known: {', '.join(BUILDERS)}")
    model = BUILDERS[name](seed)
    return torch.nn.Module.to(model, dtype=dtype)  # torch's own `to`: diffusers' warns on every cast


def comfy_decode(model: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """ComfyUI's VAEDecode on the same weights: decode, float32, clamp((x+1)/2), NHWC (video: frames)."""
    with torch.inference_mode():
        x = model.decode(z.to(next(model.parameters()).dtype)).sample.float()
    x = torch.clamp((x + 1.0) / 2.0, min=0.0, max=1.0)
    if x.ndim == 5:  # [B,3,F,H,W] -> [B*F,H,W,3]
        return x.permute(0, 2, 3, 4, 1).reshape(-1, x.shape[3], x.shape[4], 3)
    return x.movedim(1, -1)
