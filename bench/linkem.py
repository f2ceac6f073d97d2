"""An emulated home link between the benchmark (client) and a server: 100 Mbit/s each way, 20 ms round trip.

Preferred: `tc netem` on a veth pair into a network namespace the benchmark creates (root, iproute2 and
the kernel's sch_netem needed); the server then runs inside the namespace. Fallback: a TCP proxy on
127.0.0.1 in its own process (asyncio) that serialises bytes at the link rate, shared by all connections of
a direction, delivers them one delay later, and charges one round trip for each new connection's
handshake. The proxy does not model TCP slow start or losses: it is kinder than a real link to many short
connections.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .common import REPO, free_port

CHUNK = 1 << 16


@dataclass
class Direction:
    """One direction of the link: a FIFO that sends `rate_bps` and arrives `delay` later."""

    rate_bps: float
    delay: float
    free_at: float = 0.0
    bytes: int = 0

    def arrival(self, nbytes: int, now: float) -> float:
        start = max(now, self.free_at)
        self.free_at = start + nbytes * 8 / self.rate_bps
        return self.free_at + self.delay


class Proxy:
    """The proxy itself (run in its own process, see `ProxyLink`): 127.0.0.1:port -> target via two `Direction`s."""

    def __init__(self, port: int, target: tuple[str, int], rate_mbit: float, rtt_ms: float) -> None:
        self.port, self.target, self.rtt = port, target, rtt_ms / 1000
        self.up = Direction(rate_mbit * 1e6, self.rtt / 2)
        self.down = Direction(rate_mbit * 1e6, self.rtt / 2)

    async def serve(self, ready: Callable[[], None]) -> None:
        server = await asyncio.start_server(self._connection, "127.0.0.1", self.port)
        ready()
        async with server:
            await server.serve_forever()

    async def _connection(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            await asyncio.sleep(self.rtt)  # the TCP handshake's round trip
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(
            self._pump(client_r, server_w, self.up), self._pump(server_r, client_w, self.down)
        )

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, way: Direction) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def receive() -> None:
            while True:
                try:
                    data = await reader.read(CHUNK)
                except ConnectionError:
                    data = b""
                await queue.put((way.arrival(len(data), loop.time()) if data else loop.time(), data))
                if not data:
                    return

        async def deliver() -> None:
            try:
                while True:
                    at, data = await queue.get()
                    await asyncio.sleep(max(0.0, at - loop.time()))
                    if not data:
                        return
                    writer.write(data)
                    await writer.drain()
                    way.bytes += len(data)
            except ConnectionError:
                pass
            finally:
                writer.close()

        await asyncio.gather(receive(), deliver())


class ProxyLink:
    """The fallback link: `Proxy` in a subprocess (so it never waits for this process's GIL).

    `counters()` asks it, over its stdin/stdout, for the payload bytes delivered so far.
    """

    kind = "asyncio proxy on 127.0.0.1 in its own process (tc netem unavailable)"

    def __init__(self, target: tuple[str, int], rate_mbit: float, rtt_ms: float) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.cmd = [
            sys.executable,
            "-m",
            "bench.linkem",
            "--port",
            str(self.port),
            "--target",
            f"{target[0]}:{target[1]}",
            "--rate-mbit",
            str(rate_mbit),
            "--rtt-ms",
            str(rtt_ms),
        ]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ProxyLink:
        self.proc = subprocess.Popen(
            self.cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.__exit__(None, None, None)
            raise RuntimeError("the link proxy did not start")
        return self

    def counters(self) -> tuple[int, int]:
        """Payload bytes delivered so far: (client -> server, server -> client)."""
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("counters\n")
        self.proc.stdin.flush()
        up, down = self.proc.stdout.readline().split()
        return int(up), int(down)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def proxy_main() -> None:
    """`python -m bench.linkem ...`: run a `Proxy`; answer each `counters` line on stdin with `up down`."""
    parser = argparse.ArgumentParser(description=proxy_main.__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target", required=True, help="HOST:PORT")
    parser.add_argument("--rate-mbit", type=float, required=True)
    parser.add_argument("--rtt-ms", type=float, required=True)
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    proxy = Proxy(args.port, (host, int(port)), args.rate_mbit, args.rtt_ms)

    def answer() -> None:
        for _ in sys.stdin:
            print(proxy.up.bytes, proxy.down.bytes, flush=True)

    threading.Thread(target=answer, daemon=True).start()
    asyncio.run(proxy.serve(lambda: print("ready", flush=True)))


@dataclass
class NetemLink:
    """veth pair into namespace `ns`, netem (delay + rate) on both ends; the server listens on `server_ip`."""

    rate_mbit: float
    rtt_ms: float
    kind: str = "tc netem on a veth pair into a network namespace"
    ns: str = field(default_factory=lambda: f"rvbench{os.getpid()}")
    client_ip: str = "10.199.0.1"
    server_ip: str = "10.199.0.2"

    @property
    def veth(self) -> tuple[str, str]:
        return f"rvb{os.getpid() % 100000}a", f"rvb{os.getpid() % 100000}b"

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]

    def counters(self) -> tuple[int, int]:
        """Bytes on the wire (headers included) so far: (client -> server, server -> client)."""
        stats = Path(f"/sys/class/net/{self.veth[0]}/statistics")
        return int((stats / "tx_bytes").read_text()), int((stats / "rx_bytes").read_text())

    def __enter__(self) -> NetemLink:
        a, b = self.veth
        netem = [
            "netem",
            "delay",
            f"{self.rtt_ms / 2:g}ms",
            "rate",
            f"{self.rate_mbit:g}mbit",
            "limit",
            "100000",
        ]
        steps = [
            ["ip", "netns", "add", self.ns],
            ["ip", "link", "add", a, "type", "veth", "peer", "name", b],
            ["ip", "link", "set", b, "netns", self.ns],
            ["ip", "addr", "add", f"{self.client_ip}/24", "dev", a],
            ["ip", "link", "set", a, "up"],
            [*self.prefix, "ip", "addr", "add", f"{self.server_ip}/24", "dev", b],
            [*self.prefix, "ip", "link", "set", b, "up"],
            [*self.prefix, "ip", "link", "set", "lo", "up"],
            ["tc", "qdisc", "add", "dev", a, "root", *netem],
            [*self.prefix, "tc", "qdisc", "add", "dev", b, "root", *netem],
        ]
        try:
            for step in steps:
                _run(step)
        except RuntimeError:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)  # removes the veth pair too
        subprocess.run(["ip", "link", "del", self.veth[0]], capture_output=True)


def _run(cmd: Sequence[str]) -> None:
    done = subprocess.run(list(cmd), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {(done.stderr or done.stdout).strip()}")


def netem_problem() -> str | None:
    """Why a netem link cannot be made here (None when it can), found by making and removing one."""
    if os.geteuid() != 0:
        return "not root"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} missing (apt-get install -y iproute2)"
    try:
        with NetemLink(100, 20):
            pass
    except RuntimeError as exc:
        return str(exc)
    return None


if __name__ == "__main__":
    proxy_main()
