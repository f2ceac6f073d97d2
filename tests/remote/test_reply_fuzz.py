"""Fuzz the reply parser: whatever headers and body come back, only RemoteVAEError escapes `Reply`'s
checks and `remote_decode` / `remote_encode` (so a caller's fallback always runs)."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.video_processor import VideoProcessor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from remote_vae.remote import RemoteVAEError, Reply, Transfer, protocol, remote_decode, remote_encode
from remote_vae.remote.bounds import ReplyLimits
from support.stub_servers import Canned, serve

pytestmark = pytest.mark.timeout(300)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPE_NAMES = [*protocol.DTYPES, "float64", "int8", "", "float16 ", "FLOAT16"]


def _image(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (10, 200, 30)).save(buffer, format=fmt)
    return buffer.getvalue()


IMAGES = [_image("PNG"), _image("JPEG"), _image("GIF"), _image("BMP"), _image("WEBP")]

dims = st.one_of(
    st.integers(-2, 9), st.integers(-(2**70), 2**70), st.floats(), st.booleans(), st.text(max_size=3)
)
json_shapes = st.recursive(
    st.lists(dims, max_size=7), lambda inner: st.lists(inner, max_size=3), max_leaves=12
).map(json.dumps)
shape_headers = st.one_of(
    json_shapes,
    st.text(max_size=40),
    st.integers(1, 5000).map(lambda depth: "[" * depth + "]" * depth),
    st.integers(1, 6000).map(lambda digits: f"[{'7' * digits}]"),
)


@st.composite
def bodies(draw, shape_header: str, dtype: str) -> bytes:
    """Mostly a body of the length the headers describe (so parsing goes all the way), else anything."""
    try:
        shape = json.loads(shape_header)
        exact = math.prod(shape) * protocol.DTYPES[dtype].itemsize
    except Exception:  # the headers describe nothing: any body will do
        exact = None
    if isinstance(exact, int) and 0 <= exact <= 4096 and draw(st.booleans()):
        return draw(st.binary(min_size=exact, max_size=exact))
    return draw(st.binary(max_size=512))


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(IMAGES)))
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


@st.composite
def replies(draw) -> Reply:
    headers = {}
    if draw(st.booleans()):
        headers["shape"] = draw(shape_headers)
    if draw(st.booleans()):
        headers["dtype"] = draw(st.sampled_from(DTYPE_NAMES))
    if draw(st.booleans()):
        body = draw(mutated_images())
    else:
        body = draw(bodies(headers.get("shape", ""), headers.get("dtype", "")))
    limits = ReplyLimits(max_pixels=draw(st.sampled_from([10, 48, 1 << 28])))
    return Reply(body, headers, Transfer("http://h:8190/sd15", 200, 0, len(body), 0.0, 1), limits)


expected_shapes = st.one_of(st.none(), st.lists(st.one_of(st.none(), st.integers(-1, 9)), max_size=6))


def only_remote_errors(call) -> None:
    """Any other exception escapes and fails the test."""
    with contextlib.suppress(RemoteVAEError):
        call()


@FUZZ
@given(reply=replies(), expected=expected_shapes, size=st.one_of(st.none(), st.just((8, 6))))
def test_reply_checks_raise_only_remote_errors(reply, expected, size):
    only_remote_errors(lambda: reply.tensor(expected))
    only_remote_errors(lambda: reply.tensor(dtype="float"))
    only_remote_errors(lambda: reply.tensor(dtype=torch.uint8, meaning="a test"))
    only_remote_errors(lambda: reply.uint8_frames(expected))
    only_remote_errors(lambda: reply.float_frames(expected))
    only_remote_errors(lambda: reply.decoder_output(expected))
    only_remote_errors(lambda: reply.decoder_output(video=True))
    only_remote_errors(lambda: reply.image(size))
    only_remote_errors(lambda: reply.mp4())


# Every way remote_decode reads a reply: (output_type, return_type, partial_postprocess, processor).
READERS = [
    ("pil", "pil", False, None),
    ("pil", "pt", False, None),
    ("pil", "pil", False, VideoProcessor()),
    ("pil", "pt", False, VideoProcessor()),
    ("pt", "pil", True, None),
    ("pt", "pt", True, None),
    ("pt", "pt", False, None),
    ("pt", "pil", False, VaeImageProcessor()),
    ("pt", "pil", False, VideoProcessor()),
    ("pt", "mp4", False, VaeImageProcessor()),
    ("mp4", "mp4", False, None),
]


@pytest.fixture(scope="module")
def canned_server():
    """One stub server whose answer each example sets."""
    holder: list[Canned] = [Canned()]
    with serve(lambda request, index: holder[0]) as stub:
        yield stub, holder


@FUZZ
@given(reply=replies(), reader=st.sampled_from(READERS), encode=st.booleans())
def test_remote_decode_and_encode_raise_only_remote_errors_over_http(canned_server, reply, reader, encode):
    stub, holder = canned_server
    # Header values as HTTP can carry them: printable ASCII.
    headers = [(key, "".join(c for c in value if " " <= c <= "~")) for key, value in reply.headers.items()]
    holder[0] = Canned(200, headers, reply.body)
    output_type, return_type, partial, processor = reader
    latent = torch.zeros((1, 16, 1, 1, 1) if isinstance(processor, VideoProcessor) else (1, 4, 1, 1))
    if encode:
        only_remote_errors(lambda: remote_encode(stub.url, torch.zeros(1, 3, 8, 8), retries=0))
        return
    only_remote_errors(
        lambda: remote_decode(stub.url, latent, processor, output_type=output_type, return_type=return_type,
                              partial_postprocess=partial, do_scaling=False, retries=0)
    )  # fmt: skip
