"""Reading a request's body: within the size limit, fast enough, and unpacked where it came compressed.

A job request's body is read before it takes an admission slot (`limits.Admission`), so a client that
uploads slowly holds a connection but never a slot that others' work needs; and the body must keep
coming: no pause longer than `idle_timeout`, and after `grace` seconds an average of `min_rate` bytes/s
since the request began. Either failure is a 408 that says how fast the server needs it.

A tensor body may come packed (our content coding, `remote/planes.py`); it is unpacked into exactly the
bytes its declared shape and dtype take, which the size limit already allowed before it was read.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch
from starlette.requests import ClientDisconnect, Request

from ..remote import planes, protocol
from ..remote.protocol import ProtocolError
from .errors import ClientClosed, ServerError
from .limits import Limits


class UploadTooSlow(ServerError):
    """A request body that stalled or arrived under the minimum rate (not a TimeoutError: that is the
    whole request's deadline, a 504)."""

    status = 408


class UnsupportedEncoding(ServerError):
    """A Content-Encoding this server does not decode."""

    status = 415


@dataclass(frozen=True)
class UploadLimits:
    """How fast a request body must arrive; the defaults, and why each."""

    # Longest pause between two pieces of a body: far above a TCP retransmit on a bad link (a few seconds).
    idle_timeout: float = 15.0
    # Bytes/s a body must average since its request began, once `grace` has passed: 16 KiB/s (128 kbit/s)
    # is below any link a user would send images over, and at it a 1 MP uint8 image (3 MiB) takes 3 minutes.
    min_rate: int = 16 * 1024
    grace: float = 10.0  # the first seconds (connection set-up, TCP slow start) count for nothing

    def patience(self, received: int, elapsed: float) -> float:
        """Seconds to wait for the next piece: until the idle timeout, or until `received` bytes fall
        under the minimum rate."""
        under_rate_at = max(self.grace, received / self.min_rate)
        return max(0.0, min(self.idle_timeout, under_rate_at - elapsed))

    def complaint(self, received: int, elapsed: float) -> str:
        return (
            f"the request body arrived too slowly ({received} bytes in {elapsed:.1f} s): the server needs a byte "
            f"at least every {self.idle_timeout:g} s and {self.min_rate} bytes/s after the first {self.grace:g} s "
            "(--upload-timeout, --min-upload-rate)"
        )


async def read_body(request: Request, limits: Limits, upload: UploadLimits) -> bytes:
    """The request body, refused as soon as it is known to pass the size limit (before reading it all) or
    to arrive too slowly; a client that leaves meanwhile is a `ClientClosed` (499), not a server fault."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit():
        limits.check_body(int(declared))
    clock = asyncio.get_running_loop().time
    started = clock()
    stream = request.stream()
    chunks, size = [], 0
    while True:
        try:
            chunk = await asyncio.wait_for(anext(stream), upload.patience(size, clock() - started))
        except StopAsyncIteration:
            return b"".join(chunks)
        except asyncio.TimeoutError:
            raise UploadTooSlow(upload.complaint(size, clock() - started)) from None
        except ClientDisconnect:
            raise ClientClosed(
                f"the client closed the connection after {size} bytes of the request body"
            ) from None
        size += len(chunk)
        limits.check_body(size)
        chunks.append(chunk)


# --------------------------------------------------------------------------- packed bodies


def offered_encodings() -> tuple[str, ...]:
    """The content codings this server unpacks (GET /v1/models lists them as "upload_encodings")."""
    return (planes.ENCODING,) if planes.available() else ()


def content_encoding(request: Request) -> str | None:
    """The request's Content-Encoding, normalised (None: the body is sent as it is)."""
    encoding = protocol.content_encoding(request.headers)
    return None if encoding == "identity" else encoding


def body_encoding(request: Request, offered: tuple[str, ...]) -> str | None:
    """The request's Content-Encoding (None: the body is sent as it is), refused before the body is read
    unless this server unpacks it and the body is a tensor's."""
    encoding = content_encoding(request)
    if encoding is None:
        return None
    if encoding not in offered:
        raise UnsupportedEncoding(
            f"Content-Encoding {encoding!r} is not one this server unpacks; send the body as it is"
            + (f" or packed as {', '.join(offered)} (GET /v1/models: upload_encodings)" if offered else "")
        )
    if "dtype" not in request.query_params:
        raise ProtocolError(
            f"Content-Encoding {encoding} packs tensor bodies (shape and dtype in the query); "
            "send an image file as it is"
        )
    return encoding


def check_packed_length(length: int, declared: torch.Tensor) -> None:
    """A packed body is sent only where it is smaller than the tensor it packs."""
    nbytes = protocol.expected_nbytes(list(declared.shape), declared.dtype)
    if length >= nbytes:
        raise ProtocolError(
            f"a {planes.ENCODING} body of {length} bytes is no smaller than the {nbytes} bytes of shape "
            f"{list(declared.shape)} with dtype {protocol.dtype_name(declared.dtype)}; send it as it is"
        )


def unpacked(request: Request, body: bytes) -> bytearray:
    """The tensor bytes a packed body holds (ProtocolError unless exactly those the query declares)."""
    declared = protocol.declared_tensor(protocol.parse_query(request.query_params.multi_items()))
    check_packed_length(len(body), declared)
    nbytes = protocol.expected_nbytes(list(declared.shape), declared.dtype)
    try:
        return planes.unpack(body, nbytes, declared.dtype.itemsize)
    except planes.PlanesError as exc:
        raise ProtocolError(str(exc)) from None
