"""The client always returns and never balloons: a total timeout, retries only of what a retry can fix,
replies no larger than the request can decode to, and every malformed reply a RemoteVAEError.
Each case runs against a real stub server on 127.0.0.1 sending the same kind of input."""

from __future__ import annotations

import gzip
import io
import re
import threading
import time
import tracemalloc

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from remote_vae.remote import (
    RemoteVAEError,
    RemoteVAETimeout,
    bounds,
    protocol,
    remote_decode,
    remote_encode,
    send,
)
from remote_vae.remote.presets import PRESETS
from support.stub_servers import (
    Canned,
    declared_jpeg,
    declared_png,
    flaky,
    gzip_bomb,
    json_error,
    proxy_error,
    recorder,
    refused_url,
    serve,
    tensor_answer,
    text_answer,
)

pytestmark = pytest.mark.timeout(60)

FAST = {"backoff": 0.01}
SLACK = 1.0  # seconds a bound may be passed by (polling, thread start, a loaded machine)


def latent(shape=(1, 4, 8, 8), dtype=torch.float16):
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)


OK = tensor_answer(latent((1, 3, 8, 8)))


def pt_wire(tensor=None):
    return protocol.build_decode_request(
        latent() if tensor is None else tensor, output_type="pt", do_scaling=False
    )


def elapsed(started: float) -> float:
    return time.monotonic() - started


# --------------------------------------------------------------------------- 12: the timeout bounds the whole call


def trickling(answer: Canned, seconds_per_byte: float) -> Canned:
    """The answer's headers at once, then its body one byte at a time: every recv is within the read timeout."""
    return Canned(answer.status, answer.headers, answer.body, trickle=seconds_per_byte, chunk=1)


def test_a_trickling_answer_ends_at_connect_plus_read_timeout():
    # One byte every 0.5 s keeps a 2 s read timeout happy for ever (384 bytes: over 3 minutes).
    with serve(lambda request, index: trickling(OK, 0.5)) as stub:
        started = time.monotonic()
        with pytest.raises(RemoteVAETimeout) as info:
            send(stub.url, pt_wire(), timeout=(1, 2))
        assert elapsed(started) < 3 + SLACK
    assert str(info.value).startswith(f"{stub.url} did not finish within 3 s (the total timeout of the call")
    assert info.value.status is None


def test_total_timeout_bounds_every_retry_and_back_off():
    # Cut-off answers are retried; each attempt trickles, and all of them together stop at the bound.
    cut = Canned(200, OK.headers, OK.body[:50], content_length=len(OK.body), trickle=0.2, chunk=1)
    with serve(lambda request, index: cut) as stub:
        started = time.monotonic()
        with pytest.raises(RemoteVAETimeout, match=r"did not finish within 1.5 s"):
            send(stub.url, pt_wire(), timeout=(5, 30), total_timeout=1.5, retries=10, backoff=0.2)
        assert elapsed(started) < 1.5 + SLACK


def test_total_timeout_must_be_positive():
    with pytest.raises(ValueError, match="total_timeout=0 must be positive seconds"):
        send("http://127.0.0.1:9/", pt_wire(), total_timeout=0)


def test_a_retry_after_longer_than_the_timeout_leaves_fails_at_once():
    busy = json_error(503, "scaling up", extra=[("Retry-After", "999999")])
    with flaky(99, busy, OK) as stub:
        started = time.monotonic()
        with pytest.raises(RemoteVAETimeout) as info:
            send(stub.url, pt_wire(), timeout=(5, 300), retries=3)
        assert elapsed(started) < SLACK
    assert len(stub.requests) == 1
    error = info.value
    assert (error.status, error.server_message) == (503, "scaling up")
    wording = r"answered 503 and asked to wait 999999 s before a retry \(Retry-After\), but the timeout leaves 30\d\.\d s"
    assert re.search(wording, str(error))


def test_a_back_off_that_would_pass_the_deadline_is_not_begun():
    with flaky(99, json_error(503, "down"), OK) as stub:
        started = time.monotonic()
        with pytest.raises(RemoteVAEError, match="answered 503: down"):
            send(stub.url, pt_wire(), total_timeout=2, retries=3, backoff=5)
        assert elapsed(started) < SLACK
    assert len(stub.requests) == 1


