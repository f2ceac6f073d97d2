"""Clients no single one of which may stall the server: endless or countless headers, invalid HTTP, half-sent
requests, idle connections, too many connections, trickling uploads, answers never read, clients that
leave mid-request. Each is refused with JSON (or dropped) in bounded time, and others are served meanwhile.
Against the real server on 127.0.0.1, configured as the CLI configures it (`http_server.uvicorn_config`)."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time

import pytest
import requests
import torch

from remote_vae.local_server.app import Settings, create_app
from remote_vae.local_server.backends.diffusers import DiffusersLoader
from remote_vae.local_server.connections import ConnectionLimits
from remote_vae.local_server.limits import Limits
from remote_vae.local_server.registry import ModelRegistry
from remote_vae.local_server.uploads import UploadLimits
from remote_vae.remote import protocol
from remote_vae.remote.presets import PRESETS
from remote_vae.testing import random_vae
from support.raw_http import closed_within, connect, read_answer, request_head
from support.serving import error_of, hosting, post_decode, post_encode, serve, tensor_of

pytestmark = pytest.mark.timeout(120)

# Short bounds, so that each test sees them pass within a second or two.
SHORT = ConnectionLimits(header_timeout=0.5, keep_alive_timeout=1, send_timeout=1.0)


@pytest.fixture(scope="module")
def vae() -> torch.nn.Module:
    return random_vae("sd15", 3, size="micro")


@contextlib.contextmanager
def server(model, settings: Settings | None = None, limits: ConnectionLimits = SHORT):
    with hosting({"sd15": ("sd15", model)}, settings, limits) as (url, _host):
        yield url


def z(*shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def decode_head(wire: protocol.WireRequest, path: str = "/sd15") -> bytes:
    """The request line and headers of `wire` as a raw POST."""
    query = "&".join(f"{k}={v}" for k, v in wire.params)
    return request_head("POST", f"{path}?{query}", {**wire.headers, "Content-Length": str(len(wire.body))})


def metrics(url: str) -> str:
    return requests.get(url + "/metrics", timeout=10).text


def wait_for_metric(url: str, pattern: str, seconds: float = 10) -> str:
    deadline = time.monotonic() + seconds
    while not re.search(pattern, text := metrics(url)):
        assert time.monotonic() < deadline, f"{pattern} never appeared in /metrics"
        time.sleep(0.05)
    return text


def normal_decode(url: str) -> float:
    """An ordinary small decode from another client; its seconds."""
    started = time.perf_counter()
    assert tensor_of(post_decode(url + "/sd15", z(1, 4, 8, 8), output_type="pt", do_scaling=False)).shape == (
        1,
        3,
        64,
        64,
    )
    return time.perf_counter() - started


# --------------------------------------------------------------------------- headers


def test_a_megabyte_header_is_refused_in_milliseconds_while_health_stays_fast(vae):
    with server(vae) as url:
        sock = connect(url, timeout=5)

        def flood() -> None:
            with contextlib.suppress(OSError):
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Flood: ")
                for _ in range(64):  # 1 MiB of one header line, never ended
                    sock.sendall(b"a" * 16384)

        flooding = threading.Thread(target=flood)
        started = time.perf_counter()
        flooding.start()
        answer = read_answer(sock)
        refused_after = time.perf_counter() - started
        health = requests.get(url + "/health", timeout=5)
        flooding.join(10)
        assert answer.status == 431 and answer.headers["connection"] == "close"
        assert answer.error().endswith("bytes or more exceed the server's limit of 65536 bytes")
        assert refused_after < 0.5, f"refused after {refused_after:.3f} s"
        assert health.status_code == 200 and health.elapsed.total_seconds() < 0.5
        assert closed_within(sock, 2)


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({f"X-Many-{i}": "1" for i in range(101)}, "more than 100 request headers; send fewer"),
        (
            {f"X-Big-{i}": "b" * 4000 for i in range(20)},
            "exceed the server's limit of 65536 bytes",
        ),  # complete at once
    ],
)
def test_too_many_or_too_large_headers_get_431_json(vae, headers, message):
    with server(vae) as url:
        sock = connect(url, timeout=5)
        sock.sendall(request_head("GET", "/health", headers))
        answer = read_answer(sock)
        assert answer.status == 431 and message in answer.error()
        assert requests.get(url + "/health", timeout=5).status_code == 200


def test_invalid_http_gets_a_json_400(vae):
    with server(vae) as url:
        sock = connect(url, timeout=5)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header Name: x\r\n\r\n")
        answer = read_answer(sock)
        assert answer.status == 400 and answer.headers["content-type"] == "application/json"
        assert answer.error() == "invalid HTTP request: the request line or headers are not HTTP/1.1"
        assert closed_within(sock, 2)


def test_half_sent_headers_and_idle_connections_time_out(vae):
    with server(vae) as url:
        half = connect(url, timeout=5)
        half.sendall(b"POST /sd15 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
        silent = connect(url, timeout=5)
        kept = connect(url, timeout=5)
        kept.sendall(request_head("GET", "/health"))
        assert read_answer(kept).status == 200
        started = time.monotonic()
        answer = read_answer(half)
        assert answer.status == 408
        assert answer.error() == "the request line and headers did not arrive within 0.5 s; send them at once"
        assert (
            closed_within(half, 2) and closed_within(silent, 2) and closed_within(kept, 2)
        )  # keep-alive: 1 s
        assert time.monotonic() - started < 2.5


def test_a_request_past_the_connection_limit_gets_a_json_503(vae):
    with server(vae, limits=ConnectionLimits(max_connections=3)) as url:
        idle = [connect(url) for _ in range(3)]
        time.sleep(0.2)  # the server has accepted them
        busy = requests.get(url + "/health", timeout=5)
        assert "the server has 3 open connections, its limit; retry shortly" in error_of(busy, 503)
        assert busy.headers["retry-after"] == "1"
        for sock in idle:
            sock.close()
        time.sleep(0.2)
        assert requests.get(url + "/health", timeout=5).status_code == 200


# --------------------------------------------------------------------------- bodies


def test_trickling_uploads_hold_no_slot_and_are_refused_when_too_slow(vae):
    """Six clients trickle their bodies at 5 bytes/s into a server that runs two requests at once."""
    uploads = UploadLimits(idle_timeout=5, min_rate=2000, grace=1.0)
    settings = Settings(limits=Limits(max_in_flight=2), uploads=uploads)
    wire = protocol.build_decode_request(z(1, 4, 8, 8), output_type="pt", do_scaling=False)
    with server(vae, settings) as url:
        tricklers = [connect(url, timeout=10) for _ in range(6)]
        for sock in tricklers:
            sock.sendall(decode_head(wire) + wire.body[:1])
        stop = threading.Event()

        def trickle() -> None:
            while not stop.wait(0.2):
                for sock in tricklers:
                    with contextlib.suppress(OSError):
                        sock.send(b"\0")

        trickling = threading.Thread(target=trickle)
        trickling.start()
        try:
            assert normal_decode(url) < 5  # served at once while all six trickle
            started = time.monotonic()
            answers = [read_answer(sock) for sock in tricklers]
            assert time.monotonic() - started < 3  # each refused about 1 s (the grace) after it began
        finally:
            stop.set()
            trickling.join(5)
        for answer in answers:
            assert answer.status == 408
            assert answer.error().startswith("the request body arrived too slowly (")
            assert (
                "the server needs a byte at least every 5 s and 2000 bytes/s after the first 1 s"
                in answer.error()
            )
        assert all(
            closed_within(sock, 3) for sock in tricklers
        )  # the rest of each body: keep-alive (1 s) to arrive
        assert (
            'remote_vae_requests_total{model="sd15",op="decode",outcome="client_error",status="408"} 6'
            in metrics(url)
        )


def test_a_stalled_upload_is_refused_after_the_idle_timeout(vae):
    uploads = UploadLimits(idle_timeout=0.5, min_rate=2000, grace=0.1)
    wire = protocol.build_decode_request(z(1, 4, 32, 32), output_type="pt", do_scaling=False)
    with server(vae, Settings(uploads=uploads)) as url:
        sock = connect(url, timeout=5)
        sock.sendall(
            decode_head(wire) + wire.body[: len(wire.body) // 2]
        )  # 16 KiB at once: 8 s of rate credit
        started = time.monotonic()
        answer = read_answer(sock)
        assert answer.status == 408 and "a byte at least every 0.5 s" in answer.error()
        assert 0.4 < time.monotonic() - started < 2


def test_upload_patience():
    uploads = UploadLimits(idle_timeout=15, min_rate=1000, grace=10)
    assert uploads.patience(0, 0) == 10  # the grace
    assert uploads.patience(0, 12) == 0  # nothing after the grace: too slow now
    assert uploads.patience(5000, 3) == 7  # 5 s of credit, still within the grace
    assert uploads.patience(50_000, 20) == 15  # 50 s of credit: the idle timeout bounds the pause


def test_a_client_that_never_reads_its_answer_holds_no_slot_and_is_dropped(vae):
    """A 7 MB answer into a 4 KiB receive window: the send stalls; others are served meanwhile (one slot),
    and after the send timeout (1 s) the connection is dropped with the answer's rest."""
    wire = protocol.build_decode_request(
        z(1, 4, 96, 96),
        output_type="pt",
        do_scaling=False,
        extensions=protocol.Extensions(output_dtype="float32"),
    )
    with server(vae, Settings(limits=Limits(max_in_flight=1))) as url:
        sock = connect(url, receive_buffer=4096, timeout=10)
        sock.sendall(decode_head(wire) + wire.body)
        wait_for_metric(url, r'outcome="ok",status="200"\} 1')  # answered (into the socket buffers)
        assert normal_decode(url) < 5
        assert "remote_vae_queue_depth 0" in metrics(url)
        time.sleep(2.5)  # the send timeout passes while the client reads nothing
        received = 0
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
        assert received < 768 * 768 * 3 * 4, "the whole answer was kept for a client that read none of it"


