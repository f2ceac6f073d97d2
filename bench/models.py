"""The models the benchmarks run: real diffusers VAEs with seeded random weights, and cheap stand-ins.

No weights can be downloaded here, so every model is built from a config and filled with seeded random
values (`remote_vae.testing`, the builder the tests use); the same name and seed give the same weights in
every process (the server subprocess and the benchmark compare outputs). `comfy_decode` is ComfyUI's
VAEDecode on the same weights, the in-process baseline.

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

from remote_vae.testing import comfy_decode, random_vae

__all__ = ["BUILDERS", "StandInDecoder", "build", "comfy_decode"]

# Tiny widths and no mid-block attention: cheap on a CPU, the same latent and pixel shapes.
SMALL = {
    "block_out_channels": (8, 8, 16, 16),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "mid_block_add_attention": False,
}


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
            self.proj.weight.copy_(
                torch.randn(self.proj.weight.shape, generator=generator) / math.sqrt(latent_channels)
            )
            self.proj.bias.zero_()

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> SimpleNamespace:
        x = self.proj(z)
        if self.video:
            frames = 4 * (z.shape[2] - 1) + 1
            x = F.interpolate(
                x, size=(frames, z.shape[3] * 8, z.shape[4] * 8), mode="trilinear", align_corners=True
            )
        else:
            x = F.interpolate(x, scale_factor=8, mode="bilinear", align_corners=False)
        return SimpleNamespace(sample=torch.tanh(x))


BUILDERS: dict[str, Callable[[int], torch.nn.Module]] = {
    "sd-full": lambda seed: random_vae("sd15", seed, size="full"),
    "sd-small": lambda seed: random_vae("sd15", seed, **SMALL),
    "sd-standin": lambda seed: StandInDecoder(4, video=False, seed=seed).eval().requires_grad_(False),
    "hv-standin": lambda seed: StandInDecoder(16, video=True, seed=seed).eval().requires_grad_(False),
}


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The model `name` (see BUILDERS) with seeded weights, in `dtype`."""
    if name not in BUILDERS:
        raise SystemExit(f"unknown bench model {name!r}; known: {', '.join(BUILDERS)}")
    model = BUILDERS[name](seed)
    return torch.nn.Module.to(model, dtype=dtype)  # torch's own `to`: diffusers' warns on every cast
