"""Bounds on one client connection: how much of a request line and headers it may send, and how long it
may take; how long it may leave its answer unread; how many connections the server keeps; how long
SIGTERM waits. `http_server` enforces them under the app (uvicorn itself bounds none of them); what a
request body may take is `uploads.UploadLimits`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConnectionLimits:
    """What one connection may hold, and for how long; the defaults, and why each."""

    # Request line + headers. 64 KiB holds any real request (a bearer token, cookies of a browser's CORS
    # call) four times over; nginx allows 32 KiB, h11 16 KiB. Past it: 431 before the headers complete.
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100  # Python's http.client refuses to read more than 100 headers too
    # From a connection's first moment (or a request's first byte) to the end of its headers: a client
    # sends its headers at once, so this only ends clients that stall (slowloris) or never send anything.
    header_timeout: float = 10.0
    # Idle between two requests of one connection (uvicorn's default); also how long the rest of a body
    # the server answered without reading (a 401, 413 or 408) may keep arriving before the connection ends.
    keep_alive_timeout: int = 5
    # A response whose client reads none of it for this long is dropped (the connection is aborted);
    # each time its socket buffer drains, the clock starts again, so slow readers are fine.
    send_timeout: float = 30.0
    # Open connections; a request on one more gets 503 + Retry-After. Far under the usual 1024 open
    # files, far over the requests a server runs at once (--max-in-flight): the rest wait in keep-alive.
    max_connections: int = 256
    # SIGTERM: uploads still arriving are refused at once (503); requests already running get this long
    # to finish (Kubernetes' default grace period is 30 s: this leaves it time to exit).
    shutdown_timeout: int = 25
