"""Limits, the bound on requests in flight (503 with Retry-After), deadlines, and a bounded load."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from remote_vae.local_server.app import Settings
from remote_vae.local_server.limits import Limits
from remote_vae.remote import protocol
from remote_vae.remote.client import RemoteVAEError, send
from support.hooked import Wrapped
from support.one_model import hosting, pt, reference, z
from support.serving import error_of, post_encode, tensor_of


def test_limits_are_named_in_413_answers(vae):
    limits = Limits(max_pixels=64 * 64, max_request_bytes=4096, max_frames=9)
    with hosting(vae, Settings(limits=limits)) as url:
        assert "exceeds the server's limit of 4096 pixels" in error_of(pt(url, z(1, 4, 16, 16)), 413)
        big = z(1, 4, 32, 32)  # 16 KiB of float32
        assert "exceeds the server's limit of 4096 bytes" in error_of(pt(url, big), 413)
        encode = post_encode(url + "/sd15/encode", torch.zeros(1, 128, 128, 3, dtype=torch.uint8))
        assert "limit" in error_of(encode, 413)
        assert tensor_of(pt(url, z(1, 4, 8, 8))).shape == (1, 3, 64, 64)


def test_full_queue_answers_503_with_retry_after_at_once_and_a_retry_resolves_it(vae):
    started, release = threading.Event(), threading.Event()

    def block(_z):
        started.set()
        assert release.wait(30)

    model = Wrapped(vae, before=block)
    settings = Settings(limits=Limits(max_in_flight=1))
    with hosting(model, settings) as url, ThreadPoolExecutor(2) as pool:
        first = pool.submit(pt, url, z(1, 4, 8, 8))
        assert started.wait(30)
        busy = pt(url, z(1, 4, 8, 8))
        assert "the server is busy" in error_of(busy, 503)
        assert busy.headers["retry-after"] == "1"
        wire = protocol.build_decode_request(z(1, 4, 8, 8), output_type="pt", do_scaling=False)
        retried = pool.submit(send, url + "/sd15", wire, retries=5, backoff=0.05)
        threading.Timer(0.3, release.set).start()
        assert first.result(30).status_code == 200
        assert retried.result(30).transfer.attempts >= 2
        metrics = requests.get(url + "/metrics", timeout=10).text
        assert 'remote_vae_rejected_total{reason="queue_full"}' in metrics


def test_requests_past_the_deadline_get_504(vae):
    release = threading.Event()
    model = Wrapped(vae, before=lambda _z: release.wait(30))
    with hosting(model, Settings(limits=Limits(request_timeout=0.5))) as url:
        try:
            assert "longer than the server's limit of 0.5 s" in error_of(pt(url, z(1, 4, 8, 8)), 504)
        finally:
            release.set()


def test_bounded_load_every_request_answered_correctly(vae):
    """8 clients x 4 requests against a queue of 2: 503s happen and client retries resolve them."""
    latents = [z(1, 4, 8, 8, seed=i) for i in range(32)]
    settings = Settings(limits=Limits(max_in_flight=2))

    def decode(latent):
        wire = protocol.build_decode_request(
            latent, output_type="pt", do_scaling=False, extensions=protocol.Extensions(output_dtype="float32")
        )
        return send(url + "/sd15", wire, retries=30, backoff=0.05, timeout=(5, 60))

    with hosting(vae, settings) as url, ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(decode, latents))
        text = requests.get(url + "/metrics", timeout=10).text
    for latent, reply in zip(latents, replies, strict=True):
        torch.testing.assert_close(reply.tensor(), reference(vae, latent), rtol=1e-4, atol=1e-4)
    assert 'remote_vae_requests_total{model="sd15",op="decode",outcome="ok",status="200"} 32' in text


def test_a_client_error_from_the_queue_is_clear():
    with pytest.raises(RemoteVAEError, match="refused the connection"):
        send(
            "http://127.0.0.1:9/sd15",
            protocol.build_decode_request(z(1, 4, 1, 1), output_type="pt"),
            retries=0,
        )
