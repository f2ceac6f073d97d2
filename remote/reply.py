"""A 2xx answer and its checks: does it hold what the request asked for?

Every check raises RemoteVAEError with the endpoint and status, whatever the body and headers hold
(nothing else escapes, so a caller's fallback always runs); an image is checked against its declared
size before it is decoded. Errors are phrased in the protocol's
terms ("answered 200 with a tensor of shape [1, 3, 8, 8], expected [1, 3, 64, 64]"), or, when the
caller says what its request means (`meaning`, `hint`), in the caller's terms ("answered 200 but it
holds [1, 8, 8, 3] uint8 where a latent of shape [1, 4, 4, 4] decodes to ...").
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import torch
from PIL import Image

from . import protocol
from .bounds import ReplyLimits
from .errors import RemoteVAEError, clip

PROTOCOL_HINT = "the server does not speak the remote-VAE protocol for this request; check the endpoint URL"
FLOAT: Literal["float"] = "float"  # as `dtype`: any floating-point dtype

ExpectedShape = Sequence[int | None]  # None (or -1) entries match any size

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11


class TensorChecks(TypedDict, total=False):
    """What a tensor reply must be besides its shape (see `Reply.declared`)."""

    dtype: torch.dtype | Literal["float"] | None
    meaning: str | None
    hint: str


# What parsing a hostile `shape`/`dtype`/body can raise, ProtocolError (a ValueError) being the usual one:
# RecursionError from a deeply nested JSON header, RuntimeError from torch.
MALFORMED_TENSOR = (ValueError, TypeError, OverflowError, RecursionError, RuntimeError)


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
    receive_seconds: float | None = None  # first to last body byte, less this client's own work between reads
    pixel_bytes: int | None = None  # a uint8 pixel answer: what its pixels take raw (set by the reader)
    codec: str | None = None  # ... and the codec that compressed them (None: raw)


@dataclass
class Reply:
    """A 2xx answer: its body, its headers (case-insensitive), how the exchange went, and the most
    the request it answers can decode to (`limits`, checked against an image's declared size).

    When the caller took the body as it arrived (a `receiver`, see remote/receiving.py), `body` is
    empty, `receiver` holds what it made of it and `length` is the body's length for the checks."""

    body: bytes
    headers: Mapping[str, str]
    transfer: Transfer
    limits: ReplyLimits = ReplyLimits()
    receiver: Any = None
    length: int | None = None

    @property
    def body_length(self) -> int:
        return len(self.body) if self.length is None else self.length

    def unexpected(self, problem: str, hint: str = PROTOCOL_HINT) -> RemoteVAEError:
        """The error for a reply that does not hold what was asked: `problem` follows "answered 200 "."""
        status = self.transfer.status
        endpoint = self.transfer.endpoint
        return RemoteVAEError(endpoint, f"answered {status} {problem}", status=status, hint=hint)

    def tensor(
        self, expected_shape: ExpectedShape | None = None, **checks: Unpack[TensorChecks]
    ) -> torch.Tensor:
        """The body as a tensor; `shape`/`dtype` headers and the body length must agree, and the tensor
        must have `expected_shape` and the `checks` of `declared`."""
        declared = self.declared_tensor(expected_shape, **checks)
        try:
            return protocol.tensor_from_bytes(self.body, list(declared.shape), declared.dtype)
        except MALFORMED_TENSOR as exc:
            raise self.unexpected(f"with a bad tensor: {clip(str(exc))}") from None

    def declared_tensor(
        self, expected_shape: ExpectedShape | None = None, **checks: Unpack[TensorChecks]
    ) -> torch.Tensor:
        """What `tensor` checks, without reading the body: the meta tensor its headers declare (`declared`
        says what is checked). The body then holds exactly its bytes, little-endian and C-ordered, for a
        caller that reads them in place."""
        shape, dtype = self.declared(expected_shape, **checks)
        return torch.empty(shape, dtype=dtype, device="meta")

    def declared(
        self,
        expected_shape: ExpectedShape | None = None,
        *,
        dtype: torch.dtype | Literal["float"] | None = None,
        meaning: str | None = None,
        hint: str = PROTOCOL_HINT,
    ) -> tuple[list[int], torch.dtype]:
        """`declared_tensor`'s checks, giving the shape and dtype: no torch operation runs, so receivers
        may call it on a transfer thread (one still running while Python exits must not be in torch)."""
        try:
            shape, declared = protocol.declared_response(self.body_length, self.headers)
        except MALFORMED_TENSOR as exc:
            raise self.unexpected(f"with a bad tensor: {clip(str(exc))}") from None
        name = protocol.dtype_name(declared)
        if not _fits(shape, expected_shape) or dtype not in (None, FLOAT, declared):
            want = "any shape" if expected_shape is None else str(list(expected_shape))
            if isinstance(dtype, torch.dtype):
                want += f" {protocol.dtype_name(dtype)}"
            protocol_terms = f"a tensor of shape {shape}, expected {want}"
            raise self._mismatch(f"it holds {shape} {name}", protocol_terms, meaning, hint)
        if dtype == FLOAT and not declared.is_floating_point:
            raise self.unexpected(f"but it holds {name} values where floats were asked for", hint)
        return shape, declared

    def image(
        self,
        size: tuple[int, int] | None = None,
        *,
        kind: str = "an image",
        meaning: str | None = None,
        hint: str = PROTOCOL_HINT,
    ) -> Image.Image:
        """The body as an RGB PIL image of `size` (width, height) when given; `.format` is the lowercase
        sniffed type ("jpeg", "png", ...) as diffusers sets it. `kind` names what was asked for.

        The declared size is checked (against `size`, and against `limits.max_pixels`) from the header,
        before any pixel is decoded."""
        try:
            declared = Image.open(io.BytesIO(self.body))
        except (
            Exception
        ) as exc:  # Pillow raises many kinds on bytes it cannot read (DecompressionBombError...)
            raise self._not_an_image(kind, exc) from None
        got = "x".join(map(str, declared.size))
        if size is not None and declared.size != tuple(size):
            want = "x".join(map(str, size))
            raise self._mismatch(f"it is a {got} image", f"a {got} image, expected {want}", meaning, hint)
        if declared.width * declared.height > self.limits.max_pixels:
            raise self.unexpected(
                f"with an image declaring {got} pixels, more than the {self.limits.max_pixels} pixels "
                "the request can decode to; it was not decoded",
                hint,
            )
        try:
            image = declared.convert("RGB")
        except Exception as exc:  # truncated or corrupt data, as above
            raise self._not_an_image(kind, exc) from None
        image.format = image_type(self.body)
        return image

    def _not_an_image(self, kind: str, exc: Exception) -> RemoteVAEError:
        head = self.body[:16]
        return self.unexpected(
            f"with a body that is not {kind} ({len(self.body)} bytes): {clip(str(exc))}; it starts {head!r}"
        )

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
        if tensor.ndim != 4 or tensor.shape[1] != 3 or not tensor.is_floating_point():
            raise self.unexpected(
                f"with a {protocol.dtype_name(tensor.dtype)} tensor of shape {list(tensor.shape)}; "
                "output_type='pil' with a processor should give float [F,3,H,W] in 0..1"
            )
        return tensor

    def decoder_output(
        self, expected_shape: ExpectedShape | None = None, *, video: bool = False
    ) -> torch.Tensor:
        """Float [B,3,H,W] (`video`: [B,3,F,H,W]) decoder output, what a processor's postprocess takes."""
        tensor = self.tensor(expected_shape)
        ndim = 5 if video else 4
        if tensor.ndim != ndim or tensor.shape[1] != 3 or not tensor.is_floating_point():
            want = "[B,3,F,H,W]" if video else "[B,3,H,W]"
            raise self.unexpected(
                f"with a {protocol.dtype_name(tensor.dtype)} tensor of shape {list(tensor.shape)}; "
                f"output_type='pt' should give float {want} decoder output"
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
