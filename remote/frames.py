"""Compressed frames on the wire: the body of a decode answered with our `codec` extension.

docs/protocol.md, "Compressed frames", describes the format this module writes (server) and reads
(client). The answer is the uint8 NHWC pixels of `output_type=pt&partial_postprocess=True`, cut into
records in frame order, each holding one or more frames encoded by the codec the response names:

    body    = MAGIC record* end
    record  = <u32 first frame> <u32 frame count> <u32 payload bytes> payload   (little-endian)
    end     = <u32 frames in all> <u32 0> <u32 stats bytes> stats (JSON: the server's encode seconds)

`jxl` is lossless (one JPEG XL codestream per frame). `h264rgb` is near-lossless (an H.264 RGB
elementary stream per record, several frames each): the server checks every record against the exact
pixels and sends none whose error exceeds NEAR_LOSSLESS_MAX_ERROR.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np

Codec = Literal["jxl", "h264rgb"]
CODECS: tuple[Codec, ...] = get_args(Codec)
LOSSLESS_CODECS: tuple[Codec, ...] = ("jxl",)

FRAMES_TYPE = "application/x-remote-vae-frames"
CODEC_HEADER = "x-remote-vae-codec"
MAGIC = b"RVF1"
RECORD = struct.Struct("<III")  # first frame (or frames in all), frame count (0: end), payload bytes

NEAR_LOSSLESS_MAX_ERROR = 8  # of 255, per channel value, guaranteed by the server's check
JXL_EFFORT = 1  # libjxl's fastest lossless mode: ~4 ms/MP to encode, ~0.29x raw on photographs
H264_QP = (14, 10, 0)  # tried in turn until a record is within the bound; 0 is lossless for libx264rgb
# A record starts with a key frame: fewer frames cost bytes, more delay the first record and balance
# worse over the encoding threads. Records hold at most the first; where the threads would otherwise
# idle, there are more (up to one per H264_MIN_FRAMES_PER_RECORD frames).
H264_FRAMES_PER_RECORD = 16
H264_MIN_FRAMES_PER_RECORD = 8
MAX_STATS_BYTES = 4096


class FramesError(ValueError):
    """A compressed-frames body that does not hold what its headers declare; the message says what."""


# --------------------------------------------------------------------------- codecs


def record_spans(count: int, codec: Codec, threads: int = 1) -> Iterator[tuple[int, int]]:
    """(first frame, frames) of each record of `count` frames: one frame per jxl record; h264rgb frames
    in records of equal size (within one frame) of at most H264_FRAMES_PER_RECORD, as many as a
    multiple of `threads` where records of H264_MIN_FRAMES_PER_RECORD allow it, so that the last
    round of encoding keeps every thread busy (81 frames on 2 threads: 6 records of 14 or 13)."""
    if codec == "jxl":
        records = count
    else:
        records = -(-count // H264_FRAMES_PER_RECORD)
        balanced = -(-records // threads) * threads
        records = max(records, min(balanced, -(-count // H264_MIN_FRAMES_PER_RECORD)))
    first = 0
    for index in range(records):
        size = count // records + (index < count % records)
        yield first, size
        first += size


def encode(codec: Codec, frames: np.ndarray, *, threads: int = 1) -> bytes:
    """`frames` [n,H,W,3] uint8 as one record's payload (`jxl`: n must be 1; `h264rgb`: checked against
    the bound, `near_lossless_encode`)."""
    if codec == "jxl":
        if frames.shape[0] != 1:
            raise ValueError(f"a jxl record holds one frame, not {frames.shape[0]}")
        import imagecodecs

        return imagecodecs.jpegxl_encode(
            np.ascontiguousarray(frames[0]), lossless=True, effort=JXL_EFFORT, numthreads=threads
        )
    return near_lossless_encode(frames, threads=threads)


def decode_into(codec: Codec, payload: bytes | memoryview, out: np.ndarray, *, threads: int = 1) -> None:
    """Decode one record's payload into `out` [n,H,W,3] uint8; FramesError unless it holds exactly that.

    The declared size is checked before anything is decoded (a hostile header allocates nothing)."""
    try:
        if codec == "jxl":
            import imagecodecs

            imagecodecs.jpegxl_decode(bytes(payload), out=out[0], numthreads=threads)
        else:
            _h264_decode_into(bytes(payload), out, threads)
    except FramesError:
        raise
    except Exception as exc:  # each library raises its own kinds on bytes it cannot read
        raise FramesError(f"a {codec} record does not decode to {_shape(out)} pixels: {exc}") from None


def near_lossless_encode(frames: np.ndarray, *, threads: int = 1) -> bytes:
    """`frames` as h264rgb within NEAR_LOSSLESS_MAX_ERROR of the exact pixels: each quantiser of H264_QP
    is tried until the record, as a decoder gives it back, is within the bound (qp 0 is lossless)."""
    for qp in H264_QP:
        if qp == 0:
            return _h264_encode(frames, qp=0, threads=threads)
        payload, error = _h264_encode_checked(frames, qp, threads)
        if error <= NEAR_LOSSLESS_MAX_ERROR:
            return payload
    raise AssertionError("unreachable: qp 0 is lossless")


def max_error(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.max(np.maximum(a, b) - np.minimum(a, b), initial=0))


def _h264_encode_checked(frames: np.ndarray, qp: int, threads: int) -> tuple[bytes, int]:
    """The record at `qp` and its largest error as decoded. The encoder's own reconstruction (x264's
    dump-yuv: the frames any conforming decoder gives back, bit for bit) costs half of decoding the
    record; where x264 could not write it all (a full scratch directory), the record is decoded."""
    with _scratch_file() as path:
        payload = _h264_encode(frames, qp=qp, threads=threads, dump=path)
        planes = _reconstruction(path, frames.shape) if path is not None else None
    if planes is not None:
        return payload, _planar_error(planes, frames)
    decoded = np.empty_like(frames)
    _h264_decode_into(payload, decoded, threads)
    return payload, max_error(decoded, frames)


RGB_PLANES = (2, 0, 1)  # libx264rgb's planes are G, B, R: the plane holding R, G and B in turn
SCRATCH_DIRS = ("/dev/shm",)  # where x264 writes its reconstruction, the first that is writable (else TMPDIR)


def _h264_encode(frames: np.ndarray, *, qp: int, threads: int, dump: str | None = None) -> bytes:
    import av  # only the near-lossless path needs PyAV

    options = {"preset": "ultrafast", "qp": str(qp)}
    if dump is not None:
        options["x264-params"] = f"dump-yuv={dump}"
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="h264") as container:
        stream = container.add_stream("libx264rgb", rate=24, options=options)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "rgb24"
        stream.thread_count = threads
        for frame in frames:
            container.mux(
                stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24"))
            )
        container.mux(stream.encode())
    return buffer.getvalue()


@contextlib.contextmanager
def _scratch_file() -> Iterator[str | None]:
    """A new empty file for x264 to write to, removed afterwards: in memory (/dev/shm) where there is one.
    None where its path cannot go into x264's options (they are separated by ':')."""
    handle, path = tempfile.mkstemp(prefix="remote-vae-", suffix=".gbr", dir=_scratch_dir(SCRATCH_DIRS))
    os.close(handle)
    try:
        yield None if ":" in path else path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


