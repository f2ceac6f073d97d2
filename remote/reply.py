"""A 2xx answer and its checks: does it hold what the request asked for?

Every check raises RemoteVAEError with the endpoint and status. Errors are phrased in the protocol's
terms ("answered 200 with a tensor of shape [1, 3, 8, 8], expected [1, 3, 64, 64]"), or, when the
caller says what its request means (`meaning`, `hint`), in the caller's terms ("answered 200 but it
holds [1, 8, 8, 3] uint8 where a latent of shape [1, 4, 4, 4] decodes to ...").
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image

from . import protocol
from .errors import RemoteVAEError

PROTOCOL_HINT = "the server does not speak the remote-VAE protocol for this request; check the endpoint URL"
FLOAT: Literal["float"] = "float"  # as `dtype`: any floating-point dtype

ExpectedShape = Sequence[int | None]  # None (or -1) entries match any size


@dataclass
class Transfer:
    """Statistics of one completed exchange (seconds and attempts include retries and back-off)."""

    endpoint: str
    status: int
    bytes_sent: int
    bytes_received: int
    seconds: float
    attempts: int
    server: str | None = None
    request_id: str | None = None


@dataclass
class Reply:
    """A 2xx answer: its body, its headers (case-insensitive) and how the exchange went."""

    body: bytes
    headers: Mapping[str, str]
    transfer: Transfer

    def unexpected(self, problem: str, hint: str = PROTOCOL_HINT) -> RemoteVAEError:
        """The error for a reply that does not hold what was asked: `problem` follows "answered 200 "."""
        status = self.transfer.status
        endpoint = self.transfer.endpoint
        return RemoteVAEError(endpoint, f"answered {status} {problem}", status=status, hint=hint)

    def tensor(
        self,
        expected_shape: ExpectedShape | None = None,
        *,
        dtype: torch.dtype | Literal["float"] | None = None,
        meaning: str | None = None,
        hint: str = PROTOCOL_HINT,
    ) -> torch.Tensor:
        """The body as a tensor; `shape`/`dtype` headers and the body length must agree, and the tensor
        must have `expected_shape` and `dtype` (a torch dtype, or FLOAT for any floating-point one)."""
        try:
            tensor = protocol.parse_tensor_response(self.body, self.headers)
        except protocol.ProtocolError as exc:
            raise self.unexpected(f"with a bad tensor: {exc}") from None
        shape, name = list(tensor.shape), protocol.dtype_name(tensor.dtype)
        if not _fits(shape, expected_shape) or dtype not in (None, FLOAT, tensor.dtype):
            want = "any shape" if expected_shape is None else str(list(expected_shape))
            if isinstance(dtype, torch.dtype):
                want += f" {protocol.dtype_name(dtype)}"
            protocol_terms = f"a tensor of shape {shape}, expected {want}"
            raise self._mismatch(f"it holds {shape} {name}", protocol_terms, meaning, hint)
        if dtype == FLOAT and not tensor.is_floating_point():
            raise self.unexpected(f"but it holds {name} values where floats were asked for", hint)
        return tensor

    def image(
        self,
        size: tuple[int, int] | None = None,
        *,
        kind: str = "an image",
        meaning: str | None = None,
        hint: str = PROTOCOL_HINT,
    ) -> Image.Image:
        """The body as an RGB PIL image of `size` (width, height) when given; `.format` is the lowercase
        sniffed type ("jpeg", "png", ...) as diffusers sets it. `kind` names what was asked for."""
        try:
            image = Image.open(io.BytesIO(self.body)).convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            head = self.body[:16]
            raise self.unexpected(
                f"with a body that is not {kind} ({len(self.body)} bytes): {exc}; it starts {head!r}"
            ) from None
        image.format = image_type(self.body)
        if size is not None and image.size != tuple(size):
            got, want = "x".join(map(str, image.size)), "x".join(map(str, size))
            raise self._mismatch(f"it is a {got} image", f"a {got} image, expected {want}", meaning, hint)
        return image

    def mp4(self) -> bytes:
        """The body, which must be an MP4 file."""
        if len(self.body) < 8 or self.body[4:8] != b"ftyp":
            raise self.unexpected(
                f"with a body that is not an MP4 file ({len(self.body)} bytes, "
                "no ISO-BMFF `ftyp` box at the start)"
            )
        return self.body

    def uint8_frames(self, expected_shape: ExpectedShape | None = None) -> torch.Tensor:
        """uint8 [N,H,W,3] images (what partial_postprocess=True gives)."""
        tensor = self.tensor(expected_shape)
        if tensor.dtype != torch.uint8 or tensor.ndim != 4 or tensor.shape[-1] not in (3, 4):
            raise self.unexpected(
                f"with a {protocol.dtype_name(tensor.dtype)} tensor of shape {list(tensor.shape)}; "
                "partial_postprocess=True should give uint8 [N,H,W,3]"
            )
        return tensor

    def float_frames(self, expected_shape: ExpectedShape | None = None) -> torch.Tensor:
        """Float [F,3,H,W] frames in 0..1 (what output_type="pil" with a processor gives)."""
        tensor = self.tensor(expected_shape)
        if tensor.ndim != 4 or not tensor.is_floating_point():
            raise self.unexpected(
                f"with a {protocol.dtype_name(tensor.dtype)} tensor of shape {list(tensor.shape)}; "
                "output_type='pil' with a processor should give float [F,3,H,W] in 0..1"
            )
        return tensor

    def _mismatch(self, got: str, protocol_terms: str, meaning: str | None, hint: str) -> RemoteVAEError:
        if meaning:
            return self.unexpected(f"but {got} where {meaning}", hint)
        return self.unexpected(f"with {protocol_terms}", hint)


def _fits(shape: list[int], expected: ExpectedShape | None) -> bool:
    if expected is None:
        return True
    want = list(expected)
    return len(want) == len(shape) and all(w in (None, -1) or w == g for w, g in zip(want, shape))


def image_type(data: bytes) -> str:
    """The lowercase format name diffusers writes into `image.format`."""
    if data.startswith(protocol.JPEG_MAGIC):
        return "jpeg"
    if data.startswith(protocol.PNG_MAGIC):
        return "png"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if data.startswith(b"BM"):
        return "bmp"
    return "unknown"
