"""Local decode/encode with a ComfyUI VAE: what the core VAEDecode / VAEEncode nodes do."""

from __future__ import annotations

import torch


def local_decode(vae, samples: torch.Tensor) -> torch.Tensor:
    images = vae.decode(samples)
    if images.ndim == 5:  # video: [B,F,H,W,C] -> frames [B*F,H,W,C], as VAEDecode does
        images = images.reshape(-1, *images.shape[-3:])
    return images


def local_encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    return vae.encode(pixels[:, :, :, :3])