@functools.cache
def _scratch_dir(candidates: tuple[str, ...]) -> str | None:
    """The first writable directory of `candidates` (None: the system's temporary one), looked up once."""
    return next((d for d in candidates if os.path.isdir(d) and os.access(d, os.W_OK)), None)


def _reconstruction(path: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """The planar [n,3,H,W] frames x264 wrote to `path`; None unless it wrote them all (a full disk)."""
    count, height, width, channels = shape
    data = np.fromfile(path, dtype=np.uint8)
    if data.size != count * channels * height * width:
        return None
    return data.reshape(count, channels, height, width)


def _h264_decode_into(payload: bytes, out: np.ndarray, threads: int) -> None:
    import av

    count = 0
    with av.open(io.BytesIO(payload), mode="r", format="h264") as container:
        stream = container.streams.video[0]
        stream.thread_count = threads
        for frame in container.decode(stream):
            if count >= out.shape[0] or (frame.height, frame.width) != out.shape[1:3]:
                raise FramesError(
                    f"an h264rgb record holds a {frame.width}x{frame.height} frame #{count + 1} where "
                    f"{_shape(out)} pixels were declared"
                )
            out[count] = frame.to_ndarray(format="rgb24")
            count += 1
    if count != out.shape[0]:
        raise FramesError(f"an h264rgb record holds {count} frames where {out.shape[0]} were declared")


def _planar_error(planes: np.ndarray, frames: np.ndarray) -> int:
    rgb = np.empty_like(frames)
    for channel, plane in enumerate(RGB_PLANES):
        rgb[..., channel] = planes[:, plane]
    return max_error(rgb, frames)


def _shape(out: np.ndarray) -> str:
    return "x".join(map(str, out.shape))


# --------------------------------------------------------------------------- records


def record_header(first: int, count: int, payload_bytes: int) -> bytes:
    """One record's header; its payload follows it on the wire as it is (no copy is made)."""
    return RECORD.pack(first, count, payload_bytes)


def max_payload(height: int, width: int) -> int:
    """The most bytes one frame's payload may take: raw size plus room for the codecs' overhead on
    incompressible content (a bound on what a client buffers, not a size any codec reaches)."""
    return height * width * 3 * 9 // 8 + 65536


def end_record(frames: int, stats: dict[str, float]) -> bytes:
    body = json.dumps(stats, separators=(",", ":")).encode()
    return RECORD.pack(frames, 0, len(body)) + body


@dataclass
class Record:
    first: int
    count: int
    payload: memoryview


@dataclass
class RecordReader:
    """Reads records from chunks as they arrive, checking each against the declared frame count and
    `max_payload` before buffering it; `finish` checks the stream ended with its end record."""

    frames: int
    max_payload: int
    stats: dict[str, float] | None = None
    _buffer: bytearray = field(default_factory=bytearray)
    _next: int = 0  # the frame the next record must start at
    _started: bool = False

    def feed(self, chunk: bytes) -> Iterator[Record]:
        """The records `chunk` completes, in order."""
        if self.stats is not None and chunk:
            raise FramesError(f"{len(chunk)} bytes follow the end record")
        self._buffer += chunk
        if not self._started:
            if len(self._buffer) < len(MAGIC):
                return
            if self._buffer[: len(MAGIC)] != MAGIC:
                raise FramesError(f"the body does not start with {MAGIC!r} but {bytes(self._buffer[:4])!r}")
            del self._buffer[: len(MAGIC)]
            self._started = True
        while len(self._buffer) >= RECORD.size:
            first, count, size = RECORD.unpack_from(self._buffer)
            self._check(first, count, size)
            if len(self._buffer) < RECORD.size + size:
                return
            payload = bytes(self._buffer[RECORD.size : RECORD.size + size])
            del self._buffer[: RECORD.size + size]
            if count == 0:
                self.stats = _stats(payload)
                if self._buffer:
                    raise FramesError(f"{len(self._buffer)} bytes follow the end record")
                return
            self._next = first + count
            yield Record(first, count, memoryview(payload))

    def finish(self) -> dict[str, float]:
        """The server's stats; FramesError if the body ended before its end record."""
        if self.stats is None:
            raise FramesError(
                f"the body ended after {self._next} of {self.frames} frames, without its end record"
            )
        return self.stats

    def _check(self, first: int, count: int, size: int) -> None:
        if count == 0:
            if first != self.frames or self._next != self.frames:
                raise FramesError(
                    f"the end record says {first} frames after {self._next} of the {self.frames} declared"
                )
            if size > MAX_STATS_BYTES:
                raise FramesError(f"the end record's {size} bytes of stats exceed {MAX_STATS_BYTES}")
            return
        if first != self._next or first + count > self.frames:
            raise FramesError(
                f"a record holds frames {first}..{first + count - 1} where frame {self._next} of "
                f"{self.frames} was next"
            )
        if size > self.max_payload * count:
            raise FramesError(
                f"a record of {count} frames declares {size} bytes, more than {self.max_payload * count}"
            )


def _stats(payload: bytes) -> dict[str, float]:
    try:
        stats = json.loads(payload)
    except (ValueError, RecursionError):
        raise FramesError("the end record's stats are not JSON") from None
    if not isinstance(stats, dict):
        raise FramesError("the end record's stats are not a JSON object")
    return {k: float(v) for k, v in stats.items() if isinstance(v, int | float) and not isinstance(v, bool)}
