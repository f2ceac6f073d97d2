"""uint8 decode answers streamed as they are rendered: raw pixels, or compressed frames (our `codec`
extension; docs/protocol.md, "Compressed frames").

The answer is cut into pieces in wire order: bands of frames or rows of raw pixels, or records of
frames (`frames.record_spans`). Each piece is rendered (and encoded) on the server's CPU pool, up to
one more piece than the pool has threads ahead of the one being sent, and sent as soon as it is
ready, so rendering, encoding and sending overlap. The codecs and the render release the GIL, so the
pieces run in parallel.

Once the status line is sent nothing can change it: a piece that fails, or a deadline that passes,
ends the answer early (the request log aborts the connection; the client sees a short body). A client
that leaves cancels the pieces not started yet.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from starlette.responses import StreamingResponse

from ..remote import frames, protocol
from ..remote.frames import Codec
from ..remote.protocol import ProtocolError
from .errors import DeadlineExceeded
from .postprocess import to_uint8
from .request_log import Exchange

T = TypeVar("T")

BAND_BYTES = 1 << 20  # raw pixels per band: sending starts after ~1 MB is rendered, not the whole answer


NEEDS: dict[Codec, str] = {"jxl": "imagecodecs with JPEG XL", "h264rgb": "PyAV with libx264rgb"}


def offered_codecs() -> tuple[Codec, ...]:
    """The codecs this server can encode (what each `NEEDS`)."""
    offered: list[Codec] = []
    try:
        import imagecodecs

        if imagecodecs.JPEGXL.available:
            offered.append("jxl")
    except ImportError:
        pass
    try:
        import av

        av.codec.Codec("libx264rgb", "w")
        offered.append("h264rgb")
    except (ImportError, ValueError):  # no PyAV, or an FFmpeg without libx264
        pass
    return tuple(offered)


def check_offered(codec: Codec | None, offered: tuple[Codec, ...]) -> None:
    if codec is not None and codec not in offered:
        raise ProtocolError(
            f"codec={codec} cannot be encoded by this server (it needs {NEEDS[codec]}); "
            f"the codecs it offers (GET /v1/models): {', '.join(offered) or 'none'}"
        )


@dataclass(frozen=True)
class Streaming:
    """What a streamed answer runs on: the CPU pool and its width, the request's deadline, its log."""

    submit: Callable[[Callable[[], Any]], Future[Any]]
    threads: int
    deadline: float  # time.monotonic() by which the last piece must be ready
    timeout: float  # the server's request limit, for the message when the deadline passes
    exchange: Exchange


@dataclass(frozen=True)
class Pixels:
    """A decode's output as the answer's uint8 NHWC frames [N,H,W,3], rendered piece by piece: float
    [B,3,H,W] / [B,3,F,H,W] through `to_uint8` (bit-exact), or pixels the device job rendered
    ([B,H,W,3] / [B,F,H,W,3], `postprocess.device_pixels`), only sliced."""

    x: torch.Tensor

    @property
    def rendered(self) -> bool:
        return self.x.dtype == torch.uint8

    @property
    def shape(self) -> tuple[int, int, int, int]:
        height, width = self.x.shape[-3:-1] if self.rendered else self.x.shape[-2:]
        return self.count, height, width, 3

    @property
    def count(self) -> int:
        """Frames in all: batch items times their frames."""
        return self.x.shape[0] * self.per_item

    @property
    def per_item(self) -> int:
        """A video's frames ([B,3,F,H,W] or [B,F,H,W,3]), or 1."""
        if self.x.ndim != 5:
            return 1
        return self.x.shape[1] if self.rendered else self.x.shape[2]

    def render(self, first: int, count: int, rows: slice = slice(None)) -> np.ndarray:
        """Frames first..first+count-1 (`rows` of each) as C-contiguous uint8 [count,rows,W,3]."""
        if self.rendered:
            return np.ascontiguousarray(self.x.reshape(-1, *self.x.shape[-3:])[first : first + count, rows])
        if self.x.ndim == 4:
            return to_uint8(self.x[first : first + count, :, rows]).numpy()
        parts = []  # a piece may span videos of a batch: one render per video
        for item, start, stop in _spans(first, count, self.per_item):
            parts.append(to_uint8(self.x[item : item + 1, :, start:stop, rows]).numpy())
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _spans(first: int, count: int, per_item: int) -> Iterator[tuple[int, int, int]]:
    """(item, first frame, end frame) of each batch item that frames first..first+count-1 touch."""
    frame = first
    while frame < first + count:
        item, start = divmod(frame, per_item)
        stop = min(per_item, start + first + count - frame)
        yield item, start, stop
        frame += stop - start


# --------------------------------------------------------------------------- raw uint8


