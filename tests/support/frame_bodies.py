"""Compressed-frames answers made by hand with remote/frames.py, and a stub model server that gives them:
for client tests that do not need the real server's codec support."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from remote_vae.remote import frames
from remote_vae.testing import natural

from . import stub_servers
from .stub_servers import Canned, Recorded, Stub

STATS = {"render_seconds": 0.001, "encode_seconds": 0.002, "encode_threads": 2}


def natural_pixels(count: int, height: int, width: int) -> np.ndarray:
    """uint8 [count,H,W,3] photographs (natural content compresses; remote_vae.testing.natural)."""
    return natural.photos(count, height, width)


def frames_body(pixels: np.ndarray, codec: frames.Codec = "jxl", stats: dict | None = None) -> bytes:
    """MAGIC, the records `frames.record_spans` cuts the frames into, the end record."""
    parts = [frames.MAGIC]
    for first, count in frames.record_spans(len(pixels), codec):
        payload = frames.encode(codec, pixels[first : first + count])
        parts += [frames.record_header(first, count, len(payload)), payload]
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


SD15 = {"dims": "image", "latent_channels": 4, "spatial_compression": 8}
WAN21 = {"dims": "video", "latent_channels": 16, "spatial_compression": 8, "temporal_compression": 4}


def model_list(
    codecs: list[str],
    dtype: str = "float32",
    name: str = "sd15",
    geometry: dict = SD15,
    upload_encodings: tuple[str, ...] = (),
) -> Canned:
    entry = {"name": name, "backend": "diffusers", "dtype": dtype, "geometry": geometry}
    listing = {"models": [entry], "default": name, "codecs": codecs}
    if upload_encodings:
        listing["upload_encodings"] = list(upload_encodings)
    body = json.dumps(listing).encode()
    return Canned(200, [("Content-Type", "application/json")], body)


@contextmanager
def pixel_server(
    pixels: np.ndarray,
    codecs: tuple[str, ...] = ("jxl",),
    *,
    dtype: str = "float32",
    corrupt: bool = False,
    video: bool = False,
    upload_encodings: tuple[str, ...] = (),
) -> Iterator[Stub]:
    """A stub sd15 (`video`: wan21) server: its model list offers `codecs` (and `upload_encodings`), its
    model runs in `dtype`; a decode answers `pixels`, compressed when the request asks for a codec it
    offers (`corrupt`: damaged)."""
    model = ("wan21", WAN21) if video else ("sd15", SD15)
    listing = model_list(list(codecs), dtype, *model, upload_encodings=upload_encodings)
    bodies = {codec: frames_body(pixels, codec) for codec in codecs}
    if corrupt:
        bodies = {codec: damaged(body) for codec, body in bodies.items()}

    def respond(request: Recorded, index: int) -> Canned:
        if request.path.endswith("/v1/models"):
            return listing
        codec = dict(request.query_items).get("codec")
        return frames_answer(pixels, bodies[codec], codec) if codec in bodies else raw_answer(pixels)

    with stub_servers.serve(respond) as stub:
        yield stub


def damaged(body: bytes) -> bytes:
    """`body` with zeros over part of its first frame's codestream."""
    out = bytearray(body)
    start = len(frames.MAGIC) + frames.RECORD.size
    out[start + 20 : start + 60] = bytes(40)
    return bytes(out)
