"""Widget choices and defaults shared by the nodes, their validation and the example workflows.

Kept free of heavy imports: ComfyUI imports this at start-up, before anything runs.
"""

from __future__ import annotations

from typing import Literal

AUTO = "auto"

# How pixels travel. Decode: auto = lossless pixels, raw uint8 or compressed losslessly (JPEG XL) as the
# measured link to that server makes faster; lossless = uint8 pixels (what a saved PNG holds); near-lossless
# = video frames compressed within 8/255 of them (H.264 RGB); exact = float32 decoder output, clamped here
# like ComfyUI's VAEDecode; compact = one JPEG per image (smallest, lossy).
# Encode: lossless = uint8 NHWC pixels; exact = float32 NCHW in [-1, 1] (ComfyUI's own VAE input).
TransferMode = Literal["auto", "lossless", "near-lossless", "exact", "compact"]
TRANSFER_DECODE: tuple[TransferMode, ...] = ("auto", "lossless", "exact", "compact")
TRANSFER_VIDEO: tuple[TransferMode, ...] = ("auto", "lossless", "near-lossless", "exact")
TRANSFER_ENCODE: tuple[TransferMode, ...] = ("lossless", "exact")
TRANSFER_LOADER: tuple[TransferMode, ...] = (
    "exact",
    "lossless",
)  # exact first: equal to the file loaded here
PIXEL_TRANSFERS: tuple[TransferMode, ...] = ("auto", "lossless", "near-lossless")  # uint8 [N,H,W,3] answers

DEFAULT_TIMEOUT = 300
MIN_TIMEOUT = 5
MAX_TIMEOUT = 3600

CATEGORY = "latent/remote"


def preset_choices(video_only: bool = False) -> list[str]:
    """["auto", *preset names] for the preset widget (video presets only for the video node)."""
    from ..remote.presets import PRESETS  # torch comes with it: only when ComfyUI asks for the inputs

    names = [name for name, p in PRESETS.items() if not video_only or p.is_video_model]
    return [AUTO, *names]
