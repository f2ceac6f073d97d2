"""A 504 stops the work: a job whose deadline passed, or whose client left, is dropped before it reaches
the device, batched or not, so the requests behind it are not kept waiting by work nobody will read."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlencode, urlsplit

import pytest
import torch

from remote_vae.local_server.app import Settings
from remote_vae.local_server.limits import Limits
from remote_vae.local_server.registry import Tuning
from remote_vae.remote import protocol
from remote_vae.testing import random_vae
from support.hooked import Wrapped
from support.serving import error_of, hosting, post_decode, tensor_of

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def vae():
    return random_vae("sd15", 7, size="micro")


class Gate:
    """Holds the first decode on the device until `open()`; every later decode of 8x8 latents (the
    ones that time out) takes `seconds`, so any of them that ran would hold up the last, 16x16 one."""

    def __init__(self, seconds: float = 0.7) -> None:
        self.held, self.opened, self.seconds = threading.Event(), threading.Event(), seconds

    def __call__(self, z: torch.Tensor) -> None:
        if not self.held.is_set():
            self.held.set()
            assert self.opened.wait(60)
        elif z.shape[-1] == 8:
            time.sleep(self.seconds)

    def open(self) -> None:
        self.opened.set()


def decode(url: str, batch: int = 1, side: int = 8) -> object:
    return post_decode(url + "/sd15", torch.zeros(batch, 4, side, side), output_type="pt", do_scaling=False)


def promptly_decoded(url: str) -> float:
    started = time.perf_counter()
    assert tensor_of(decode(url, side=16)).shape == (1, 3, 128, 128)  # the first try
    return time.perf_counter() - started


@pytest.mark.parametrize("batching", [True, False], ids=["batched", "unbatched"])
def test_jobs_past_their_deadline_never_reach_the_device(vae, batching):
    gate = Gate()
    model = Wrapped(vae, before=gate)
    settings = Settings(limits=Limits(request_timeout=2.0))
    with (
        hosting({"sd15": ("sd15", model)}, settings, options=Tuning(batching=batching)) as (url, _),
        ThreadPoolExecutor(8) as pool,
    ):
        first = pool.submit(decode, url)
        assert gate.held.wait(30)
        for wave in range(3):  # each wave queues behind the held job and times out there
            answers = list(pool.map(lambda batch: decode(url, batch), [1, 1, 2, 1, 1, 2]))
            assert all("longer than the server's limit of 2 s" in error_of(a, 504) for a in answers), wave
        error_of(first.result(30), 504)
        gate.open()
        assert promptly_decoded(url) < 2  # not behind 3 waves of 0.7 s decodes (that would be a 504)
    assert model.batches == [1, 1]  # the held job and the last one: no timed-out job ever ran


def send_and_leave(url: str) -> None:
    """A whole decode request, then the connection closed without reading the answer."""
    wire = protocol.build_decode_request(torch.zeros(1, 4, 8, 8), output_type="pt", do_scaling=False)
    host, port = urlsplit(url).hostname, urlsplit(url).port
    head = f"POST /sd15?{urlencode(wire.params)} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(wire.body)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in wire.headers.items()) + "\r\n"
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(head.encode() + wire.body)


@pytest.mark.parametrize("batching", [True, False], ids=["batched", "unbatched"])
def test_jobs_whose_client_left_never_reach_the_device(vae, batching):
    gate = Gate()
    model = Wrapped(vae, before=gate)
    with (
        hosting({"sd15": ("sd15", model)}, options=Tuning(batching=batching)) as (url, _),
        ThreadPoolExecutor(2) as pool,
    ):
        first = pool.submit(decode, url)
        assert gate.held.wait(30)
        for _ in range(6):
            send_and_leave(url)
        time.sleep(0.5)  # the server notices each closed connection
        gate.open()
        assert tensor_of(first.result(30)).shape == (1, 3, 64, 64)
        assert promptly_decoded(url) < 2  # not behind 6 decodes of 0.7 s each
    assert model.batches == [1, 1]
