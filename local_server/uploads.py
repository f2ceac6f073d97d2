"""Reading a request's body: within the size limit, and fast enough.

A job request's body is read before it takes an admission slot (`limits.Admission`), so a client that
uploads slowly holds a connection but never a slot that others' work needs; and the body must keep
coming: no pause longer than `idle_timeout`, and after `grace` seconds an average of `min_rate` bytes/s
since the request began. Either failure is a 408 that says how fast the server needs it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from starlette.requests import ClientDisconnect, Request

from .errors import ClientClosed, ServerError
from .limits import Limits


class UploadTooSlow(ServerError):
    """A request body that stalled or arrived under the minimum rate (not a TimeoutError: that is the
    whole request's deadline, a 504)."""

    status = 408


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
