"""Taking a uint8 decode answer as it arrives, straight into where its pixels go.

A receiver is made when a 2xx answer's headers arrive (`receiver_for`), is fed each body chunk in the
transport's worker thread and finished after the last one, so pixels are converted while the rest is
still in flight: raw uint8 bands byte by byte, compressed frames (remote/frames.py) decoded on a small
pool of threads (the codecs release the GIL). A retry makes a new receiver writing to the same place.
Every problem is a RemoteVAEError naming the endpoint, so a caller's fallback runs.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from . import frames, protocol
from .errors import clip
from .reply import MALFORMED_TENSOR, ExpectedShape, Reply

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

    from .reply import TensorChecks

MAX_DECODE_THREADS = 4  # the client's share of its cores for decoding frames (ComfyUI runs beside it)
SCALE = np.float32(255.0)


class Receiver(Protocol):
    def feed(self, chunk: bytes) -> None: ...

    def finish(self) -> None: ...


ReceiverFactory = Callable[[Reply], Receiver]  # called with the answer's head (its body not read yet)


def decode_threads() -> int:
    return max(1, min(MAX_DECODE_THREADS, os.cpu_count() or 1))


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def decode_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(decode_threads(), thread_name_prefix="remote-vae-frames")
        return _pool


class Target:
    """Where [N,H,W,3] pixels go: a uint8 array (copied as they are) or a float32 one (value / 255, the
    same IEEE operation as `uint8 / 255` on the whole, so the same values)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self._flat = array.reshape(-1)
        self._float = array.dtype == np.float32

    @property
    def shape(self) -> list[int]:
        return list(self.array.shape)

    def put_bytes(self, offset: int, data: bytes | memoryview) -> None:
        values = np.frombuffer(data, dtype=np.uint8)
        out = self._flat[offset : offset + values.size]
        if self._float:
            np.divide(values, SCALE, out=out)
        else:
            out[...] = values

    def decode(self, codec: frames.Codec, record: frames.Record) -> None:
        """One record's frames decoded into their places (uint8: in place; float32: through a scratch)."""
        place = self.array[record.first : record.first + record.count]
        if not self._float:
            frames.decode_into(codec, record.payload, place)
            return
        scratch = np.empty(place.shape, dtype=np.uint8)
        frames.decode_into(codec, record.payload, scratch)
        np.divide(scratch, SCALE, out=place)


@dataclass
class Received:
    """What a finished receiver knows besides the pixels: the codec (None: raw) and the timings."""

    codec: frames.Codec | None = None
    server_stats: dict[str, float] | None = None
    decode_seconds: float = 0.0  # summed over the client's threads


class RawReceiver:
    """A raw uint8 answer: each chunk's bytes are pixel values, converted where they belong."""

    def __init__(self, head: Reply, target: Target, length: int) -> None:
        self.head, self.target, self.length = head, target, length
        self.received = Received()
        self._offset = 0

    def feed(self, chunk: bytes) -> None:
        if self._offset + len(chunk) > self.length:
            raise self._bad_length(self._offset + len(chunk))
        self.target.put_bytes(self._offset, chunk)
        self._offset += len(chunk)

    def finish(self) -> None:
        if self._offset != self.length:
            raise self._bad_length(self._offset)

    def _bad_length(self, got: int):
        try:
            protocol.check_body_length(got, self.target.shape, torch.uint8)
        except protocol.ProtocolError as exc:
            return self.head.unexpected(f"with a bad tensor: {clip(str(exc))}")
        raise AssertionError("unreachable: the lengths differ")