def test_fail_over_shares_one_deadline():
    with (
        serve(lambda request, index: trickling(OK, 0.3)) as a,
        serve(lambda request, index: trickling(OK, 0.3)) as b,
    ):
        started = time.monotonic()
        with pytest.raises(RemoteVAETimeout, match="did not finish within 2 s"):
            send([a.url, b.url], pt_wire(), timeout=(1, 5), total_timeout=2)
        assert elapsed(started) < 2 + SLACK
    assert len(a.requests) + len(b.requests) == 1  # the one attempt used the whole bound


# --------------------------------------------------------------------------- 13: retry only what a retry can fix

OWN_504 = json_error(504, "the request took longer than the server's limit of 300 s (--request-timeout)",
                     extra=[("x-request-id", "5f1c2a9e0b7d4c11")])  # fmt: skip


@pytest.mark.parametrize(
    "answer",
    [
        OWN_504,
        json_error(504, "deadline passed"),  # our JSON error shape, no request id
        Canned(504, [("x-request-id", "abc"), ("Content-Type", "text/plain")], b"timed out"),  # a request id
        json_error(502, "model worker died", extra=[("x-request-id", "abc")]),
        json_error(500, "CUDA error: out of memory"),
        text_answer(500, "<h1>Internal Server Error</h1>"),
    ],
    ids=["own-504", "json-504", "request-id-504", "own-502", "json-500", "html-500"],
)
def test_the_servers_own_failures_are_sent_once(answer):
    with flaky(99, answer, OK) as stub:
        with pytest.raises(RemoteVAEError) as info:
            send(stub.url, pt_wire(), retries=3, **FAST)
    assert len(stub.requests) == 1
    assert info.value.status == answer.status and not info.value.retryable
    assert "proxy" not in str(info.value)


def test_the_servers_own_504_says_its_limit_passed():
    with recorder(OWN_504) as stub:
        with pytest.raises(RemoteVAEError) as info:
            send(stub.url, pt_wire())
    assert str(info.value) == (
        f"{stub.url} answered 504: the request took longer than the server's limit of 300 s (--request-timeout) "
        "(hint: the server's own time limit for a request passed (its --request-timeout): send less at once, "
        "or raise that limit)"
    )


