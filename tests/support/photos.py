"""Natural pixels through the real server: remote_vae.testing.natural's photographs and pan-and-zoom clip,
and a stand-in VAE that decodes any latent to them (so real photographs travel, not noise)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import numpy as np
import requests
import torch
from diffusers.models.autoencoders.vae import DecoderOutput

from remote_vae.local_server.app import Settings, create_app
from remote_vae.local_server.registry import ModelRegistry, Tuning
from remote_vae.remote.presets import PRESETS, Preset
from remote_vae.testing import natural
from support.serving import post_decode, serve


def photos(height: int, width: int) -> np.ndarray:
    """Four distinct photographs as [4,H,W,3] uint8 (remote_vae.testing.natural)."""
    return natural.photos(4, height, width)


def pan_clip(frames: int, height: int, width: int) -> np.ndarray:
    """`frames` frames of a camera panning and zooming over a photograph: [F,H,W,3] uint8."""
    return natural.clip(frames, height, width)


class PhotoVAE(torch.nn.Module):
    """Decodes a latent [B,C,h,w] (or [B,C,T,h,w]) to frames of `pixels` [N,H,W,3] uint8, cropped to
    the h*scale x w*scale the latent asks: batch item (or video frame) i shows frame i mod N, in [-1,1]
    as a decoder outputs it. Videos have 1 + temporal*(T-1) frames, as the video presets say."""

    def __init__(self, pixels: np.ndarray, scale: int = 8, temporal: int = 4) -> None:
        super().__init__()
        self.register_buffer("frames", torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1)
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.scale, self.temporal = scale, temporal

    def decode(self, z: torch.Tensor) -> DecoderOutput:
        height, width = z.shape[-2] * self.scale, z.shape[-1] * self.scale
        count = z.shape[0] if z.ndim == 4 else 1 + self.temporal * (z.shape[2] - 1)
        shown = self.frames[torch.arange(count) % len(self.frames), :, :height, :width]
        if z.ndim == 4:
            return DecoderOutput(sample=shown.to(z.dtype))
        return DecoderOutput(
            sample=shown.permute(1, 0, 2, 3)[None].expand(z.shape[0], -1, -1, -1, -1).to(z.dtype)
        )


CPU_THREADS = 2  # the servers' conversion pool, whatever the machine
PIXELS = dataclasses.replace(PRESETS["sd15"], name="pixels", spatial_compression=1)  # any size, odd too


@contextlib.contextmanager
def hosting_photos(
    vae: PhotoVAE, preset: Preset, settings: Settings | None = None, options: Tuning | None = None
) -> Iterator[str]:
    """`vae` served as /{preset.name} on a free port (float32 on the CPU, CPU_THREADS conversion
    threads); yields the base URL."""
    host = ModelRegistry(options=options, cpu_threads=CPU_THREADS)
    host.add(preset.name, preset, model=vae, device="cpu", dtype="float32")
    try:
        with serve(create_app(host, settings)) as url:
            yield url
    finally:
        host.close()


def uint8_decode(
    url: str, model: str, latent: torch.Tensor, codec: str | None = None, **options
) -> requests.Response:
    """The uint8 NHWC answer (output_type=pt, partial_postprocess=True), compressed by `codec` if given."""
    extra = [("codec", codec)] if codec else []
    return post_decode(
        f"{url}/{model}",
        latent,
        output_type="pt",
        partial_postprocess=True,
        do_scaling=False,
        extra_params=extra,
        **options,
    )
