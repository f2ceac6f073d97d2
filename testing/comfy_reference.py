"""What ComfyUI's VAEDecode / VAEEncode give on a diffusers VAE's weights: the reference to compare with.

IMAGE = clamp((decoder(z) + 1) / 2), channels last; LATENT = encoder(2 * IMAGE - 1), the posterior's mode.
Where ComfyUI's VAE code differs from diffusers' (local_server/parity.py), `reference="comfyui"` runs the
model ComfyUI's way; `reference="diffusers"` runs it as diffusers does.
"""

from __future__ import annotations

import torch

from ..local_server.parity import behaving_like
from ..remote.protocol import Reference


def image_of(decoded: torch.Tensor) -> torch.Tensor:
    """A decoder's output [B,3,H,W] (video: [B,3,F,H,W]) as ComfyUI's VAE.decode returns it: [B,H,W,3]
    ([B,F,H,W,3]) in 0..1."""
    return torch.clamp((decoded + 1) / 2, 0, 1).movedim(1, -1)


def encoder_input(image: torch.Tensor, *, video: bool = False) -> torch.Tensor:
    """An IMAGE [B,H,W,3] in 0..1 as ComfyUI's VAE.encode hands it to the encoder: [B,3,H,W] in -1..1;
    with `video`, the IMAGE's frames as one video [1,3,F,H,W]."""
    pixels = image.movedim(-1, 1) * 2 - 1
    return pixels.movedim(1, 0).unsqueeze(0) if video else pixels


@torch.inference_mode()  # as ComfyUI runs its nodes
def comfy_decode(
    model: torch.nn.Module,
    latent: torch.Tensor,
    *,
    reference: Reference = "comfyui",
    frames_as_batch: bool = True,
) -> torch.Tensor:
    """VAEDecode: float32 IMAGE [B,H,W,3]; a video's frames as a batch of images ([B*F,H,W,3]) as the node
    gives them, or, without `frames_as_batch`, as comfy.sd.VAE.decode returns them ([B,F,H,W,3])."""
    with behaving_like(model, reference):
        decoded = model.decode(latent.to(next(model.parameters()).dtype)).sample.float()
    images = image_of(decoded)
    return images.reshape(-1, *images.shape[-3:]) if frames_as_batch else images


@torch.inference_mode()
def comfy_encode(
    model: torch.nn.Module, image: torch.Tensor, *, reference: Reference = "comfyui", video: bool = False
) -> torch.Tensor:
    """VAEEncode of an IMAGE whose sides are already multiples of the compression (the node crops first);
    with `video`, its frames are encoded as one video."""
    pixels = encoder_input(image, video=video).to(next(model.parameters()).dtype)
    with behaving_like(model, reference):
        return model.encode(pixels).latent_dist.mode()
