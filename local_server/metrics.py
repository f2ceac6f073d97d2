"""Prometheus metrics in the text exposition format, without a client library.

`Metrics`: counters, gauges and histograms keyed by label values; `render()` writes the `/metrics` page.
Thread-safe: the event loop, device workers and the conversion pool all record into one `Metrics`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

INF_LE = 'le="+Inf"'
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


@dataclass
class _Metric:
    name: str
    help: str
    kind: str  # counter | gauge | histogram
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    values: dict[tuple[str, ...], float] = field(default_factory=dict)
    histograms: dict[tuple[str, ...], list[float]] = field(
        default_factory=dict
    )  # bucket counts + sum + count


class Metrics:
    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._lock = threading.Lock()

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self._metrics[name] = _Metric(name, help, "counter", tuple(labels))

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self._metrics[name] = _Metric(name, help, "gauge", tuple(labels))

    def histogram(
        self, name: str, help: str, labels: Sequence[str] = (), buckets: Sequence[float] = LATENCY_BUCKETS
    ) -> None:
        self._metrics[name] = _Metric(name, help, "histogram", tuple(labels), tuple(sorted(buckets)))

    def _key(self, metric: _Metric, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(metric.labels):
            raise ValueError(f"metric {metric.name} takes labels {metric.labels}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in metric.labels)

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        metric = self._metrics[name]
        with self._lock:
            key = self._key(metric, labels)
            metric.values[key] = metric.values.get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        metric = self._metrics[name]
        with self._lock:
            metric.values[self._key(metric, labels)] = value

    def observe(self, name: str, value: float, **labels: str) -> None:
        metric = self._metrics[name]
        with self._lock:
            key = self._key(metric, labels)
            state = metric.histograms.setdefault(key, [0.0] * (len(metric.buckets) + 2))
            for i, bound in enumerate(metric.buckets):
                if value <= bound:
                    state[i] += 1
            state[-2] += value
            state[-1] += 1

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for metric in self._metrics.values():
                lines.append(f"# HELP {metric.name} {metric.help}")
                lines.append(f"# TYPE {metric.name} {metric.kind}")
                if metric.kind != "histogram":
                    for key, value in sorted(metric.values.items()):
                        lines.append(f"{metric.name}{_labels(metric.labels, key)} {_number(value)}")
                    continue
                for key, state in sorted(metric.histograms.items()):
                    for bound, count in zip(metric.buckets, state):
                        le = f'le="{_number(bound)}"'
                        lines.append(
                            f"{metric.name}_bucket{_labels(metric.labels, key, le)} {_number(count)}"
                        )
                    lines.append(
                        f"{metric.name}_bucket{_labels(metric.labels, key, INF_LE)} {_number(state[-1])}"
                    )
                    lines.append(f"{metric.name}_sum{_labels(metric.labels, key)} {_number(state[-2])}")
                    lines.append(f"{metric.name}_count{_labels(metric.labels, key)} {_number(state[-1])}")
        return "\n".join(lines) + "\n"


def server_metrics() -> Metrics:
    """The metrics our VAE server records (names follow Prometheus conventions)."""
    r = Metrics()
    r.counter(
        "remote_vae_requests_total",
        "Requests by model, operation, outcome and HTTP status.",
        ("model", "op", "outcome", "status"),
    )
    r.histogram("remote_vae_queue_seconds", "Time a request waited for a device worker.", ("model", "op"))
    r.histogram("remote_vae_compute_seconds", "Time on the device (decode or encode).", ("model", "op"))
    r.histogram(
        "remote_vae_render_seconds",
        "Time spent rendering the response (JPEG/PNG/mp4/raw), summed over the threads that rendered its parts.",
        ("model", "op"),
    )
    r.histogram(
        "remote_vae_encode_seconds",
        "CPU time compressing answers' frames (codec extension), summed over threads.",
        ("model", "codec"),
    )
    r.histogram("remote_vae_request_seconds", "Whole request time.", ("model", "op"))
    r.gauge("remote_vae_queue_depth", "Requests admitted and not yet finished.")
    r.counter("remote_vae_bytes_in_total", "Request body bytes.", ("model",))
    r.counter("remote_vae_bytes_out_total", "Response body bytes.", ("model",))
    r.counter("remote_vae_tiled_total", "Jobs that ran tiled.", ("model",))
    r.counter("remote_vae_fallback_total", "Out-of-memory or NaN fallbacks taken.", ("model", "kind"))
    r.counter(
        "remote_vae_rejected_total",
        "Requests refused before running (queue full, limits, auth).",
        ("reason",),
    )
    return r
