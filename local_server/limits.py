"""Request limits: the biggest images, videos, audio clips and bodies a server accepts, and how many
requests it holds.

Hugging Face's endpoints cap images at 2048^2; our defaults let a 24 GB GPU serve 4096^2 images
(tiled) and long videos, within a memory budget per request. Every limit is checked from what is known
first (the query's shape before the body, an image's header before its pixels). A request over a limit
gets a 413 naming the limit; one past `max_in_flight` gets a 503 with Retry-After at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from . import memory
from .errors import ServerError
from .memory import Footprint
from .metrics import Metrics


class LimitExceeded(ServerError, ValueError):
    """A request over a configured limit; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 413) -> None:
        super().__init__(message)
        self.status = status


# Audio counts against the pixel limits by its values: one pixel is 3 (RGB) values, one audio sample
# `channels` values. With the defaults a clip may hold 50M values (stereo at 44.1 kHz: 9.5 minutes).
AUDIO_VALUES_PER_PIXEL = 3


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 4096 * 4096  # per image or per video frame (output side for decode)
    max_frames: int = 257  # per video
    max_batch_pixels: int = 4 * 4096 * 4096  # all images of one request together
    max_request_bytes: int = 512 << 20
    # Requests in the server at once, running or waiting for a device worker (each device runs one
    # job at a time anyway); more are refused with 503 + Retry-After.
    max_in_flight: int = 18
    request_timeout: float = 600.0  # seconds a request may take end to end
    # Peak host memory one request may need (memory.Footprint): an eighth of this machine's memory, so
    # the few requests converting answers at once (device workers, CPU pool) stay well within it.
    max_request_memory: int = field(default_factory=lambda: memory.host_total_bytes() // 8)

    def check_body(self, length: int) -> None:
        if length > self.max_request_bytes:
            raise LimitExceeded(
                f"request body of {length} bytes exceeds the server's limit of {self.max_request_bytes} bytes "
                "(--max-request-bytes); split the batch into several requests"
            )

    def check_output(self, batch: int, frames: int, height: int, width: int) -> None:
        """Check the pixel size of what a request would produce (or what an encode receives)."""
        if height * width > self.max_pixels:
            raise LimitExceeded(
                f"{width}x{height} = {height * width} pixels per image exceeds the server's limit of "
                f"{self.max_pixels} pixels (--max-pixels)"
            )
        if frames > self.max_frames:
            raise LimitExceeded(
                f"{frames} frames exceed the server's limit of {self.max_frames} frames (--max-frames)"
            )
        if batch * frames * height * width > self.max_batch_pixels:  # a video's frames count like images
            what, fewer = f"{batch} x {width}x{height}", "images"
            if frames > 1:
                what, fewer = f"{batch} x {frames} frames of {width}x{height}", "images or frames"
            raise LimitExceeded(
                f"a batch of {what} exceeds the server's limit of {self.max_batch_pixels} "
                f"pixels per request; send fewer {fewer} per request"
            )

    def check_audio(self, batch: int, channels: int, samples: int) -> None:
        """Check the size of the audio a request would produce (or an encode receives): its values count
        as an image's do (3 a pixel), against --max-pixels per clip and --max-batch-pixels per request."""
        values, most = channels * samples, AUDIO_VALUES_PER_PIXEL * self.max_pixels
        if values > most:
            raise LimitExceeded(
                f"a clip of {channels} channels x {samples} samples = {values} values exceeds the server's limit of "
                f"{most} values per clip ({AUDIO_VALUES_PER_PIXEL} x --max-pixels, an image's worth); send shorter clips"
            )
        most = AUDIO_VALUES_PER_PIXEL * self.max_batch_pixels
        if batch * values > most:
            raise LimitExceeded(
                f"a batch of {batch} clips of {channels} channels x {samples} samples exceeds the server's limit of "
                f"{most} values per request ({AUDIO_VALUES_PER_PIXEL} x --max-batch-pixels); send fewer clips per request"
            )

    def check_memory(self, need: Footprint, device: torch.device) -> None:
        """Refuse a request whose estimated peak memory (`memory.Footprint`) passes a budget."""
        if need.host > self.max_request_memory:
            raise LimitExceeded(
                f"this request needs about {_gib(need.host)} of host memory at its peak ({need.what}), over the "
                f"server's limit of {_gib(self.max_request_memory)} per request (--max-request-memory); "
                "send fewer or smaller images or frames per request"
            )
        budget = memory.device_budget(device)
        if budget is not None and need.device > budget:
            raise LimitExceeded(
                f"this request needs about {_gib(need.device)} of {device} memory ({need.what}), over the "
                f"{_gib(budget)} one request may use there; send fewer or smaller images or frames per request"
            )


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.2f} GiB"


class ServerBusy(ServerError):
    """Every admission slot is taken: retry shortly."""

    status = 503
    headers = {"retry-after": "1"}


class Admission:
    """At most `capacity` requests in the server's work at once: past it, a 503 with Retry-After at once.

    A job route takes a slot once its body has arrived (`uploads.read_body`) and gives it back when its
    answer is ready: neither a slow upload nor a client slow to read its answer holds one.
    """

    def __init__(self, capacity: int, metrics: Metrics) -> None:
        self.capacity = capacity
        self.active = 0
        self._metrics = metrics

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if self.active >= self.capacity:
            self._metrics.inc("remote_vae_rejected_total", reason="queue_full")
            raise ServerBusy(
                f"the server is busy ({self.capacity} requests in progress or queued); retry shortly"
            )
        self._count(+1)
        try:
            yield
        finally:
            self._count(-1)

    def _count(self, change: int) -> None:
        self.active += change
        self._metrics.set("remote_vae_queue_depth", self.active)
