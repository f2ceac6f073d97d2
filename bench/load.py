"""Concurrent clients against one server: `python -m bench.load [--clients 1 2 4 8] [--quick]`.

A tiny real VAE (sd-small) and one fixed request (a 256x256 decode, uint8 pixels back, what
RemoteVAEDecode's default sends); 1, 2, 4 and 8 clients, each a thread with its own keep-alive session,
share the same number of requests per level. Per level: throughput, p50/p99 latency, errors, the
deepest queue (the server's `remote_vae_queue_depth` gauge from /metrics, sampled every 20 ms, else
requests in flight seen by the clients) and compute per request (from /metrics). With dynamic batching
off and on when the server offers the switch.
Targets (issue #5): throughput at 8 clients >= 0.9 x at 1, zero errors, p99 <= queue length x service
time, with the queue length taken as the client count (its maximum) and the service time as the p99
latency of one client alone (a request waits at most for the ones queued before it); the table also
shows the ratio against one client's median.
"""

from __future__ import annotations

import argparse
import threading
import time
from dataclasses import dataclass, field

import requests
import torch

from remote_vae.remote import client, protocol

from .common import (
    Server,
    default_threads,
    metric_total,
    metrics,
    percentile,
    record_as_module,
    revision,
)
from .results import markdown_table, record


@dataclass
class Level:
    clients: int
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall: float = 0.0
    max_queue: float = 0.0
    queue_source: str = "client in-flight"
    compute: float | None = None  # seconds per request, from /metrics


