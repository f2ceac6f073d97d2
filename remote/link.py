"""The link rule: raw uint8 pixels or lossless compressed frames, whichever arrives sooner from a server.

Per server origin, from this client's own recent transfers (a bounded history; nothing is ever waited
for): the throughput while receiving (body bytes / seconds from the first to the last body byte, less
this client's own work between reads), the compressed/raw byte ratio seen, the server's encode
CPU-seconds per megapixel (its end-record stats) and this client's decode CPU-seconds per megapixel.
For a job of `frames` frames:

    T          = median raw rate, at least the fastest compressed rate (encoding paces those)
    raw        = raw_bytes / T
    stages     = (raw_bytes * ratio / T,  mp * encode / server threads,  mp * decode / client threads)
    compressed = max(stages) + sum(stages) / frames     (several frames: pipelined, plus one frame's latency)
    compressed = sum(stages)                             (one frame: nothing overlaps)
    compress  <=> compressed < MARGIN * raw

Before any measurement the bench's figures stand in (DEFAULT_*); with the throughput unknown, a
loopback server gets raw and any other one the codec.

The upload is packed (remote/planes.py) below UPLOAD_BREAK_EVEN: packing and unpacking a latent cost
~6 ms per MB on the two sides together and save ~0.3 of its bytes (bfloat16), a gain below ~47 MB/s.
Home links upload slower than they download, so the download rate measured errs on the safe side.
"""

from __future__ import annotations

import statistics
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from .tokens import is_loopback

MARGIN = 0.85  # compress only when it is clearly faster: the estimates are rough
HISTORY = 8  # transfers remembered per origin
DEFAULT_RATIO = 0.3  # JPEG XL lossless effort 1 on photographs: ~0.29x raw
DEFAULT_ENCODE = 0.005  # server CPU-seconds per megapixel (effort 1: ~4 ms/MP)
DEFAULT_DECODE = 0.025  # client CPU-seconds per megapixel (~23 ms/MP on one thread)
UPLOAD_BREAK_EVEN = 40e6  # bytes per second under which a packed upload arrives sooner
MIN_SAMPLE_BYTES = 64 << 10  # smaller bodies arrive in a few packets: their rate says little
MEGA = 1e6


@dataclass(frozen=True)
class Sample:
    """One finished transfer of pixels, as the client saw it."""

    raw_bytes: int  # what the pixels take as uint8
    wire_bytes: int  # what came over the wire
    receive_seconds: float  # first to last body byte, less this client's own work between reads
    megapixels: float
    compressed: bool
    encode_seconds: float | None = None  # the server's CPU-seconds (compressed only)
    encode_threads: int | None = None
    decode_seconds: float | None = None  # this client's CPU-seconds (compressed only)


@dataclass(frozen=True)
class Estimate:
    """What the rule knows of one link: None throughput until a transfer was measured."""

    throughput: float | None = None  # bytes per second
    ratio: float = DEFAULT_RATIO
    encode_per_mp: float = DEFAULT_ENCODE
    encode_threads: int = 1
    decode_per_mp: float = DEFAULT_DECODE


@dataclass(frozen=True)
class Job:
    """The pixels one answer holds."""

    frames: int
    height: int
    width: int

    @property
    def raw_bytes(self) -> int:
        return self.frames * self.height * self.width * 3

    @property
    def megapixels(self) -> float:
        return self.frames * self.height * self.width / MEGA


def estimate(samples: Sequence[Sample]) -> Estimate:
    """The medians of what `samples` measured; the defaults for what none did.

    The throughput is the median rate of raw transfers, but never less than the fastest compressed one:
    a compressed answer can arrive no faster than the server encodes it, so its rate only bounds the
    link from below (counted as the link's, a fast link would look as slow as the encoder, and keep
    being compressed)."""
    raw_rates = [_rate(s) for s in samples if not s.compressed and _measures_rate(s)]
    packed_rates = [_rate(s) for s in samples if s.compressed and _measures_rate(s)]
    at_least = max(packed_rates, default=0.0)
    throughput = max(statistics.median(raw_rates) if raw_rates else 0.0, at_least) or None
    packed = [s for s in samples if s.compressed and s.raw_bytes > 0 and s.megapixels > 0]
    encoded = [s for s in packed if s.encode_seconds is not None]
    decoded = [s for s in packed if s.decode_seconds is not None]
    threads = [s.encode_threads for s in encoded if s.encode_threads]
    return Estimate(
        throughput=throughput,
        ratio=_median([s.wire_bytes / s.raw_bytes for s in packed], DEFAULT_RATIO),
        encode_per_mp=_median([s.encode_seconds / s.megapixels for s in encoded], DEFAULT_ENCODE),  # type: ignore[operator]
        encode_threads=max(1, round(statistics.median(threads))) if threads else 1,
        decode_per_mp=_median([s.decode_seconds / s.megapixels for s in decoded], DEFAULT_DECODE),  # type: ignore[operator]
    )


def raw_seconds(link: Estimate, job: Job) -> float:
    assert link.throughput is not None
    return job.raw_bytes / link.throughput


def compressed_seconds(link: Estimate, job: Job, client_threads: int) -> float:
    assert link.throughput is not None
    stages = (
        job.raw_bytes * link.ratio / link.throughput,
        job.megapixels * link.encode_per_mp / link.encode_threads,
        job.megapixels * link.decode_per_mp / max(1, client_threads),
    )
    if job.frames > 1:
        return max(stages) + sum(stages) / job.frames
    return sum(stages)


def should_compress(link: Estimate, job: Job, client_threads: int, *, loopback: bool) -> bool:
    """The rule (see the module docstring)."""
    if link.throughput is None:
        return not loopback
    return compressed_seconds(link, job, client_threads) < MARGIN * raw_seconds(link, job)


def should_pack_upload(link: Estimate, *, loopback: bool) -> bool:
    """Whether packing the upload pays on this link (see the module docstring)."""
    if link.throughput is None:
        return not loopback
    return link.throughput < UPLOAD_BREAK_EVEN


class LinkBook:
    """Recent samples per origin (thread-safe; each history bounded to HISTORY)."""

    def __init__(self) -> None:
        self._samples: dict[str, deque[Sample]] = {}
        self._lock = threading.Lock()

    def record(self, origin: str, sample: Sample) -> None:
        with self._lock:
            self._samples.setdefault(origin, deque(maxlen=HISTORY)).append(sample)

    def history(self, origin: str) -> list[Sample]:
        """The samples kept for `origin`, oldest first."""
        with self._lock:
            return list(self._samples.get(origin, ()))

    def estimate(self, origin: str) -> Estimate:
        return estimate(self.history(origin))

    def compress(self, origin: str, job: Job, client_threads: int) -> bool:
        return should_compress(self.estimate(origin), job, client_threads, loopback=is_loopback(origin))

    def pack_upload(self, origin: str) -> bool:
        return should_pack_upload(self.estimate(origin), loopback=is_loopback(origin))

    def forget(self) -> None:
        with self._lock:
            self._samples.clear()


LINKS = LinkBook()  # the process's own measurements


def _rate(sample: Sample) -> float:
    return sample.wire_bytes / sample.receive_seconds


def _measures_rate(sample: Sample) -> bool:
    return sample.wire_bytes >= MIN_SAMPLE_BYTES and sample.receive_seconds > 0


def _median(values: list[float], default: float) -> float:
    return statistics.median(values) if values else default
