"""Deciding, before running, whether a job runs whole, split by batch, or tiled.

Estimates come from the preset (ComfyUI's formulas); the budget from the device's free memory. When
a plan still runs out of memory, `smaller_plans` yields the next ones to try.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..remote.presets import Preset
from ..remote.protocol import MIN_TILE_SIZE

MIN_TILE = MIN_TILE_SIZE  # latent pixels (the smallest tile the wire accepts)
DEFAULT_TILE = 64  # latent pixels (512 image pixels for 8x models)


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
