"""Answers taken as they arrive (remote/receiving.py): raw uint8 bands and compressed frames, through real
HTTP from stub servers on 127.0.0.1 whose bodies remote/frames.py made."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from remote_vae.remote import frames, protocol
from remote_vae.remote.client import RemoteVAEError, remote_decode
from remote_vae.remote.receiving import Target, receiver_for
from remote_vae.remote.sending import send
from support import frame_bodies, stub_servers
from support.stub_servers import Canned

pytestmark = pytest.mark.timeout(60)

PIXELS = frame_bodies.natural_pixels(3, 48, 40)
LATENT = torch.zeros(3, 4, 6, 5)  # what decodes to 3 x 48x40 with an 8x VAE
JXL = protocol.Extensions(codec="jxl")


def decode(url: str, extensions: protocol.Extensions | None = JXL, **kwargs):
    kwargs.setdefault("return_type", "pt")
    return remote_decode(
        url, LATENT, output_type="pt", partial_postprocess=True, extensions=extensions, retries=0, **kwargs
    )


def test_jxl_frames_decode_to_the_same_bytes_as_raw():
    body = frame_bodies.frames_body(PIXELS)
    with stub_servers.recorder(frame_bodies.frames_answer(PIXELS, body)) as stub:
        got = decode(stub.url + "sd15")
        images = decode(stub.url + "sd15", return_type="pil")
    assert ("codec", "jxl") in stub.requests[0].query_items
    assert got.dtype == torch.uint8 and torch.equal(got, torch.from_numpy(PIXELS))
    assert np.array_equal(np.stack([np.asarray(image) for image in images]), PIXELS)
    assert all(isinstance(image, Image.Image) and image.size == (40, 48) for image in images)


def test_one_jxl_frame_gives_one_image_and_expected_shape_is_checked():
    one = PIXELS[:1]
    answer = frame_bodies.frames_answer(one, frame_bodies.frames_body(one))
    with stub_servers.recorder(answer) as stub:
        image = decode(stub.url, return_type="pil")
        assert np.array_equal(np.asarray(image), one[0])
        with pytest.raises(RemoteVAEError, match=r"answered 200 with a tensor of shape \[1, 48, 40, 3\]"):
            decode(stub.url, expected_shape=[2, 48, 40, 3])


def test_near_lossless_frames_are_within_the_bound():
    video = frame_bodies.natural_pixels(frames.H264_FRAMES_PER_RECORD + 2, 64, 64)  # two records
    body = frame_bodies.frames_body(video, "h264rgb")
    with stub_servers.recorder(frame_bodies.frames_answer(video, body, "h264rgb")) as stub:
        got = decode(stub.url, extensions=protocol.Extensions(codec="h264rgb"))
    assert got.shape == video.shape
    assert frames.max_error(got.numpy(), video) <= frames.NEAR_LOSSLESS_MAX_ERROR


FULL = frame_bodies.frames_body(PIXELS)
END = len(frames.end_record(3, frame_bodies.STATS))


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (frame_bodies.damaged(FULL), "does not decode to 1x48x40x3 pixels"),
        (FULL[:-END], "the body ended after 3 of 3 frames, without its end record"),
        (b"GIF89a" + FULL[4:], "the body does not start with"),
        (FULL + b"x", "1 bytes follow the end record"),
        (frames.MAGIC + frames.record_header(0, 5, 10) + bytes(10), r"a record holds frames 0..4"),
    ],
    ids=["corrupt", "truncated", "magic", "trailing", "too-many-frames"],
)
def test_a_bad_compressed_answer_is_a_remote_vae_error_naming_the_endpoint(body, problem):
    with stub_servers.recorder(frame_bodies.frames_answer(PIXELS, body)) as stub:
        with pytest.raises(RemoteVAEError, match=problem) as caught:
            decode(stub.url + "sd15")
    assert caught.value.endpoint == stub.url + "sd15" and caught.value.status == 200
    assert "with a jxl body that does not hold the frames its headers declare" in str(caught.value)


def test_an_unknown_codec_or_a_bad_shape_is_refused_before_any_frame():
    answer = frame_bodies.frames_answer(PIXELS, FULL, codec="webp")
    with stub_servers.recorder(answer) as stub, pytest.raises(RemoteVAEError, match="compressed by 'webp'"):
        decode(stub.url)
    grey = Canned(
        200, [("Content-Type", frames.FRAMES_TYPE), ("shape", "[3,48,40,1]"), ("dtype", "uint8")], FULL
    )
    with (
        stub_servers.recorder(grey) as stub,
        pytest.raises(RemoteVAEError, match="should give \\[N,H,W,3\\]"),
    ):
        decode(stub.url)
    huge = Canned(200, [*answer.headers[:1], ("shape", "[100000,4800,4000,3]"), ("dtype", "uint8")], FULL)
    with stub_servers.recorder(huge) as stub, pytest.raises(RemoteVAEError, match="nothing was allocated"):
        decode(stub.url)


def _float_target() -> tuple[Target, np.ndarray]:
    image = np.full(PIXELS.shape, -1.0, dtype=np.float32)
    return Target(image), image


def test_raw_bands_are_converted_as_they_arrive_to_the_same_values():
    target, image = _float_target()
    trickled = frame_bodies.raw_answer(PIXELS)
    trickled = Canned(200, trickled.headers, trickled.body, trickle=0.001, chunk=997)  # odd-sized bands
    wire = protocol.build_decode_request(LATENT, output_type="pt", partial_postprocess=True)
    with stub_servers.recorder(trickled) as stub:
        reply = send(stub.url, wire, receiver=receiver_for(lambda _: target, list(PIXELS.shape)), retries=0)
    assert reply.body == b"" and reply.body_length == PIXELS.size
    assert np.array_equal(image, PIXELS / np.float32(255.0)) and image.dtype == np.float32
    assert reply.transfer.receive_seconds > 0 and reply.transfer.bytes_received == PIXELS.size


def test_a_cut_off_raw_answer_is_retried_into_the_same_place():
    target, image = _float_target()
    raw = frame_bodies.raw_answer(PIXELS)
    cut = Canned(200, raw.headers, raw.body[: PIXELS.size // 2], content_length=PIXELS.size)
    wire = protocol.build_decode_request(LATENT, output_type="pt", partial_postprocess=True)
    with stub_servers.flaky(1, cut, raw) as stub:
        reply = send(stub.url, wire, receiver=receiver_for(lambda _: target, None), retries=1, backoff=0.01)
    assert len(stub.requests) == 2 and reply.transfer.attempts == 2
    assert np.array_equal(image, PIXELS / np.float32(255.0))


def test_a_raw_answer_of_the_wrong_length_says_so():
    target, _ = _float_target()
    raw = frame_bodies.raw_answer(PIXELS)
    chunked = Canned(200, raw.headers, raw.body[:-3], length_header=False)  # no Content-Length to check first
    wire = protocol.build_decode_request(LATENT, output_type="pt", partial_postprocess=True)
    with stub_servers.recorder(chunked) as stub, pytest.raises(RemoteVAEError, match="body has 17277 bytes"):
        send(stub.url, wire, receiver=receiver_for(lambda _: target, None), retries=0)


def test_a_server_that_ignores_the_codec_answers_raw_and_that_is_read_too():
    with stub_servers.recorder(frame_bodies.raw_answer(PIXELS)) as stub:
        got = decode(stub.url)
    assert ("codec", "jxl") in stub.requests[0].query_items
    assert torch.equal(got, torch.from_numpy(PIXELS))