class FramesReceiver:
    """A compressed answer: records are checked as they arrive and decoded on the pool, in parallel."""

    def __init__(self, head: Reply, target: Target, codec: frames.Codec) -> None:
        self.head, self.target = head, target
        _, height, width, _ = target.shape
        self.reader = frames.RecordReader(target.shape[0], frames.max_payload(height, width))
        self.received = Received(codec)
        self._pending: list[Future] = []
        self._lock = threading.Lock()

    def feed(self, chunk: bytes) -> None:
        try:
            records = list(self.reader.feed(chunk))
        except frames.FramesError as exc:
            raise self._corrupt(exc) from None
        pool = decode_pool()
        self._pending += [pool.submit(self._decode, record) for record in records]

    def finish(self) -> None:
        try:
            stats = self.reader.finish()
            for pending in self._pending:
                pending.result()
        except frames.FramesError as exc:
            raise self._corrupt(exc) from None
        finally:
            self.settle()
        self.received.server_stats = stats

    def settle(self) -> None:
        """Wait for every decode begun (an abandoned attempt must not write after its retry)."""
        for pending in self._pending:
            pending.exception()

    def _decode(self, record: frames.Record) -> None:
        started = time.perf_counter()
        self.target.decode(self.received.codec, record)  # type: ignore[arg-type]
        with self._lock:
            self.received.decode_seconds += time.perf_counter() - started

    def _corrupt(self, exc: Exception):
        codec = self.received.codec
        return self.head.unexpected(
            f"with a {codec} body that does not hold the frames its headers declare: {clip(str(exc))}",
            hint="the answer was damaged on the way, or the server's codec is broken: retry, or ask "
            "for raw pixels (transfer lossless)",
        )


def receiver_for(
    place: Callable[[list[int]], Target], want: ExpectedShape, **checks: Unpack[TensorChecks]
) -> ReceiverFactory:
    """A factory of receivers for a uint8 [N,H,W,3] answer, raw or compressed by one of frames.CODECS:
    its headers must declare `want` (and the `checks` of `Reply.declared_tensor`), within the request's
    limits; `place(shape)` gives the Target its pixels go to."""
    previous: list[FramesReceiver] = []

    def make(head: Reply) -> RawReceiver | FramesReceiver:
        for abandoned in previous:
            abandoned.settle()
        codec = head.headers.get(frames.CODEC_HEADER)
        compressed = codec is not None or _content_type(head) == frames.FRAMES_TYPE
        length = _declared_length(head, compressed)
        shape, _ = replace(head, length=length).declared(want, dtype=torch.uint8, **checks)
        if len(shape) != 4 or shape[-1] != 3:
            raise head.unexpected(
                f"with uint8 of shape {shape}; partial_postprocess=True should give [N,H,W,3]"
            )
        if length > head.limits.max_bytes:
            raise head.unexpected(
                f"declaring {length} bytes of pixels, more than the {head.limits.max_bytes} bytes a reply "
                "to this request can hold; nothing was allocated"
            )
        target = place(shape)
        if not compressed:
            return RawReceiver(head, target, length)
        if codec not in frames.CODECS:
            raise head.unexpected(
                f"with frames compressed by {codec!r}, which this client does not read "
                f"(it reads {', '.join(frames.CODECS)})",
                hint="update remote-vae on this machine, or ask for raw pixels (transfer lossless)",
            )
        receiver = FramesReceiver(head, target, codec)  # type: ignore[arg-type]
        previous[:] = [receiver]
        return receiver

    return make


def _content_type(head: Reply) -> str:
    return (head.headers.get("content-type") or "").split(";")[0].strip().lower()


def _declared_length(head: Reply, compressed: bool) -> int:
    """The raw body length to check the headers with: Content-Length for an identity-encoded raw answer
    (checked at once, as for a whole body), else what `shape` x `dtype` declare (checked at the end)."""
    length = head.headers.get("content-length", "").strip()
    encoding = protocol.content_encoding(head.headers)
    if not compressed and encoding == "identity" and length.isascii() and length.isdigit():
        return int(length)
    try:
        shape = protocol.parse_shape_header(head.headers.get("shape"))
        dtype = protocol.parse_dtype(head.headers.get("dtype", ""))
        return protocol.expected_nbytes(shape, dtype)
    except MALFORMED_TENSOR:
        return 0  # declared_tensor says what is wrong


def received_frames(reply: Reply) -> torch.Tensor:
    """The [N,H,W,3] frames a receiver made from `reply` (see `receiver_for`), in its Target's dtype."""
    return torch.from_numpy(reply.receiver.target.array)
