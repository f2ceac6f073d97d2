"""Memory: what one request needs at its peak (checked against the server's budgets before any work),
and deciding, before running, whether a job runs whole, split by batch, or tiled.

Estimates come from the preset (ComfyUI's formulas); the budget from the device's free memory. When
a plan still runs out of memory, `smaller_plans` yields the next ones to try.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..remote.presets import Preset
from ..remote.protocol import MIN_TILE_SIZE

MIN_TILE = MIN_TILE_SIZE  # latent pixels (the smallest tile the wire accepts)
DEFAULT_TILE = 64  # latent pixels (512 image pixels for 8x models)
# Peak host bytes of the conversions around a job per value of its pixel tensor (decode: the answer,
# [B*F,3,H,W]; encode: the input), measured at 2048x2048: 12.3 for uint8, PNG, JPEG and [0,1] answers,
# 8.1 for float32 tensor answers; 9 to 13 for encode inputs (float or uint8 tensors, PNG files).
HOST_BYTES_PER_VALUE = 13
# Activations of an audio VAE per sample, decode and encode alike: ComfyUI's estimate for Stable Audio's.
AUDIO_MEMORY_PER_SAMPLE = 1000
DEVICE_SHARE = 0.9  # of a CUDA device's memory that one request may need


@dataclass(frozen=True)
class Footprint:
    """Estimated peak bytes of one request, checked before any work (`Limits.check_memory`).

    host: the body and its parsed copy, the conversions of the pixel tensor, and on a CPU device the
    activations too; device: the pixel tensor in the model's dtype and in the answer's, plus the
    activations of the smallest plan the runner can fall back to. `what` names the pixel tensor.
    """

    host: int
    device: int
    what: str


def decode_footprint(
    preset: Preset, latent: tuple[int, ...], dtype: torch.dtype, device: torch.device, body: int
) -> Footprint:
    """A decode of `latent` ([B,C,h,w] or [B,C,T,h,w], unpacked) by a model in `dtype` on `device`."""
    height, width = latent[-2:]
    frames = preset.frames_for(latent[2]) if len(latent) == 5 else 1
    s = preset.spatial_compression
    values = latent[0] * 3 * frames * height * s * width * s
    least = _least_activations(decode_bytes(preset, latent, dtype), MIN_TILE, (height, width))
    return _footprint(
        body, values, dtype, least, device, f"an answer of {values} pixel values and its conversions"
    )


def encode_footprint(
    preset: Preset, pixels: tuple[int, ...], dtype: torch.dtype, device: torch.device, body: int
) -> Footprint:
    """An encode of `pixels` ([B,3,H,W] or [B,3,F,H,W], cropped) by a model in `dtype` on `device`."""
    values = 1
    for size in pixels:
        values *= size
    least = _least_activations(
        encode_bytes(preset, pixels, dtype), MIN_TILE * preset.spatial_compression, pixels[-2:]
    )
    return _footprint(
        body, values, dtype, least, device, f"{values} input pixel values and their conversions"
    )


def audio_footprint(
    audio: tuple[int, ...], per_clip: int, steps: int, dtype: torch.dtype, device: torch.device, body: int
) -> Footprint:
    """A decode to, or an encode of, audio [B,channels,samples] (`steps` latent steps a clip), one clip of
    which needs `per_clip` bytes of activations (the backend's estimate); the least plan tiles a clip
    at MIN_TILE latent steps."""
    values = audio[0] * audio[1] * audio[2]
    least = int(per_clip * min(1.0, MIN_TILE / max(1, steps)))
    return _footprint(
        body, values, dtype, least, device, f"{values} audio sample values and their conversions"
    )


def audio_bytes(samples: int, dtype: torch.dtype) -> int:
    """Estimated peak bytes to decode or encode ONE clip of `samples` samples, until the model is
    loaded and gives its own estimate."""
    return int(AUDIO_MEMORY_PER_SAMPLE * samples * element_size(dtype))


def _least_activations(per_item: int, side: int, spatial: tuple[int, ...]) -> int:
    """Activations of the smallest plan: one item, tiled at `side` pixels per side (tiles are spatial)."""
    height, width = spatial
    return int(per_item * min(1.0, side * side / (height * width)))


def _footprint(
    body: int, values: int, dtype: torch.dtype, activations: int, device: torch.device, what: str
) -> Footprint:
    on_device = values * (element_size(dtype) + 4) + activations  # in the model's dtype, then the answer's
    host = 2 * body + values * HOST_BYTES_PER_VALUE + (activations if device.type == "cpu" else 0)
    return Footprint(host, on_device, what)


def host_total_bytes() -> int:
    """This machine's memory, or the container's when a cgroup limits it."""
    try:
        import psutil

        total = int(psutil.virtual_memory().total)
    except ImportError:  # pragma: no cover - psutil ships with the server extra's dependencies
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def device_budget(device: torch.device) -> int | None:
    """Bytes of a CUDA device one request may need (None for the CPU: the host's budget covers it)."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).total_memory * DEVICE_SHARE)


@dataclass(frozen=True)
class Plan:
    """How to run one job: `batch` items per call, and `tile` latent pixels per side (None = whole)."""

    batch: int
    tile: int | None = None

    @property
    def tiled(self) -> bool:
        return self.tile is not None

    @property
    def overlap(self) -> int:
        """Latent pixels neighbouring tiles share: 8, or a quarter of a smaller tile."""
        return min(8, (self.tile or 0) // 4)


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def decode_bytes(preset: Preset, latent_shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Estimated peak bytes to decode ONE batch item of `latent_shape` ([B,C,H,W] or [B,C,T,H,W])."""
    height, width = latent_shape[-2:]
    frames = latent_shape[2] if len(latent_shape) == 5 and preset.decode_memory_per_frame else 1
    return int(preset.decode_memory * height * width * frames * element_size(dtype))


def encode_bytes(preset: Preset, pixel_shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Estimated peak bytes to encode ONE batch item of `pixel_shape` ([B,3,H,W] or [B,3,F,H,W])."""
    height, width = pixel_shape[-2:]
    frames = pixel_shape[2] if len(pixel_shape) == 5 else 1
    return int(preset.encode_memory * height * width * frames * element_size(dtype))


def free_bytes(device: torch.device) -> int:
    """Memory a job may use on `device`: free CUDA memory, or available system memory on CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.9)
    try:
        import psutil

        return int(psutil.virtual_memory().available * 0.8)
    except ImportError:  # pragma: no cover - psutil ships with the server extra's dependencies
        return 8 << 30


def plan(
    per_item: int,
    batch: int,
    spatial: tuple[int, int],
    budget: int,
    *,
    tile: str = "auto",
    tile_size: int | None = None,
) -> Plan:
    """Choose a plan: whole if it fits, else split the batch, else tile.

    `tile` is "auto", "on" or "off" (our request extension); `tile_size` overrides the tile side in
    latent pixels.
    """
    if tile == "on":
        return Plan(batch=1, tile=_tile_side(per_item, spatial, budget, tile_size))
    if per_item * batch <= budget:
        return Plan(batch=batch)
    if per_item <= budget:
        return Plan(batch=max(1, budget // per_item))
    if tile == "off":  # tiling forbidden: one item at a time is the least we can ask for
        return Plan(batch=1)
    return Plan(batch=1, tile=_tile_side(per_item, spatial, budget, tile_size))


def _tile_side(per_item: int, spatial: tuple[int, int], budget: int, tile_size: int | None) -> int:
    if tile_size is not None:
        return max(MIN_TILE, tile_size)
    height, width = spatial
    per_pixel = per_item / max(1, height * width)
    side = int((budget / per_pixel) ** 0.5) if per_pixel > 0 else DEFAULT_TILE
    return max(MIN_TILE, min(side, DEFAULT_TILE, max(height, width)))


def smaller_plans(first: Plan, spatial: tuple[int, int]) -> Iterator[Plan]:
    """Plans to fall back to after an out-of-memory error, each needing less memory than the last."""
    current = first
    while True:
        if current.batch > 1:
            current = Plan(batch=max(1, current.batch // 2), tile=current.tile)
        elif current.tile is None:
            current = Plan(batch=1, tile=min(DEFAULT_TILE, max(spatial)))
        elif current.tile > MIN_TILE:
            current = Plan(batch=1, tile=max(MIN_TILE, current.tile // 2))
        else:
            return
        yield current
