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
- `photo-standin` / `wan-standin`: not VAEs either. SD shapes (4 channels, /8) and Wan 2.1 shapes (16
  channels, /8 in space, /4 in time: 21 latent frames -> 81) whose output is natural content
  (remote_vae/testing/natural.py) instead of smooth noise, so that lossless codecs meet what real decoders give. The
  output values are chosen so that the server's uint8 rendering reproduces those pixels exactly: the
  benchmarks compare what arrives with them bit for bit. An image latent shows photograph
  `round(z[i,0,0,0]) mod 4` (`photo_latents` sets it), a video latent the pan-and-zoom clip.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from remote_vae.testing import comfy_decode, natural, random_vae

__all__ = ["BUILDERS", "NaturalDecoder", "StandInDecoder", "build", "comfy_decode", "photo_latents"]

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


class NaturalDecoder(torch.nn.Module):
    """Decodes to remote_vae/testing/natural.py's photographs (images) or pan-and-zoom clip (video), as decoder output
    in [-1, 1] that the server renders back to exactly those uint8 pixels (`levels`).

    Its compute is GPU-like: a 1x1 projection of the latent (tiny) and one pass writing the output, the
    memory traffic a real decoder's last layer has.
    """

    def __init__(self, latent_channels: int, *, video: bool, seed: int) -> None:
        super().__init__()
        self.proj = (torch.nn.Conv3d if video else torch.nn.Conv2d)(latent_channels, 3, kernel_size=1)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(seed))
        self.video = video

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> SimpleNamespace:
        zero = self.proj(z).mean() * 0  # the stand-in's compute, tied to the output (adding 0 is exact)
        height, width = z.shape[-2] * 8, z.shape[-1] * 8
        if self.video:
            frames = 4 * (z.shape[2] - 1) + 1
            clip = _natural("clip", 0, frames, height, width, z.dtype).to(z.device)
            return SimpleNamespace(sample=clip.expand(z.shape[0], -1, -1, -1, -1) + zero)
        shown = [int(torch.round(z[i, 0, 0, 0])) % len(natural.PHOTOS) for i in range(z.shape[0])]
        images = [_natural("photo", i, 1, height, width, z.dtype).to(z.device) for i in shown]
        return SimpleNamespace(sample=torch.cat(images) + zero)


def photo_latents(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """`count` SD-shaped latents for `size`x`size` images that `photo-standin` decodes to photographs
    0, 1, 2, 3, 0, ... (random values, the first of each set to its photograph's number)."""
    z = torch.randn(count, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(seed))
    z[:, 0, 0, 0] = torch.arange(count, dtype=z.dtype)
    return z


@functools.lru_cache(maxsize=8)
def _natural(kind: str, index: int, frames: int, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Content as decoder output: [1,3,H,W] (a photograph) or [3,F,H,W] (the clip, unbatched) in `dtype`,
    laid out as a real decoder's last layer writes it (contiguous channels-first: indexing by the
    channels-last pixels would keep their strides, and every pass over it would then be a strided one)."""
    if kind == "photo":
        pixels = torch.from_numpy(natural.photo(index, height, width)).permute(2, 0, 1)[None]
    else:
        pixels = torch.from_numpy(natural.clip(frames, height, width)).permute(3, 0, 1, 2)
    indices = pixels.int().contiguous()  # int32: half the scratch of int64 for a whole clip
    return levels(dtype)[indices]


@functools.cache
def levels(dtype: torch.dtype) -> torch.Tensor:
    """For each uint8 value v, a value in `dtype` near v/127.5 - 1 that the server renders to v (its
    `uint8_reference`: float16, then *0.5+0.5, *255, round half to even), found among every value the
    dtype shares with float16 in [-1, 1]."""
    from remote_vae.local_server.postprocess import uint8_reference

    every_half = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    usable = every_half[every_half.isfinite() & (every_half.abs() <= 1)]
    candidates = torch.unique(usable.to(dtype).float())
    rendered = uint8_reference(candidates.view(1, 1, 1, -1)).flatten().long()
    ideal = torch.arange(256, dtype=torch.float32) / 127.5 - 1
    distance = (candidates[None, :] - ideal[:, None]).abs()
    distance[rendered[None, :] != torch.arange(256)[:, None]] = float("inf")
    return candidates[distance.argmin(dim=1)].to(dtype)


BUILDERS: dict[str, Callable[[int], torch.nn.Module]] = {
    "sd-full": lambda seed: random_vae("sd15", seed, size="full"),
    "sd-small": lambda seed: random_vae("sd15", seed, **SMALL),
    "sd-standin": lambda seed: StandInDecoder(4, video=False, seed=seed).eval().requires_grad_(False),
    "hv-standin": lambda seed: StandInDecoder(16, video=True, seed=seed).eval().requires_grad_(False),
    "photo-standin": lambda seed: NaturalDecoder(4, video=False, seed=seed).eval().requires_grad_(False),
    "wan-standin": lambda seed: NaturalDecoder(16, video=True, seed=seed).eval().requires_grad_(False),
}


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The model `name` (see BUILDERS) with seeded weights, in `dtype`."""
    if name not in BUILDERS:
        raise SystemExit(f"unknown bench model {name!r}; known: {', '.join(BUILDERS)}")
    model = BUILDERS[name](seed)
    return torch.nn.Module.to(model, dtype=dtype)  # torch's own `to`: diffusers' warns on every cast