# --------------------------------------------------------------------------- clients that leave, messages


def test_a_client_that_leaves_mid_upload_is_a_499_not_a_500(vae, caplog):
    wire = protocol.build_decode_request(z(1, 4, 32, 32), output_type="pt", do_scaling=False)
    with server(vae) as url, caplog.at_level(logging.INFO, logger="remote_vae.server"):
        sock = connect(url, timeout=5)
        sock.sendall(decode_head(wire) + wire.body[:1000])
        time.sleep(0.2)
        sock.close()
        text = wait_for_metric(url, 'status="499"')
        assert normal_decode(url) < 5
    assert (
        'remote_vae_requests_total{model="sd15",op="decode",outcome="client_closed",status="499"} 1' in text
    )
    assert 'status="500"' not in text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


class Failing(torch.nn.Module):
    """A model whose decode fails with an object's repr (and so its heap address) in the message."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    @property
    def config(self):
        return self.inner.config

    def decode(self, latent):
        raise RuntimeError(f"cannot decode with {object()!r}")

    def encode(self, x):
        return self.inner.encode(x)


def test_no_heap_addresses_in_messages(vae):
    with server(Failing(vae)) as url:
        unreadable = post_encode(url + "/sd15/encode", protocol.PNG_MAGIC + b"not the rest of a PNG")
        assert error_of(unreadable, 400).startswith(
            "encode body could not be read as an image: cannot identify image file <_io.BytesIO object>"
        )
        failed = post_decode(url + "/sd15", z(1, 4, 8, 8), output_type="pt", do_scaling=False)
        assert (
            error_of(failed, 500) == "internal server error: RuntimeError: cannot decode with <object object>"
        )


def test_no_heap_addresses_in_a_load_failure(vae):
    def loader(preset, source, *, device, dtype):
        raise OSError(f"cannot open {object()!r}")

    host = ModelRegistry(loader=DiffusersLoader(loader))
    host.add("sd15", PRESETS["sd15"], source="/models/vae", device="cpu")
    try:
        with serve(create_app(host)) as url:
            message = error_of(
                post_decode(url + "/sd15", z(1, 4, 8, 8), output_type="pt", do_scaling=False), 503
            )
            assert message.startswith(
                "model 'sd15' could not be loaded from /models/vae: cannot open <object object>"
            )
            assert requests.get(url + "/v1/models", timeout=10).json()["models"][0]["error"] == message
    finally:
        host.close()
