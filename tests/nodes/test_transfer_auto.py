"""Transfer `auto` and `near-lossless` in the decode nodes: the link rule picks raw uint8 or jxl from its own
measurements, driven through a rate-limited proxy on 127.0.0.1 in front of a stub server whose compressed
bodies remote/frames.py made (small images, a few requests, seconds)."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch

from remote_vae.nodes import operations
from remote_vae.nodes.convert import DecodeForm
from remote_vae.nodes.operations import Connection, NodeRequest, RunOptions
from remote_vae.nodes.resolve import NodeInputError
from remote_vae.nodes.ui_events import transfer_summary
from remote_vae.remote import catalog, frames, link, planes, protocol
from support import frame_bodies, throttle

pytestmark = pytest.mark.timeout(60)

PIXELS = frame_bodies.natural_pixels(2, 256, 256)  # 384 KiB raw
LATENT = torch.zeros(2, 4, 32, 32)
EXPECTED = torch.from_numpy(PIXELS).float() / 255.0  # what the raw path gives today
SLOW = 2e6  # bytes per second: 0.2 s for the raw answer
LOCAL = torch.full((2, 256, 256, 3), 0.5)


@pytest.fixture(autouse=True)
def fresh_measurements():
    link.LINKS.forget()
    catalog.forget_known_models()
    yield
    link.LINKS.forget()
    catalog.forget_known_models()


def decode(url: str, transfer: str = "auto", samples: torch.Tensor = LATENT, preset: str = "sd15"):
    video = samples.ndim == 5
    request = NodeRequest(preset, url + preset, transfer, 60, video_only=video)
    return operations.decode_latent(samples, request, RunOptions())


def port_of(url: str) -> int:
    return urlsplit(url).port  # type: ignore[return-value]


def codecs_asked(stub) -> list[str | None]:
    return [dict(r.query_items).get("codec") for r in stub.requests if r.method == "POST"]


def listings_asked(stub) -> int:
    return sum(r.path.endswith("/v1/models") for r in stub.requests)


def test_auto_picks_jxl_on_a_slow_link_with_the_same_image():
    with (
        frame_bodies.pixel_server(PIXELS, dtype="float16") as stub,
        throttle.throttled(port_of(stub.url), SLOW) as url,
    ):
        first = decode(url)  # loopback and nothing measured yet: raw
        second = decode(url)  # measured at ~2 MB/s: compressing wins
    assert codecs_asked(stub) == [None, "jxl"]
    assert torch.equal(first.value, EXPECTED) and torch.equal(second.value, EXPECTED)
    assert transfer_summary(None, first.transfers)["form"] == "raw uint8"
    form = transfer_summary(None, second.transfers)["form"]
    assert form.startswith("jxl ") and form.endswith("x raw") and float(form.split()[1][:-1]) < link.MARGIN
    posts = [r for r in stub.requests if r.method == "POST"]
    assert ("dtype", "float32") in posts[0].query_items  # the model's dtype was not known yet
    assert ("dtype", "float16") in posts[1].query_items  # the listing said float16: the latent goes so
    estimate = link.LINKS.estimate(url.rstrip("/"))
    assert estimate.throughput is not None and estimate.throughput < 4 * SLOW


def encodings_sent(stub) -> list[str | None]:
    return [
        {k.lower(): v for k, v in r.headers}.get("content-encoding")
        for r in stub.requests
        if r.method == "POST"
    ]


def test_auto_packs_the_upload_on_a_slow_link_to_a_server_that_unpacks_it():
    latent = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(4))
    with (
        frame_bodies.pixel_server(PIXELS, dtype="bfloat16", upload_encodings=(planes.ENCODING,)) as stub,
        throttle.throttled(port_of(stub.url), SLOW) as url,
    ):
        first = decode(url, samples=latent)  # loopback, nothing measured yet: sent as it is
        second = decode(url, samples=latent)  # measured at ~2 MB/s: packed
    assert encodings_sent(stub) == [None, planes.ENCODING]
    posts = [r for r in stub.requests if r.method == "POST"]
    sent = protocol.tensor_to_bytes(latent.to(torch.bfloat16))
    assert bytes(planes.unpack(posts[1].body, len(sent), 2)) == sent
    assert second.transfers[0].bytes_sent == len(posts[1].body) < len(sent)
    assert torch.equal(first.value, EXPECTED) and torch.equal(second.value, EXPECTED)


def test_auto_keeps_raw_on_a_fast_link_without_asking_the_server():
    # The fast link is loopback itself: a Python proxy in between would be the slowest part on a loaded
    # CI machine (~100 MB/s, near the break-even), not the link. 2.8 MB bodies: the rate is measured.
    large = frame_bodies.natural_pixels(4, 480, 480)
    with frame_bodies.pixel_server(large) as stub:
        url = stub.url
        outcomes = [decode(url, samples=torch.zeros(4, 4, 60, 60)) for _ in range(3)]
    assert codecs_asked(stub) == [None, None, None]
    assert listings_asked(stub) == 0
    estimate = link.LINKS.estimate(url.rstrip("/"))
    assert estimate.throughput is not None  # measured, so the choice was the rule's, not the loopback default
    assert all(torch.equal(o.value, torch.from_numpy(large).float() / 255.0) for o in outcomes)


def test_auto_sends_no_codec_to_a_server_that_does_not_list_it():
    with (
        frame_bodies.pixel_server(PIXELS, codecs=()) as stub,
        throttle.throttled(port_of(stub.url), SLOW) as url,
    ):
        outcomes = [decode(url) for _ in range(3)]
    assert codecs_asked(stub) == [None, None, None]
    assert encodings_sent(stub) == [None, None, None]  # its listing names no upload encoding
    assert listings_asked(stub) == 1  # looked up once, then remembered
    assert all(torch.equal(o.value, EXPECTED) for o in outcomes)


def slow_link_to(url: str) -> None:
    origin = url.rstrip("/")
    for _ in range(3):
        link.LINKS.record(origin, link.Sample(3_000_000, 3_000_000, 3.0, 1.0, compressed=False))


def test_a_corrupt_compressed_answer_falls_back_to_the_local_vae(caplog):
    with frame_bodies.pixel_server(PIXELS, corrupt=True) as stub:
        slow_link_to(stub.url)
        with caplog.at_level(logging.WARNING, logger="remote_vae"):
            out = operations.run_node("7", lambda: decode(stub.url), lambda: LOCAL, "decode")
        with pytest.raises(operations.RemoteVAEError, match="with a jxl body that does not hold the frames"):
            decode(stub.url)
    assert out is LOCAL
    assert codecs_asked(stub) == ["jxl", "jxl"]
    assert "used the connected VAE locally instead" in caplog.text and stub.url + "sd15" in caplog.text


def test_hugging_face_endpoints_never_get_a_codec():
    hf = "https://abc.us-east-1.aws.endpoints.huggingface.cloud/"
    slow_link_to(hf)
    conn = Connection(hf)
    job = link.Job(2, 256, 256)
    assert operations.decode_form(NodeRequest("sd15", hf, "auto"), conn, job) == DecodeForm("auto")
    with pytest.raises(
        NodeInputError, match="transfer 'near-lossless' needs a remote-vae server that offers"
    ):
        operations.decode_form(NodeRequest("wan21", hf, "near-lossless"), conn, job)


VIDEO = frame_bodies.natural_pixels(5, 64, 64)  # what a wan21 latent [1,16,2,8,8] decodes to
VIDEO_LATENT = torch.zeros(1, 16, 2, 8, 8)


def test_near_lossless_video_is_within_its_bound():
    with frame_bodies.pixel_server(VIDEO, codecs=("jxl", "h264rgb"), video=True) as stub:
        outcome = decode(stub.url, "near-lossless", VIDEO_LATENT, "wan21")
    assert codecs_asked(stub) == ["h264rgb"]
    error = (outcome.value * 255.0 - torch.from_numpy(VIDEO).float()).abs().max().item()
    assert error <= frames.NEAR_LOSSLESS_MAX_ERROR
    assert transfer_summary(None, outcome.transfers)["form"].startswith("h264rgb ")
    # Its rate is its encoder's and its costs are not jxl's: the link rule learns nothing from it.
    assert link.LINKS.history(stub.url.rstrip("/")) == []


def test_near_lossless_needs_a_server_that_offers_it():
    with frame_bodies.pixel_server(VIDEO, codecs=("jxl",), video=True) as stub:
        with pytest.raises(NodeInputError, match="offers the h264rgb codec"):
            decode(stub.url, "near-lossless", VIDEO_LATENT, "wan21")
    assert codecs_asked(stub) == []


def test_auto_video_on_a_slow_link_is_lossless_jxl():
    with frame_bodies.pixel_server(VIDEO, video=True) as stub:
        slow_link_to(stub.url)
        outcome = decode(stub.url, "auto", VIDEO_LATENT, "wan21")
    assert codecs_asked(stub) == ["jxl"]
    assert np.array_equal(outcome.value.numpy(), VIDEO / np.float32(255.0))


def test_auto_through_the_real_server_gives_the_lossless_image(server):
    """With the server's codec support jxl travels (else raw): either way the very same IMAGE."""
    offered = catalog.describe_model(f"{server}/sd15").codecs
    samples = torch.randn(2, 4, 16, 12, generator=torch.Generator().manual_seed(3))
    lossless = decode(server + "/", "lossless", samples)
    slow_link_to(server + "/")
    auto = decode(server + "/", "auto", samples)
    assert torch.equal(auto.value, lossless.value)
    assert [t.codec for t in auto.transfers] == ["jxl" if "jxl" in offered else None] * len(auto.transfers)
