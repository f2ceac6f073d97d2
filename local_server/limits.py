"""Request limits: biggest images, videos and bodies a server accepts, and its queue bounds.

Hugging Face's endpoints cap images at 2048^2; our defaults let a 24 GB GPU serve 4096^2 images
(tiled) and long videos. A request over a limit gets a 413 naming the limit.
"""

from __future__ import annotations

from dataclasses import dataclass


class LimitExceeded(ValueError):
    """A request over a configured limit; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 413) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 4096 * 4096  # per image or per video frame (output side for decode)
    max_frames: int = 257  # per video
    max_batch_pixels: int = 4 * 4096 * 4096  # all images of one request together
    max_request_bytes: int = 512 << 20
    max_concurrency: int = 2  # requests running on devices at once (per server)
    max_queue: int = 16  # requests waiting beyond that; more are refused with 503 + Retry-After
    request_timeout: float = 600.0  # seconds a request may take end to end

    def check_body(self, length: int) -> None:
        self.check_body_length(length, self.max_request_bytes)

    @staticmethod
    def check_body_length(length: int, limit: int) -> None:
        if length > limit:
            raise LimitExceeded(
                f"request body of {length} bytes exceeds the server's limit of {limit} bytes "
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
            raise LimitExceeded(f"{frames} frames exceed the server's limit of {self.max_frames} frames (--max-frames)")
        if batch * height * width > self.max_batch_pixels:
            raise LimitExceeded(
                f"a batch of {batch} x {width}x{height} exceeds the server's limit of {self.max_batch_pixels} "
                "pixels per request; send fewer images per request"
            )
