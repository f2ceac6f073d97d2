"""Spatial tiling with overlap and feathered blending, for latents and images too big to run whole.

Each tile is run on its own, then tiles are blended with linear ramps across the overlaps, so the
result has no hard seams. GroupNorm statistics differ per tile, so a tiled result is close to, not
equal to, the untiled one; `tests/server/test_tiling.py` measures and bounds that difference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

TileFn = Callable[[torch.Tensor], torch.Tensor]


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering [0, size) with tiles of `tile` overlapping by at least `overlap`."""
    if tile >= size:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)  # last tile flush with the edge, overlapping more if needed
    return starts


def _ramp(length: int, overlap: int, rise: bool, fall: bool) -> torch.Tensor:
    """1-D blend weights: linear ramps of `overlap` samples on the sides that touch another tile."""
    weights = torch.ones(length)
    if overlap <= 0:
        return weights
    ramp = (torch.arange(overlap, dtype=torch.float32) + 1) / (overlap + 1)
    n = min(overlap, length)
    if rise:
        weights[:n] = torch.minimum(weights[:n], ramp[:n])
    if fall:
        weights[-n:] = torch.minimum(weights[-n:], ramp[:n].flip(0))
    return weights


def run_tiled(
    fn: TileFn,
    x: torch.Tensor,
    *,
    tile: int,
    overlap: int,
    scale: float,
) -> torch.Tensor:
    """Apply `fn` to overlapping spatial tiles of `x` ([..., H, W]) and blend the outputs.

    `scale` is output pixels per input pixel (8 for decode, 1/8 for encode). `tile` and `overlap` are in
    input units. Leading dimensions (batch, channels, frames) are whatever `fn` returns.
    """
    height, width = x.shape[-2:]
    if overlap * 2 >= tile:
        raise ValueError(f"tile overlap {overlap} must be less than half the tile size {tile}")
    ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    out_h, out_w = round(height * scale), round(width * scale)
    out = None
    weight_sum = torch.zeros(out_h, out_w, dtype=torch.float32, device=x.device)
    o_ov = max(0, round(overlap * scale))
    for y0 in ys:
        for x0 in xs:
            y1, x1 = min(y0 + tile, height), min(x0 + tile, width)
            piece = fn(x[..., y0:y1, x0:x1]).float()
            if out is None:
                out = torch.zeros(*piece.shape[:-2], out_h, out_w, dtype=torch.float32, device=piece.device)
            oy0, ox0 = round(y0 * scale), round(x0 * scale)
            ph, pw = piece.shape[-2:]
            wy = _ramp(ph, o_ov, rise=y0 > 0, fall=y1 < height).to(piece.device)
            wx = _ramp(pw, o_ov, rise=x0 > 0, fall=x1 < width).to(piece.device)
            w = wy[:, None] * wx[None, :]
            out[..., oy0 : oy0 + ph, ox0 : ox0 + pw] += piece * w
            weight_sum[oy0 : oy0 + ph, ox0 : ox0 + pw] += w
    assert out is not None
    return out / weight_sum.clamp_min(1e-8)
