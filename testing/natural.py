"""Natural pixels for tests and benchmarks: photographs that scikit-image ships, and a clip made from one.

Random-weight decoders give noise, which no lossless codec compresses; real decoder output looks like
photographs. So the codec tests and the transfer benchmarks send these (bench/models.py's natural
stand-ins and the tests' photo VAE decode to them). scikit-image comes with the test extra:

- `photos`: four distinct photographs (astronaut, coffee, rocket, immunohistochemistry), each centre-cropped
  to the aspect asked and resized (bicubic, antialiased) to it. At 1024x1024 they are upscaled 2-2.6x,
  so a little smoother than a camera's own 1024x1024 (codecs do slightly better on them).
- `clip`: a camera panning and zooming over the retina photograph (1411x1411), each frame resampled
  bicubically from the source: smooth motion, as a video decoder gives.

Everything is deterministic: the same call gives the same bytes in every process.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

PHOTOS = ("astronaut", "coffee", "rocket", "immunohistochemistry")
# The clip's path over the retina, in source pixels: view centre and view width at its first and last frame.
CLIP_START = ((560.0, 600.0), 1200.0)  # (row, column), width
CLIP_END = ((800.0, 820.0), 700.0)
FRAME_BATCH = 9  # frames resampled at once (bounds the float32 working set)


@functools.cache
def _source(name: str) -> torch.Tensor:
    """A scikit-image photograph as float32 [1,3,H,W] in 0..255."""
    from skimage import data

    image = getattr(data, name)()
    return torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1)[None].float()


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """float32 [N,3,H,W] in about 0..255 -> uint8 [N,H,W,3]."""
    return x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def photo(index: int, height: int, width: int) -> np.ndarray:
    """Photograph `index` (mod 4) as uint8 [H,W,3]: centre-cropped to the aspect height:width, resized."""
    source = _source(PHOTOS[index % len(PHOTOS)])
    rows, cols = source.shape[-2:]
    scale = min(rows / height, cols / width)
    crop_h, crop_w = round(height * scale), round(width * scale)
    top, left = (rows - crop_h) // 2, (cols - crop_w) // 2
    cropped = source[..., top : top + crop_h, left : left + crop_w]
    resized = F.interpolate(
        cropped, size=(height, width), mode="bicubic", align_corners=False, antialias=True
    )
    return _to_uint8(resized)[0]


def photos(count: int, height: int, width: int) -> np.ndarray:
    """`count` photographs (0, 1, 2, 3, 0, ...) as uint8 [count,H,W,3]."""
    return np.stack([photo(i, height, width) for i in range(count)])


def clip(frames: int, height: int, width: int) -> np.ndarray:
    """`frames` frames of a pan and zoom over the retina photograph as uint8 [F,H,W,3]."""
    source = _source("retina")
    rows, cols = source.shape[-2:]
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    for first in range(0, frames, FRAME_BATCH):
        count = min(FRAME_BATCH, frames - first)
        t = torch.arange(first, first + count, dtype=torch.float64) / max(1, frames - 1)
        (r0, c0), w0 = CLIP_START
        (r1, c1), w1 = CLIP_END
        centre_r, centre_c = r0 + (r1 - r0) * t, c0 + (c1 - c0) * t
        view_w = w0 * (w1 / w0) ** t  # a steady zoom: the same factor from frame to frame
        view_h = view_w * height / width
        # affine_grid's theta maps output coordinates in [-1,1] to source coordinates in [-1,1]
        theta = torch.zeros(count, 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = view_w / cols
        theta[:, 0, 2] = 2 * centre_c / cols - 1
        theta[:, 1, 1] = view_h / rows
        theta[:, 1, 2] = 2 * centre_r / rows - 1
        grid = F.affine_grid(theta.float(), [count, 3, height, width], align_corners=False)
        views = F.grid_sample(
            source.expand(count, -1, -1, -1), grid, mode="bicubic", padding_mode="border", align_corners=False
        )
        out[first : first + count] = _to_uint8(views)
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 arrays in dB (inf when equal)."""
    mse = float(np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
