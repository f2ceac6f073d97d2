"""The HTTP/1.1 connection layer under the app: uvicorn's httptools protocol with a bound on everything one
connection can hold, and the one uvicorn configuration that the CLI and the tests both run.

uvicorn by itself caps none of these: its httptools parser buffers a header line of any length, a
connection that sends nothing (or half a request line) stays open forever, a response its client never
reads stays in memory forever, and SIGTERM waits for uploads still trickling in. Here each has a bound
(`connections.ConnectionLimits`), and what uvicorn answers itself (invalid HTTP, too-large headers, too many
connections, a shutting-down server) is `{"error": ...}` JSON like every other error of the server.
Bodies are bounded where they are read, in `uploads.py`. Why httptools and not uvicorn's h11, which caps
header bytes itself: the same parser as before for every client, and request bodies ~10% faster.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, ClassVar

import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from ..remote import protocol
from .connections import ConnectionLimits
from .errors import error_response, without_addresses

log = logging.getLogger("remote_vae.server")


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools HTTP/1.1 protocol with `limits` enforced and JSON for its own answers."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.real_app = self.app
        self.in_headers = True  # bytes arriving now belong to a request line or headers
        self.header_bytes = 0
        self.header_count = 0
        self.refusal: tuple[int, str] | None = None  # what to answer when the parser stops
        self.timers: dict[str, asyncio.TimerHandle] = {}

    # ------------------------------------------------------------------ headers: bounded in size, count, time

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("headers", self.limits.header_timeout, self._headers_timed_out)

    def data_received(self, data: bytes) -> None:
        if self.in_headers:
            self.header_bytes += len(data)
        super().data_received(data)
        if self.in_headers and self.header_bytes > self.limits.max_header_bytes:
            self.refuse(431, self._headers_too_large(self.header_bytes))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if "headers" not in self.timers:
            self._arm("headers", self.limits.header_timeout, self._headers_timed_out)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_count += 1
        if self.header_count > self.limits.max_headers:
            self.refusal = (431, f"more than {self.limits.max_headers} request headers; send fewer")
            raise ValueError(self.refusal[1])  # stops the parser: send_400_response answers the refusal
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm("headers")
        self.in_headers, self.header_bytes, self.header_count = False, 0, 0
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.limits.max_header_bytes:  # headers that arrived complete in one read
            self.refusal = (431, self._headers_too_large(size))
            raise ValueError(self.refusal[1])
        self.app = self.real_app if len(self.connections) <= self.limits.max_connections else self._busy()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.in_headers = True
        self._disarm("linger")  # the rest of a body the app did not read has arrived: keep-alive as usual
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to anything its parser refuses: ours, as JSON."""
        status, message = self.refusal or (
            400,
            "invalid HTTP request: the request line or headers are not HTTP/1.1",
        )
        self.refuse(status, message)

    def _headers_timed_out(self) -> None:
        self.timers.pop("headers", None)
        if self.header_bytes == 0 and self.cycle is None:
            self.transport.close()  # an idle new connection: nobody to answer
            return
        timeout = self.limits.header_timeout
        self.refuse(
            408, f"the request line and headers did not arrive within {timeout:g} s; send them at once"
        )

    def _headers_too_large(self, size: int) -> str:
        return f"request line and headers of {size} bytes or more exceed the server's limit of {self.limits.max_header_bytes} bytes"

    def _busy(self) -> Any:
        limit = self.limits.max_connections
        message = f"the server has {limit} open connections, its limit; retry shortly"
        return error_response(503, message, {"retry-after": "1", "connection": "close"})  # and one fewer

    # ------------------------------------------------------------------ after a response: nothing held forever

    def on_response_complete(self) -> None:
        if self.cycle is not None and self.cycle.more_body and not self.transport.is_closing():
            # The app answered without reading the whole body (a 401, a 413, a slow upload's 408): the rest
            # may keep arriving a little while, so the client can read the answer, then the connection ends.
            self._arm("linger", self.limits.keep_alive_timeout, self.transport.close)
        super().on_response_complete()

    def pause_writing(self) -> None:
        super().pause_writing()
        if "send" not in self.timers:
            self._arm("send", self.limits.send_timeout, self._send_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._disarm("send")

    def _send_timed_out(self) -> None:
        self.timers.pop("send", None)
        log.info(
            "%s read nothing of its response for %g s: connection closed",
            self._peer(),
            self.limits.send_timeout,
        )
        self.transport.abort()  # drops what is buffered; the app's pending send returns at once

    def shutdown(self) -> None:
        """SIGTERM: a request whose body is still arriving is refused now, not waited for."""
        cycle = self.cycle
        if cycle is not None and cycle.more_body and not cycle.response_started:
            self.refuse(
                503,
                "the server is shutting down: send the request again (to another server)",
                {"retry-after": "5"},
            )
            return
        super().shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        for name in list(self.timers):
            self._disarm(name)
        super().connection_lost(exc)

    # ------------------------------------------------------------------ helpers

    def refuse(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        """Answer `status` with `{"error": message}` and close the connection (whatever the app was doing)."""
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = (
                True  # the app's task ends: its receive says disconnect, its sends are dropped
            )
            self.cycle.message_event.set()
        body = protocol.error_body(without_addresses(message))
        fields = [
            *self.server_state.default_headers,
            (b"content-type", protocol.JSON_TYPE.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *((name.encode(), value.encode()) for name, value in (headers or {}).items()),
        ]
        self.transport.write(
            STATUS_LINE[status]
            + b"".join(name + b": " + value + b"\r\n" for name, value in fields)
            + b"\r\n"
            + body
        )
        self.transport.close()
        log.info("%s refused with %d: %s", self._peer(), status, message)

    def _arm(self, name: str, seconds: float, callback: Any) -> None:
        self._disarm(name)
        self.timers[name] = self.loop.call_later(seconds, callback)

    def _disarm(self, name: str) -> None:
        timer = self.timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "a client"


def uvicorn_config(app: Any, limits: ConnectionLimits | None = None, **options: Any) -> uvicorn.Config:
    """The server's uvicorn configuration: our protocol bound to `limits`; `options` are uvicorn's own
    (host, port, log_level, ...)."""
    limits = limits or ConnectionLimits()
    bound = type("GuardedHttpProtocol", (GuardedHttpProtocol,), {"limits": limits})
    return uvicorn.Config(
        app,
        http=bound,
        ws="none",  # no route speaks WebSocket: an upgrade request is an ordinary request
        timeout_keep_alive=limits.keep_alive_timeout,
        timeout_graceful_shutdown=limits.shutdown_timeout,
        **options,
    )