def test_our_real_servers_504_is_sent_once():
    """The rule above matches what our server answers when its --request-timeout passes."""
    from remote_vae.local_server.app import Settings, create_app
    from remote_vae.local_server.limits import Limits
    from remote_vae.local_server.registry import ModelRegistry
    from remote_vae.testing import random_vae
    from support import serving

    release = threading.Event()

    class Blocking(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        @property
        def config(self):
            return self.inner.config

        def decode(self, z):
            release.wait(30)
            return self.inner.decode(z)

    host = ModelRegistry()
    host.add("sd15", PRESETS["sd15"], model=Blocking(random_vae("sd15", 7)), device="cpu", dtype="float32")
    try:
        with serving.serve(create_app(host, Settings(limits=Limits(request_timeout=0.5)))) as url:
            try:
                with pytest.raises(RemoteVAEError, match="answered 504: .*hint: the server's own time limit"):
                    send(url + "/sd15", pt_wire(), retries=3, **FAST)
            finally:
                release.set()
            metrics = requests.get(url + "/metrics", timeout=10).text
    finally:
        host.close()
    answered = re.findall(r'remote_vae_requests_total\{[^}]*status="504"\} (\d+)', metrics)
    assert answered == ["1"]


@pytest.mark.parametrize("status", [502, 504])
def test_a_proxys_502_and_504_are_retried(status):
    with flaky(1, proxy_error(status), OK) as stub:
        reply = send(stub.url, pt_wire(), retries=1, **FAST)
    assert reply.transfer.attempts == 2 and len(stub.requests) == 2
    with flaky(99, proxy_error(status), OK) as stub:
        with pytest.raises(
            RemoteVAEError, match=f"answered {status}: {status} .*hint: a proxy in front"
        ) as info:
            send(stub.url, pt_wire(), retries=1, **FAST)
    assert info.value.retryable and len(stub.requests) == 2


@pytest.mark.parametrize(("answer", "requests_to_the_second"), [(OWN_504, 0), (proxy_error(502), 1)])
def test_fail_over_only_for_what_another_server_could_fix(answer, requests_to_the_second):
    with recorder(answer) as first, recorder(OK) as second:
        if requests_to_the_second:
            send([first.url, second.url], pt_wire(), **FAST)
        else:
            with pytest.raises(RemoteVAEError, match="answered 504"):
                send([first.url, second.url], pt_wire(), **FAST)
    assert (len(first.requests), len(second.requests)) == (1, requests_to_the_second)


@pytest.mark.parametrize("status", [408, 429, 503])
def test_statuses_that_say_nothing_ran_are_retried_whoever_sends_them(status):
    with flaky(1, json_error(status, "later", extra=[("x-request-id", "abc")]), OK) as stub:
        assert send(stub.url, pt_wire(), retries=1, **FAST).transfer.attempts == 2


# --------------------------------------------------------------------------- 14: no reply larger than the request can hold


def test_a_gzip_bomb_is_refused_without_inflating_it():
    bomb = gzip_bomb(400 << 20, headers=list(OK.headers))  # ~400 KB on the wire, 400 MiB inflated
    assert len(bomb.body) < 500_000
    with recorder(bomb) as stub:
        tracemalloc.start()
        try:
            started = time.monotonic()
            with pytest.raises(RemoteVAEError) as info:
                remote_decode(stub.url, latent(), output_type="pt", return_type="pt")
            seconds = elapsed(started)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    limit = bounds.limits_for(pt_wire()).max_bytes
    assert f"answered 200 with more than {limit} bytes, more than the {limit} bytes a reply" in str(
        info.value
    )
    assert peak < 4 * limit + (8 << 20)  # the whole body would be 400 MiB
    assert seconds < 5


def test_an_accepted_gzip_reply_is_decoded():
    packed = Canned(200, list(OK.headers) + [("Content-Encoding", "gzip")], gzip.compress(OK.body))
    with recorder(packed) as stub:
        reply = send(stub.url, pt_wire())
    assert torch.equal(reply.tensor(), protocol.parse_tensor_response(OK.body, dict(OK.headers)))
    assert reply.transfer.bytes_received == len(packed.body) != len(OK.body)
    assert stub.requests[0].header("Accept-Encoding") == "gzip, deflate"  # as diffusers sends it


@pytest.mark.parametrize("encoding", ["br", "zstd", "gzip, gzip", "compress"])
def test_an_encoding_that_was_not_asked_for_is_refused(encoding):
    with recorder(Canned(200, list(OK.headers) + [("Content-Encoding", encoding)], OK.body)) as stub:
        with pytest.raises(RemoteVAEError) as info:
            send(stub.url, pt_wire(), retries=3, **FAST)
    assert (
        f"answered 200 with Content-Encoding {encoding!r}, which was not asked for (it accepts gzip, deflate)"
        in str(info.value)
    )
    assert len(stub.requests) == 1


def test_a_corrupt_gzip_reply_is_an_error():
    with recorder(
        Canned(200, list(OK.headers) + [("Content-Encoding", "gzip")], b"\x1f\x8b" + bytes(50))
    ) as stub:
        with pytest.raises(RemoteVAEError, match="answered 200 with a gzip body that does not decompress"):
            send(stub.url, pt_wire())


def test_a_declared_length_over_the_bound_is_refused_before_the_body():
    lying = Canned(200, list(OK.headers), OK.body, content_length=10**12)
    with recorder(lying) as stub:
        with pytest.raises(
            RemoteVAEError, match=r"answered 200 with Content-Length 1000000000000, more than the \d+ bytes"
        ):
            send(stub.url, pt_wire(), retries=0)


def test_a_body_is_refused_as_soon_as_it_passes_the_bound():
    # 10 MB with no Content-Length, 16 KiB every 0.1 s (a minute in all): refused after ~100 KB.
    endless = Canned(200, list(OK.headers), bytes(10_000_000), trickle=0.1, chunk=16384, length_header=False)
    with recorder(endless) as stub:
        started = time.monotonic()
        with pytest.raises(
            RemoteVAEError, match="answered 200 with more than 100000 bytes, more than the 100000"
        ):
            send(stub.url, pt_wire(), max_reply_bytes=100_000)
        assert elapsed(started) < 3


def test_max_reply_bytes_must_be_positive():
    with pytest.raises(ValueError, match="max_reply_bytes=0 must be a positive number of bytes"):
        send("http://127.0.0.1:9/", pt_wire(), max_reply_bytes=0)


def test_a_png_declaring_12000_squared_is_refused_before_decoding():
    png = declared_png(12000, 12000, padding=140_000)  # 140 KB that would decode to 432 MB of pixels
    with recorder(Canned(200, [("Content-Type", "image/png")], png)) as stub:
        started = time.monotonic()
        with pytest.warns(Image.DecompressionBombWarning), pytest.raises(RemoteVAEError) as info:
            remote_decode(stub.url, latent(), image_format="png")
        assert elapsed(started) < 2
    assert "answered 200 with an image declaring 12000x12000 pixels, more than the 65536 pixels" in str(
        info.value
    )


def test_a_jpeg_bomb_is_an_error():
    with recorder(Canned(200, [("Content-Type", "image/jpeg")], declared_jpeg(12000, 12000))) as stub:
        with (
            pytest.warns(Image.DecompressionBombWarning),
            pytest.raises(RemoteVAEError, match="declaring 12000x12000"),
        ):
            remote_decode(stub.url, latent())
    # Past twice its own pixel limit Pillow refuses to open it at all (DecompressionBombError).
    with recorder(Canned(200, [("Content-Type", "image/jpeg")], declared_jpeg(60000, 60000))) as stub:
        with pytest.raises(
            RemoteVAEError, match=r"not an image \(\d+ bytes\): Image size \(3600000000 pixels\)"
        ):
            remote_decode(stub.url, latent())


def test_an_image_of_the_size_asked_for_is_still_decoded():
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, format="PNG")
    with recorder(Canned(200, [("Content-Type", "image/png")], buffer.getvalue())) as stub:
        image = remote_decode(stub.url, latent(), image_format="png")
    assert image.size == (64, 64) and image.getpixel((0, 0)) == (1, 2, 3)