class QueueWatch:
    """The deepest queue seen while running: /metrics' gauge, or the clients' own in-flight count."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.has_metrics = metrics(url) is not None
        self.in_flight = 0
        self.deepest = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> QueueWatch:
        if self.has_metrics:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            depth = metric_total(metrics(self.url), "remote_vae_queue_depth")
            self.deepest = max(self.deepest, depth)

    def started(self) -> None:
        with self._lock:
            self.in_flight += 1
            if not self.has_metrics:
                self.deepest = max(self.deepest, self.in_flight)

    def finished(self) -> None:
        with self._lock:
            self.in_flight -= 1


def run_level(server_url: str, url: str, wire: protocol.WireRequest, clients: int, total: int) -> Level:
    level = Level(clients)
    per_client = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]
    before = metrics(server_url)
    lock = threading.Lock()

    def one_client(n: int) -> None:
        session = requests.Session()
        for _ in range(n):
            watch.started()
            started = time.perf_counter()
            try:
                client.send(url, wire, retries=0, session=session, timeout=(10.0, 600.0))
                elapsed = time.perf_counter() - started
                with lock:
                    level.latencies.append(elapsed)
            except client.RemoteVAEError as exc:
                with lock:
                    level.errors.append(str(exc)[:200])
            finally:
                watch.finished()

    with QueueWatch(server_url) as watch:
        threads = [threading.Thread(target=one_client, args=(n,)) for n in per_client]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        level.wall = time.perf_counter() - started
    level.max_queue = watch.deepest
    level.queue_source = "/metrics remote_vae_queue_depth" if watch.has_metrics else "client in-flight"
    after = metrics(server_url)
    count = metric_total(after, "remote_vae_compute_seconds_count") - metric_total(
        before, "remote_vae_compute_seconds_count"
    )
    if after is not None and count > 0:
        spent = metric_total(after, "remote_vae_compute_seconds_sum") - metric_total(
            before, "remote_vae_compute_seconds_sum"
        )
        level.compute = spent / count
    return level


def batching_modes(requested: list[str] | None) -> list[str]:
    if requested:
        return requested
    try:
        from remote_vae.local_server.registry import Tuning  # noqa: F401
    except ImportError:
        return ["auto"]
    return ["off", "on"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument(
        "--requests", type=int, default=32, help="requests per level, shared by its clients (default 32)"
    )
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--threads", type=int, default=default_threads(), help="server torch threads")
    parser.add_argument(
        "--batching",
        nargs="+",
        choices=("auto", "on", "off"),
        help="server batching modes to run (default: off and on when the server has the switch)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 and 2 clients, 4 requests, 128 px")
    args = parser.parse_args()
    record_as_module("bench.load")
    if args.quick:
        args.clients, args.requests, args.size = [1, 2], 4, 128
    z = torch.randn(1, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))
    wire = protocol.build_decode_request(z, output_type="pt", partial_postprocess=True, do_scaling=False)

    table: list[str] = []
    verdicts = []
    for mode in batching_modes(args.batching):
        with Server(["sd=sd15:sd-small"], threads=args.threads, batching=mode) as server:
            url = f"{server.url}/sd"
            for _ in range(2):
                client.send(url, wire, retries=0)  # warm-up
            levels = []
            for clients in args.clients:
                level = run_level(server.url, url, wire, clients, args.requests)
                levels.append(level)
                print(
                    f"batching {mode}, {clients} clients: {len(level.latencies) / level.wall:.2f} req/s, "
                    f"{len(level.errors)} errors",
                    flush=True,
                )
        base = levels[0]
        base_throughput = len(base.latencies) / base.wall
        # One request's time through an idle server: typical (p50) and worst (p99) of one client alone.
        service_p50, service_p99 = percentile(base.latencies, 50), percentile(base.latencies, 99)
        rows = []
        for level in levels:
            throughput = len(level.latencies) / level.wall
            p99 = percentile(level.latencies, 99) if level.latencies else float("nan")
            rows.append(
                [
                    level.clients,
                    len(level.latencies),
                    len(level.errors),
                    throughput,
                    throughput / base_throughput,
                    percentile(level.latencies, 50) if level.latencies else "-",
                    p99,
                    f"{level.max_queue:g}",
                    "-" if level.compute is None else f"{level.compute * 1000:.0f}",
                    f"{p99 / (level.clients * service_p50):.2f}",
                    f"{p99 / (level.clients * service_p99):.2f}",
                ]
            )
        last = levels[-1]
        last_ratio = (len(last.latencies) / last.wall) / base_throughput
        errors = sum(len(level.errors) for level in levels)
        verdicts.append(
            f"batching {mode}: throughput at {last.clients} clients = {last_ratio:.2f} x at {base.clients} (target >= 0.9: "
            f"{'met' if last_ratio >= 0.9 else 'NOT met'}); errors {errors} (target 0: {'met' if errors == 0 else 'NOT met'}); "
            f"p99 <= clients x the p99 of 1 client at every level: {'met' if all(float(r[-1]) <= 1.0 for r in rows) else 'NOT met'}"
        )
        table += [f"**Server batching: {mode}** (queue depth from {levels[0].queue_source})", ""]
        table += markdown_table(
            [
                "clients",
                "ok",
                "errors",
                "throughput req/s",
                "vs 1 client",
                "p50 s",
                "p99 s",
                "max queue",
                "compute ms/request",
                "p99 / (clients x p50 of 1)",
                "p99 / (clients x p99 of 1)",
            ],
            rows,
        )
        table.append("")
        first_error = next((e for level in levels for e in level.errors), None)
        if first_error:
            table += [f"First error: {first_error}", ""]
    table += verdicts
    notes = (
        f"Server: bench.serve with sd-small (a real AutoencoderKL, tiny widths) on CPU, {args.threads} torch threads; "
        f"request: latent [1,4,{args.size // 8},{args.size // 8}] float32 -> uint8 [1,{args.size},{args.size},3]; "
        f"{args.requests} requests per level split over the clients, each a thread with its own session, no retries. "
        "The clients share the machine's 2 cores with the server, so their own CPU time competes with the decode. "
        "'compute' is the server's remote_vae_compute_seconds per request (a batched request counts its batch's time); "
        "the p99 bound is the client count (the longest possible queue) x the service time of one client alone, "
        "taken as its p50 (typical) and its p99 (the target's verdict)."
    )
    notes += f" ({revision()})"
    if args.quick:
        notes += " QUICK smoke run (--quick): not a measurement."
    record("Load: concurrent clients against one server (bench/load.py)", table, notes)


if __name__ == "__main__":
    main()
