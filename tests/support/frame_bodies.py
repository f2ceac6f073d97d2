"""Compressed-frames answers made by hand with remote/frames.py, and a stub model server that gives them:
for client tests that do not need the real server's codec support."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from remote_vae.remote import frames

from . import stub_servers
from .stub_servers import Canned, Recorded, Stub

STATS = {"render_seconds": 0.001, "encode_seconds": 0.002, "encode_threads": 2}


def natural_pixels(count: int, height: int, width: int) -> np.ndarray:
    """uint8 [count,H,W,3] crops of a photograph that scikit-image ships (natural content compresses)."""
    from skimage import data

    photo = data.astronaut()
    return np.stack([photo[i * 7 : i * 7 + height, i * 5 : i * 5 + width] for i in range(count)])


def frames_body(pixels: np.ndarray, codec: frames.Codec = "jxl", stats: dict | None = None) -> bytes:
    """MAGIC, one record per jxl frame (h264rgb: per H264_FRAMES_PER_RECORD frames), the end record."""
    step = 1 if codec == "jxl" else frames.H264_FRAMES_PER_RECORD
    parts = [frames.MAGIC]
    for first in range(0, len(pixels), step):
        chunk = pixels[first : first + step]
        payload = frames.encode(codec, chunk) if codec == "jxl" else frames.near_lossless_encode(chunk)
        parts += [frames.record_header(first, len(chunk), len(payload)), payload]
    parts.append(frames.end_record(len(pixels), STATS if stats is None else stats))
    return b"".join(parts)


def frames_answer(pixels: np.ndarray, body: bytes, codec: str = "jxl", chunked: bool = True) -> Canned:
    headers = [
        ("Content-Type", frames.FRAMES_TYPE),
        ("shape", json.dumps(list(pixels.shape))),
        ("dtype", "uint8"),
        (frames.CODEC_HEADER, codec),
    ]
    return Canned(200, headers, body, length_header=not chunked)


def raw_answer(pixels: np.ndarray) -> Canned:
    return stub_servers.tensor_answer(torch.from_numpy(pixels))


def model_list(codecs: list[str], dtype: str = "float32") -> Canned:
    entry = {
        "name": "sd15",
        "backend": "diffusers",
        "dtype": dtype,
        "geometry": {"dims": "image", "latent_channels": 4, "spatial_compression": 8},
    }
    body = json.dumps({"models": [entry], "default": "sd15", "codecs": codecs}).encode()
    return Canned(200, [("Content-Type", "application/json")], body)


@contextmanager
def pixel_server(pixels: np.ndarray, codecs: list[str] = ["jxl"]) -> Iterator[Stub]:  # noqa: B006
    """A stub sd15 server: its model list offers `codecs`; a decode answers `pixels`, compressed when the
    request asks for a codec it offers."""
    bodies = {codec: frames_body(pixels, codec) for codec in codecs}

    def respond(request: Recorded, index: int) -> Canned:
        if request.path.endswith("/v1/models"):
            return model_list(codecs)
        codec = dict(request.query_items).get("codec")
        return frames_answer(pixels, bodies[codec], codec) if codec in bodies else raw_answer(pixels)

    with stub_servers.serve(respond) as stub:
        yield stub