def raw_answer(x: torch.Tensor, streaming: Streaming) -> StreamingResponse:
    """The `tensor/binary` uint8 answer, byte for byte as a whole body would be, sent in bands."""
    pixels = Pixels(x)
    headers = protocol.tensor_headers(pixels.shape, torch.uint8)
    headers["content-length"] = str(int(np.prod(pixels.shape)))
    tasks = (functools.partial(_band, pixels, *band) for band in raw_bands(pixels.shape))
    return StreamingResponse(_raw_body(tasks, streaming), headers=headers)


def raw_bands(shape: tuple[int, int, int, int]) -> Iterator[tuple[int, int, slice]]:
    """(first frame, frames, rows) of each band in wire order: whole frames when they are small,
    bands of rows of one frame (of equal height, about BAND_BYTES each) when they are large."""
    count, height, width, channels = shape
    frame_bytes = height * width * channels
    if frame_bytes < BAND_BYTES:
        step = BAND_BYTES // frame_bytes
        for first in range(0, count, step):
            yield first, min(step, count - first), slice(None)
        return
    bands = min(height, -(-frame_bytes // BAND_BYTES))  # of equal height: no sliver of a last band
    edges = [height * band // bands for band in range(bands + 1)]
    for frame in range(count):
        for top, bottom in zip(edges, edges[1:]):
            yield frame, 1, slice(top, bottom)


def _band(pixels: Pixels, first: int, count: int, rows: slice) -> tuple[memoryview, float]:
    started = time.perf_counter()
    band = pixels.render(first, count, rows)
    return memoryview(band).cast("B"), time.perf_counter() - started


async def _raw_body(
    tasks: Iterator[Callable[[], tuple[memoryview, float]]], streaming: Streaming
) -> AsyncIterator[memoryview]:
    async for band, seconds in in_order(tasks, streaming):
        streaming.exchange.render_seconds += seconds
        yield band


# --------------------------------------------------------------------------- compressed frames


@dataclass(frozen=True)
class Encoded:
    """One record, encoded: its header and payload, and the seconds it took (encode: CPU-seconds)."""

    header: bytes
    payload: bytes
    render_seconds: float
    encode_seconds: float


def frames_answer(x: torch.Tensor, codec: Codec, streaming: Streaming) -> StreamingResponse:
    """The uint8 answer as compressed frames (chunked: its size is known only at the end)."""
    pixels = Pixels(x)
    records = list(frames.record_spans(pixels.count, codec, streaming.threads))
    threads = max(1, streaming.threads // len(records))  # a lone big image: every thread on it
    tasks = (functools.partial(_record, pixels, codec, first, count, threads) for first, count in records)
    headers = {
        "content-type": frames.FRAMES_TYPE,
        "shape": protocol.format_shape(pixels.shape),
        "dtype": "uint8",
        frames.CODEC_HEADER: codec,
    }
    streaming.exchange.codec = codec
    return StreamingResponse(_frames_body(tasks, pixels.count, streaming), headers=headers)


def _record(pixels: Pixels, codec: Codec, first: int, count: int, threads: int) -> Encoded:
    started = time.perf_counter()
    rendered = pixels.render(first, count)
    encoding = time.perf_counter()
    payload = frames.encode(codec, rendered, threads=threads)
    done = time.perf_counter()
    # CPU-seconds as the threads given times the time taken: the codecs' own threads are not ours to time
    return Encoded(
        frames.record_header(first, count, len(payload)),
        payload,
        encoding - started,
        (done - encoding) * threads,
    )


async def _frames_body(
    tasks: Iterator[Callable[[], Encoded]], count: int, streaming: Streaming
) -> AsyncIterator[bytes]:
    ex = streaming.exchange
    yield frames.MAGIC
    async for record in in_order(tasks, streaming):
        ex.render_seconds += record.render_seconds
        ex.encode_seconds += record.encode_seconds
        yield record.header
        yield record.payload
    stats = {
        "render_seconds": ex.render_seconds,
        "encode_seconds": ex.encode_seconds,
        "encode_threads": streaming.threads,
    }
    yield frames.end_record(count, stats)


# --------------------------------------------------------------------------- the pipeline


async def in_order(tasks: Iterator[Callable[[], T]], streaming: Streaming) -> AsyncIterator[T]:
    """The results of `tasks`, in order, each run on the CPU pool with up to `threads + 1` submitted
    ahead: a bound on the memory one answer holds, enough to keep every thread busy while one
    result is sent. Pieces not started when the answer ends (a client that left, a failure, the
    deadline) are cancelled."""
    pending: deque[asyncio.Future[T]] = deque()
    try:
        while True:
            while len(pending) <= streaming.threads and (task := next(tasks, None)) is not None:
                pending.append(asyncio.wrap_future(streaming.submit(task)))
            if not pending:
                return
            left = streaming.deadline - time.monotonic()
            try:
                result = await asyncio.wait_for(pending[0], max(left, 0))
            except asyncio.TimeoutError:
                raise DeadlineExceeded(
                    f"the answer took longer than the server's limit of {streaming.timeout:g} s "
                    "(--request-timeout)"
                ) from None
            pending.popleft()
            yield result
    finally:
        for future in pending:
            future.cancel()
