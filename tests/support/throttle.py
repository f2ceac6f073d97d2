"""A rate-limited TCP proxy on 127.0.0.1: a slow link in front of a real server, for the link rule's tests.

`throttled(port, rate)` forwards every connection to 127.0.0.1:`port`, sending the answers (server to
client) at `rate` bytes per second (None: as fast as they come) and the requests as they are. Threads
only; every socket has a timeout and everything stops when the block ends.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

PIECE = 8 << 10  # bytes sent between two checks of the rate
FAST_PIECE = 1 << 20  # unthrottled: whatever has arrived, at once
IDLE = 10.0  # seconds a connection may stay silent before it is closed


class _Proxy:
    def __init__(self, port: int, rate: float | None) -> None:
        self.port, self.rate = port, rate
        self.stop = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.threads: list[threading.Thread] = []
        self.sockets: list[socket.socket] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}/"

    def serve(self) -> None:
        while not self.stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.port), timeout=IDLE)
            client.settimeout(IDLE)
            self.sockets += [client, upstream]
            self._start(client, upstream, None)
            self._start(upstream, client, self.rate)

    def _start(self, source: socket.socket, sink: socket.socket, rate: float | None) -> None:
        thread = threading.Thread(target=self._pump, args=(source, sink, rate), daemon=True)
        thread.start()
        self.threads.append(thread)

    def _pump(self, source: socket.socket, sink: socket.socket, rate: float | None) -> None:
        free_at = 0.0  # when the emulated link has sent everything so far
        try:
            while not self.stop.is_set() and (data := source.recv(FAST_PIECE if rate is None else PIECE)):
                if rate is not None:
                    now = time.monotonic()
                    free_at = max(free_at, now) + len(data) / rate
                    if self.stop.wait(free_at - now):
                        return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            _shut(source)
            _shut(sink)

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        for sock in self.sockets:
            _shut(sock)  # wakes the pumps waiting in recv
        for thread in self.threads:
            thread.join(timeout=5)
        for sock in self.sockets:
            sock.close()


def _shut(sock: socket.socket) -> None:
    with suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


@contextmanager
def throttled(port: int, rate: float | None) -> Iterator[str]:
    """The proxy's base URL while the block runs (see the module docstring)."""
    proxy = _Proxy(port, rate)
    acceptor = threading.Thread(target=proxy.serve, daemon=True)
    acceptor.start()
    try:
        yield proxy.url
    finally:
        proxy.close()
        acceptor.join(timeout=5)
