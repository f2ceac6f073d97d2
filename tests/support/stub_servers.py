"""Tiny real HTTP servers on 127.0.0.1 for client-behaviour tests.

Each factory is a context manager yielding a `Stub`: `stub.url` is the base URL, `stub.requests`
what arrived (method, path+query, headers in arrival order and case, body). A server runs in a
daemon thread; stalls end when the context exits or after STALL_LIMIT seconds, whichever is first.
"""

from __future__ import annotations

import io
import json
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

import torch
from PIL import Image

from remote_vae.remote import protocol

from .net import free_port

STALL_LIMIT = 30.0  # no stub ever holds a connection longer than this


@dataclass
class Recorded:
    method: str
    target: str  # path and query exactly as sent
    headers: list[tuple[str, str]]
    body: bytes
    client_port: int
    at: float  # time.monotonic() on arrival

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> str:
        return urlsplit(self.target).query

    @property
    def query_items(self) -> list[tuple[str, str]]:
        return parse_qsl(self.query, keep_blank_values=True)

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


@dataclass
class Canned:
    """An answer. `content_length` overrides the true length (to cut a body short)."""

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    content_length: int | None = None
    trickle: float = 0.0  # seconds between body bytes chunks (a slow server)
    chunk: int = 1024  # bytes per trickled chunk
    length_header: bool = True  # False: no Content-Length, the body ends when the connection closes
    stall: bool = False  # never answer (until the stub stops)


Respond = Callable[[Recorded, int], Canned]


@dataclass
class Stub:
    url: str
    requests: list[Recorded]
    stop: threading.Event


def tensor_answer(tensor: torch.Tensor, extra: list[tuple[str, str]] | None = None) -> Canned:
    body, headers = protocol.tensor_response(tensor)
    # bytes, not the tensor's own memory: the stub's daemon threads may drop the last reference while Python
    # exits, and a torch tensor freed then aborts the process (its C++ frame cannot be unwound)
    return Canned(200, list(headers.items()) + (extra or []), bytes(body))


def json_error(
    status: int, message: str, key: str = "error", extra: list[tuple[str, str]] | None = None
) -> Canned:
    return Canned(
        status, [("Content-Type", "application/json")] + (extra or []), json.dumps({key: message}).encode()
    )


def text_answer(status: int, text: str, content_type: str = "text/html") -> Canned:
    return Canned(status, [("Content-Type", content_type)], text.encode())


def proxy_error(status: int) -> Canned:
    """What nginx or a load balancer answers itself: an HTML page, no X-Request-ID."""
    title = {502: "502 Bad Gateway", 504: "504 Gateway Time-out"}.get(status, str(status))
    page = f"<html><head><title>{title}</title></head><body><center><h1>{title}</h1></center></body></html>"
    return Canned(status, [("Content-Type", "text/html"), ("Server", "nginx")], page.encode())


def gzip_bomb(inflated: int, headers: list[tuple[str, str]] | None = None) -> Canned:
    """A 200 whose gzip body inflates to `inflated` zero bytes (~1/1000 of that on the wire)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    parts = [packer.compress(zeros) for _ in range(inflated >> 20)]
    body = b"".join(parts) + packer.compress(bytes(inflated % (1 << 20))) + packer.flush()
    return Canned(200, (headers or []) + [("Content-Encoding", "gzip")], body)


def declared_png(width: int, height: int, padding: int = 0) -> bytes:
    """A PNG whose header declares width x height RGB pixels; its data is `padding` bytes of noise."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    noise = bytes((i * 7919) % 251 for i in range(padding))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", noise) + chunk(b"IEND", b"")


def declared_jpeg(width: int, height: int) -> bytes:
    """A real 8x8 JPEG whose frame header is rewritten to declare width x height."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")  # baseline frame header: length(2) precision(1) height(2) width(2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real servers
    timeout = 10  # socket timeout while reading a request

    def do_POST(self) -> None:  # http.server names its handlers do_<METHOD>
        stub: _Server = self.server  # type: ignore[assignment]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        record = Recorded(
            self.command,
            self.path,
            list(self.headers.items()),
            body,
            self.client_address[1],
            time.monotonic(),
        )
        with stub.lock:
            index = len(stub.recorded)
            stub.recorded.append(record)
        answer = stub.respond(record, index)
        if answer.stall:
            stub.stop.wait(STALL_LIMIT)
            self.close_connection = True
            return
        self.send_response(answer.status)
        for key, value in answer.headers:
            self.send_header(key, value)
        length = len(answer.body) if answer.content_length is None else answer.content_length
        if answer.length_header:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        if not answer.trickle:
            self.wfile.write(answer.body)
        else:
            for start in range(0, len(answer.body), answer.chunk):
                self.wfile.write(answer.body[start : start + answer.chunk])
                self.wfile.flush()
                if stub.stop.wait(answer.trickle):
                    break
        if answer.content_length is not None or not answer.length_header:
            self.close_connection = True

    do_GET = do_POST

    def log_message(self, format: str, *args: object) -> None:  # quiet test output
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, respond: Respond) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.respond = respond
        self.recorded: list[Recorded] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()


@contextmanager
def serve(respond: Respond) -> Iterator[Stub]:
    """Run `respond(request, index)` for every request until the block ends."""
    server = _Server(respond)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        yield Stub(f"http://{host}:{port}/", server.recorded, server.stop)
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextmanager
def recorder(answer: Canned) -> Iterator[Stub]:
    """Captures every request and gives the same canned answer."""
    with serve(lambda request, index: answer) as stub:
        yield stub


@contextmanager
def flaky(failures: int, failure: Canned, then: Canned, min_gap: float | None = None) -> Iterator[Stub]:
    """Answers `failure` for the first `failures` requests, then `then`.

    With `min_gap`, a request arriving sooner than `min_gap` seconds after the previous one is
    answered with `failure` again (a server whose Retry-After must be respected).
    """

    def respond(request: Recorded, index: int) -> Canned:
        early = min_gap is not None and index > 0 and request.at - stub.requests[index - 1].at < min_gap
        return failure if index < failures or early else then

    with serve(respond) as stub:
        yield stub


@contextmanager
def stalling() -> Iterator[Stub]:
    """Reads the request and never answers (until the block ends)."""
    with serve(lambda request, index: Canned(stall=True)) as stub:
        yield stub


@contextmanager
def slow(answer: Canned, seconds_per_kib: float) -> Iterator[Stub]:
    """Sends the headers at once, then the body 1 KiB at a time."""
    answer = Canned(answer.status, answer.headers, answer.body, trickle=seconds_per_kib)
    with serve(lambda request, index: answer) as stub:
        yield stub


def refused_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused)."""
    return f"http://127.0.0.1:{free_port()}/"


@contextmanager
def unaccepting() -> Iterator[str]:
    """A URL whose listen queue is full: connecting times out (a host that never picks up)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        host, port = listener.getsockname()
        filler = socket.create_connection((host, port), timeout=5)  # takes the only slot in the queue
        try:
            yield f"http://{host}:{port}/"
        finally:
            filler.close()