def test_limits_from_the_request():
    four_d = bounds.limits_for(pt_wire(latent((2, 4, 8, 16))))
    pixels = 2 * 8 * 16 * 32 * 32
    assert four_d == bounds.ReplyLimits(pixels * 16 + bounds.OVERHEAD, pixels)
    video = bounds.limits_for(pt_wire(latent((1, 16, 3, 4, 4))))
    assert video.max_pixels == 3 * 8 * 4 * 4 * 32 * 32
    packed = protocol.build_decode_request(latent((1, 64, 16)), output_type="pt", height=128, width=64)
    assert bounds.limits_for(packed).max_pixels == 128 * 64
    raw = protocol.build_encode_request(torch.zeros(1, 3, 64, 32))
    assert bounds.limits_for(raw).max_bytes == 3 * 64 * 32 * 4 + bounds.OVERHEAD
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20)).save(buffer, format="PNG")
    png = protocol.build_encode_request(buffer.getvalue())
    assert bounds.limits_for(png).max_bytes == 40 * 20 * 3 * 4 + bounds.OVERHEAD
    assert bounds.limits_for(protocol.build_encode_request(b"not an image")) == bounds.ReplyLimits()
    huge = pt_wire(torch.zeros(64, 4, 512, 512, dtype=torch.float16))
    assert bounds.limits_for(huge) == bounds.ReplyLimits()  # the absolute caps


