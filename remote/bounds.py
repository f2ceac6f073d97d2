"""How large a reply to a request can be, known before it arrives: the client refuses anything larger
while it streams in (bytes) and before it decodes an image (declared pixels).

The client does not know the model, so the bounds use the largest compression any VAE family has
(32x spatial, 8x temporal: LTX-Video, DC-AE), more than any preset: a decode of a latent [B,C,H,W]
([B,C,T,H,W]) gives at most B x (T x 8) x (H x 32) x (W x 32) pixels (packed latents: B x height x
width), each at most 4 channels of float32. An audio latent [B,C,L] (3-D without height and width)
gives at most B x (L x 4096) samples, counted as pixels: at most 4 channels of float32. An encode gives a latent with no more values than the
pixels it came from, each at most a float32. Requests the bound cannot read get the absolute caps.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from PIL import Image

from . import protocol

MAX_SPATIAL_COMPRESSION = 32
MAX_AUDIO_COMPRESSION = 4096  # samples per latent step (ACE-Step; Stable Audio: 2048)
MAX_TEMPORAL_COMPRESSION = 8
MAX_BYTES_PER_PIXEL = 4 * 4  # RGBA x float32
MAX_BYTES_PER_VALUE = 4  # float32
OVERHEAD = 1 << 20  # image, video container and header bytes on top of the pixels; the smallest bound
MAX_REPLY_BYTES = 4 << 30  # absolute cap, whatever the request (pass max_reply_bytes=... for more)
MAX_REPLY_PIXELS = 1 << 28  # absolute cap on an image reply's declared width x height


@dataclass(frozen=True)
class ReplyLimits:
    """The most a reply may hold: `max_bytes` of body, `max_pixels` in a declared image."""

    max_bytes: int = MAX_REPLY_BYTES
    max_pixels: int = MAX_REPLY_PIXELS


def limits_for(wire: protocol.WireRequest) -> ReplyLimits:
    """The limits a reply to `wire` must keep; the absolute caps when the request does not say."""
    try:
        operation = protocol.operation_for(wire.headers.get("Content-Type"))
        query = protocol.parse_query(wire.params)
        if operation == "decode":
            pixels = _decoded_pixels(query)
            return _capped(pixels * MAX_BYTES_PER_PIXEL, pixels)
        values = _encoded_values(query, wire.body)
        return _capped(values * MAX_BYTES_PER_VALUE, MAX_REPLY_PIXELS)
    except (ValueError, OSError, Image.DecompressionBombError):  # the server will say what is wrong
        return ReplyLimits()


def _capped(nbytes: int, pixels: int) -> ReplyLimits:
    return ReplyLimits(min(nbytes + OVERHEAD, MAX_REPLY_BYTES), min(pixels, MAX_REPLY_PIXELS))


def _decoded_pixels(query: dict[str, list[str]]) -> int:
    shape = protocol.parse_shape_params(query)
    if len(shape) == 3:  # packed latents carry the image size; audio latents [B,C,L] carry none
        height = protocol.parse_int(query.get("height", [None])[-1], "height")
        width = protocol.parse_int(query.get("width", [None])[-1], "width")
        if height is None and width is None:
            return shape[0] * shape[2] * MAX_AUDIO_COMPRESSION  # samples, each counted as a pixel
        if height is None or width is None:
            raise protocol.ProtocolError("packed latents without height and width")
        return shape[0] * height * width
    frames = shape[2] * MAX_TEMPORAL_COMPRESSION if len(shape) == 5 else 1
    return shape[0] * frames * math.prod(shape[-2:]) * MAX_SPATIAL_COMPRESSION**2


def _encoded_values(query: dict[str, list[str]], body: bytes) -> int:
    if "shape" in query:  # a raw tensor: one latent value per pixel value at most
        return math.prod(protocol.parse_shape_params(query))
    with Image.open(io.BytesIO(body)) as image:  # the header only: our own image's declared size
        width, height = image.size
    return width * height * 3