def test_audio_latents_are_bounded_by_the_largest_audio_compression():
    """[B,C,L] (3-D, no height/width) -> at most [B,4,L*4096] float32: ComfyUI's Stable Audio VAE gives
    [B,2,L*2048] float32, half of it; a reply over the bound is refused while it streams in."""
    wire = pt_wire(latent((2, 64, 5)))
    samples = 2 * 5 * bounds.MAX_AUDIO_COMPRESSION
    assert bounds.limits_for(wire) == bounds.ReplyLimits(samples * 16 + bounds.OVERHEAD, samples)
    assert 2048 <= bounds.MAX_AUDIO_COMPRESSION
    stable_audio = torch.zeros(2, 2, 5 * 2048)
    with recorder(tensor_answer(stable_audio)) as stub:
        assert remote_decode(stub.url, latent((2, 64, 5)), output_type="pt", return_type="pt").shape == (
            2,
            2,
            10240,
        )
    limit = samples * 16 + bounds.OVERHEAD
    with recorder(tensor_answer(torch.zeros(limit // 4 + 1))) as stub:
        with pytest.raises(
            RemoteVAEError, match=f"more than the {limit} bytes a reply to this request can hold"
        ):
            remote_decode(stub.url, latent((2, 64, 5)), output_type="pt", return_type="pt")


def test_the_bounds_cover_every_preset():
    for preset in PRESETS.values():
        assert preset.spatial_compression <= bounds.MAX_SPATIAL_COMPRESSION
        assert preset.temporal_compression <= bounds.MAX_TEMPORAL_COMPRESSION


def test_an_encode_reply_within_the_bound_passes_and_a_larger_one_does_not():
    image = Image.new("RGB", (16, 16))
    with recorder(tensor_answer(latent((1, 4, 2, 2)))) as stub:
        assert remote_encode(stub.url, image).shape == (1, 4, 2, 2)
    limit = 16 * 16 * 3 * 4 + bounds.OVERHEAD
    too_big = tensor_answer(torch.zeros(limit // 2 + 1, dtype=torch.float16))
    with recorder(too_big) as stub:
        with pytest.raises(
            RemoteVAEError, match=f"more than the {limit} bytes a reply to this request can hold"
        ):
            remote_encode(stub.url, image)


# --------------------------------------------------------------------------- 15: malformed replies over HTTP


def test_a_deeply_nested_shape_header_is_a_remote_error():
    nested = Canned(200, [("shape", "[" * 30_000 + "]" * 30_000), ("dtype", "float16")], OK.body)
    with recorder(nested) as stub:
        with pytest.raises(RemoteVAEError, match="answered 200 with a bad tensor") as info:
            remote_decode(stub.url, latent(), output_type="pt", return_type="pt")
    assert len(str(info.value)) < 1000


def test_an_error_page_built_to_stall_a_pattern_returns_fast():
    # Quadratic HTML stripping took minutes on such pages; the message must come back at once.
    for page in ("<script" * 150_000, "<" * 1_000_000):
        with recorder(text_answer(400, page)) as stub:
            started = time.monotonic()
            with pytest.raises(RemoteVAEError, match="answered 400"):
                send(stub.url, pt_wire())
            assert elapsed(started) < 3


@pytest.mark.parametrize(
    "answer",
    [
        Canned(500, [("Content-Type", "application/json")], b"\xff\xfe\x00garbage{"),
        Canned(
            500,
            [("Content-Type", "application/json")],
            b'{"error": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        ),
        Canned(400, [("Content-Type", "application/json")], b'{"error": ' + b"9" * 10_000 + b"}"),
        Canned(500, [("Content-Encoding", "br")], b"\x00" * 20),
        Canned(500, [("Content-Encoding", "gzip")], b"\x1f\x8bnot gzip"),
    ],
    ids=["binary", "nested", "long-int", "unknown-encoding", "bad-gzip"],
)
def test_unreadable_error_bodies_are_remote_errors(answer):
    with recorder(answer) as stub:
        with pytest.raises(RemoteVAEError, match=f"answered {answer.status}"):
            send(stub.url, pt_wire(), retries=0)


def test_a_redirect_loop_is_a_remote_error():
    with recorder(Canned(302, [("Location", "/again")])) as stub:
        with pytest.raises(RemoteVAEError, match="failed: Exceeded 30 redirects"):
            send(stub.url, pt_wire())


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [("[1,3,8,8]", "float64"), ("[1,3,8,8]", "int8"), ("[0,3,8,8]", "float16"), ('["1",3,8,8]', "float16"),
     ("[1e400]", "float16"), ("[" + "9" * 5000 + "]", "float16"), ("{}", "float16"), ("[1,3,8,8]", "")],
)  # fmt: skip
def test_bad_shape_and_dtype_headers_are_remote_errors(shape, dtype):
    with recorder(Canned(200, [("shape", shape), ("dtype", dtype)], OK.body)) as stub:
        with pytest.raises(RemoteVAEError, match="answered 200 with a bad tensor"):
            remote_decode(stub.url, latent(), output_type="pt", return_type="pt")


def test_the_connection_refused_path_still_retries():
    with pytest.raises(RemoteVAEError, match="refused the connection"):
        send(refused_url(), pt_wire(), retries=2, **FAST)


def test_a_processor_gets_only_decoder_output():
    from diffusers.image_processor import VaeImageProcessor

    with recorder(tensor_answer(torch.zeros(1, 7, 4, 4, dtype=torch.float16))) as stub:
        with pytest.raises(
            RemoteVAEError, match=r"tensor of shape \[1, 7, 4, 4\]; output_type='pt' should give float"
        ):
            remote_decode(stub.url, latent(), output_type="pt", processor=VaeImageProcessor())
    frames = np.zeros((2, 7, 4, 4), dtype=np.float16)
    with recorder(tensor_answer(torch.from_numpy(frames))) as stub:
        with pytest.raises(RemoteVAEError, match="output_type='pil' with a processor should give float"):
            remote_decode(stub.url, latent(), processor=VaeImageProcessor())
