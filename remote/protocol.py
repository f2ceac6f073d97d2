"""The Hugging Face remote-VAE wire protocol: the one codec both our client and our server use.

Requests carry parameters in the query string and the tensor (or image file) as the raw body;
tensor responses carry raw bytes plus `shape` / `dtype` headers. docs/protocol.md describes the
protocol this module implements: Hugging Face's fields, our extensions and the status codes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Literal, get_args

import torch

from .frames import CODECS, Codec

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "uint8": torch.uint8,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

TENSOR_TYPE = "tensor/binary"
JPEG_TYPE = "image/jpeg"
PNG_TYPE = "image/png"
MP4_ACCEPT = "text/plain"
JSON_TYPE = "application/json"

DECODE_TYPES = (TENSOR_TYPE, "application/octet-stream")

# The fixed sets of values the wire knows, each named once.
Operation = Literal["decode", "encode"]
OutputType = Literal["pil", "pt", "mp4"]
ImageFormat = Literal["jpg", "png"]
FloatDtype = Literal["float16", "bfloat16", "float32"]
TileMode = Literal["auto", "on", "off"]
Reference = Literal["diffusers", "comfyui"]  # whose implementation to match where they differ

OUTPUT_TYPES: tuple[OutputType, ...] = get_args(OutputType)
IMAGE_FORMATS: tuple[ImageFormat, ...] = get_args(ImageFormat)
FLOAT_DTYPES: tuple[FloatDtype, ...] = get_args(FloatDtype)
TILE_MODES: tuple[TileMode, ...] = get_args(TileMode)
REFERENCES: tuple[Reference, ...] = get_args(Reference)

MIN_TILE_SIZE, MAX_TILE_SIZE = (
    16,
    1024,
)  # latent pixels per tile side (smaller tiles cost more overlap than they save)
MAX_FPS = 240
MAX_JPEG_QUALITY = 100

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8"
MAX_DIMS = 6
MAX_DECLARED_BYTES = (
    1 << 60
)  # a declared tensor larger than this cannot even be described (torch's sizes are int64)


class ProtocolError(ValueError):
    """A request or response that does not follow the protocol; the message names the bad value."""


# --------------------------------------------------------------------------- tensors on the wire


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ProtocolError(f"dtype {dtype} cannot be sent; supported: {', '.join(DTYPES)}") from None


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ProtocolError(f"unsupported dtype {name!r}; supported: {', '.join(DTYPES)}") from None


def tensor_to_bytes(tensor: torch.Tensor) -> bytes:
    """Raw little-endian C-order bytes of any tensor (CUDA, non-contiguous and bfloat16 included)."""
    return bytes(tensor_buffer(tensor))


def tensor_buffer(tensor: torch.Tensor) -> memoryview:
    """`tensor_to_bytes` as a flat byte view of the tensor's memory: no copy for a contiguous CPU tensor
    (the view keeps the tensor alive)."""
    dtype_name(tensor.dtype)  # reject unsupported dtypes with our message
    cpu = tensor.detach().to("cpu").contiguous()
    raw = cpu.reshape(-1).view(torch.uint8)  # numpy has no bfloat16: go through bytes
    if sys.byteorder == "big" and cpu.element_size() > 1:  # pragma: no cover - no big-endian CI
        raw = cpu.reshape(-1, 1).view(torch.uint8).flip(-1).reshape(-1)
    return memoryview(raw.numpy())


def content_encoding(headers: Mapping[str, str]) -> str:
    """A body's Content-Encoding (request or answer), normalised: "identity" when there is none."""
    return (headers.get("content-encoding") or "identity").strip().lower() or "identity"


def expected_nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count * dtype.itemsize


def check_body_length(length: int, shape: list[int], dtype: torch.dtype) -> None:
    """Refuse a body (or a Content-Length) that does not match shape x dtype."""
    want = expected_nbytes(shape, dtype)
    if length != want:
        raise ProtocolError(
            f"body has {length} bytes but shape {list(shape)} with dtype {dtype_name(dtype)} needs {want} bytes"
        )


def tensor_from_bytes(
    data: bytes | bytearray | memoryview, shape: list[int], dtype: str | torch.dtype
) -> torch.Tensor:
    """Rebuild a tensor from raw bytes, refusing a body whose length does not match shape x dtype."""
    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    validate_shape(shape)
    check_body_length(len(data), shape, torch_dtype)
    if len(data) == 0:
        return torch.empty(shape, dtype=torch_dtype)
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if sys.byteorder == "big" and torch_dtype.itemsize > 1:  # pragma: no cover
        flat = flat.reshape(-1, torch_dtype.itemsize).flip(-1).reshape(-1)
    return flat.view(torch_dtype).reshape(shape)


def validate_shape(shape: list[int]) -> None:
    if not shape:
        raise ProtocolError("shape is empty; send one `shape` parameter per dimension")
    if len(shape) > MAX_DIMS:
        raise ProtocolError(
            f"shape {list(shape)} has {len(shape)} dimensions; at most {MAX_DIMS} are allowed"
        )
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
            raise ProtocolError(
                f"shape {list(shape)} has an invalid dimension {dim!r}; dimensions must be positive integers"
            )


def format_shape(shape: Iterable[int]) -> str:
    """The `shape` response header: a JSON array without spaces, as the HF toolkit emits it."""
    return json.dumps([int(d) for d in shape], separators=(",", ":"))


def parse_shape_header(value: str | None) -> list[int]:
    if value is None:
        raise ProtocolError("response has no `shape` header")
    try:
        shape = json.loads(value)
    except json.JSONDecodeError:
        raise ProtocolError(f"`shape` header {value!r} is not a JSON array") from None
    if not isinstance(shape, list):
        raise ProtocolError(f"`shape` header {value!r} is not a JSON array")
    validate_shape(shape)
    return shape


def tensor_response(tensor: torch.Tensor) -> tuple[memoryview, dict[str, str]]:
    """Body (the tensor's own bytes, not a copy: `tensor_buffer`) and headers of a `tensor/binary`
    response."""
    return tensor_buffer(tensor), tensor_headers(tensor.shape, tensor.dtype)


def tensor_headers(shape: Iterable[int], dtype: torch.dtype) -> dict[str, str]:
    return {"content-type": TENSOR_TYPE, "shape": format_shape(shape), "dtype": dtype_name(dtype)}


def parse_tensor_response(body: bytes, headers: Mapping[str, str]) -> torch.Tensor:
    """Parse a tensor response, checking that both headers are there and the body length matches."""
    declared = declared_response_tensor(len(body), headers)
    return tensor_from_bytes(body, list(declared.shape), declared.dtype)


def declared_response_tensor(body_length: int, headers: Mapping[str, str]) -> torch.Tensor:
    """The tensor a response's headers declare, as a meta tensor, checked against the body length."""
    shape, dtype = declared_response(body_length, headers)
    return torch.empty(shape, dtype=dtype, device="meta")


def declared_response(body_length: int, headers: Mapping[str, str]) -> tuple[list[int], torch.dtype]:
    """The shape and dtype a response's headers declare, checked against the body length. Runs no torch
    operation: the client calls it on its transfer threads, which may still run while Python exits."""
    lower = {k.lower(): v for k, v in headers.items()}
    shape = parse_shape_header(lower.get("shape"))
    if "dtype" not in lower:
        raise ProtocolError("response has no `dtype` header")
    torch_dtype = parse_dtype(lower["dtype"])
    validate_shape(shape)
    check_body_length(body_length, shape, torch_dtype)
    return shape, torch_dtype


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


# --------------------------------------------------------------------------- our extensions


@dataclass(frozen=True)
class Extensions:
    """Our optional query parameters (docs/protocol.md, "Extensions"); the HF endpoints ignore them.

    `params()` puts the ones that differ from their defaults on the wire, in field order; `parse`
    reads and validates them, so everything past the codec receives checked values.
    """

    output_dtype: FloatDtype | None = (
        None  # dtype of raw tensor answers (default: float16 decode, float32 encode)
    )
    fps: int | None = None  # of an mp4 answer (default: the model's)
    jpeg_quality: int | None = None  # of a JPEG answer, 1..100
    tile: TileMode = "auto"  # tiled decode/encode: auto (as memory needs), on, off
    tile_size: int | None = None  # latent pixels per tile side
    reference: Reference = "diffusers"
    codec: Codec | None = None  # compressed frames for a uint8 decode answer (docs/protocol.md, "Extensions")

    def params(self) -> list[tuple[str, str]]:
        defaults = Extensions()
        return [
            (f.name, _wire(getattr(self, f.name)))
            for f in fields(self)
            if getattr(self, f.name) != getattr(defaults, f.name)
        ]

    def torch_output_dtype(self, default: torch.dtype) -> torch.dtype:
        return default if self.output_dtype is None else DTYPES[self.output_dtype]

    @classmethod
    def parse(cls, query: dict[str, list[str]]) -> Extensions:
        tile_size = parse_int(_one(query, "tile_size"), "tile_size", minimum=None)
        if tile_size is not None and not MIN_TILE_SIZE <= tile_size <= MAX_TILE_SIZE:
            raise ProtocolError(
                f"tile_size={tile_size} must be between {MIN_TILE_SIZE} and {MAX_TILE_SIZE} latent pixels"
            )
        fps = parse_int(_one(query, "fps"), "fps")
        if fps is not None and fps > MAX_FPS:
            raise ProtocolError(f"fps={fps} is above the maximum of {MAX_FPS}")
        quality = parse_int(_one(query, "jpeg_quality"), "jpeg_quality")
        if quality is not None and quality > MAX_JPEG_QUALITY:
            raise ProtocolError(f"jpeg_quality={quality} must be between 1 and {MAX_JPEG_QUALITY}")
        return cls(
            output_dtype=_choice(_one(query, "output_dtype"), "output_dtype", FLOAT_DTYPES, None),
            fps=fps,
            jpeg_quality=quality,
            tile=_choice(_one(query, "tile"), "tile", TILE_MODES, "auto", fold=True),
            tile_size=tile_size,
            reference=_choice(_one(query, "reference"), "reference", REFERENCES, "diffusers", fold=True),
            codec=_choice(_one(query, "codec"), "codec", CODECS, None),
        )


def _choice(value: str | None, name: str, allowed: tuple, default, *, fold: bool = False):
    """`value` if it is one of `allowed` (case- and space-insensitive when `fold`), else a ProtocolError."""
    if value is None:
        return default
    chosen = value.strip().lower() if fold else value
    if chosen not in allowed:
        raise ProtocolError(f"{name}={value!r} is not one of {', '.join(allowed)}")
    return chosen


# --------------------------------------------------------------------------- requests: client side


@dataclass
class WireRequest:
    """What goes on the wire: query parameters in order, headers and body."""

    params: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes


def _wire(value: object) -> str:
    # requests' encoding of a params value: str() for bool (True/False), int and float alike.
    return str(value)


def decode_accept(output_type: str, image_format: str, processor_flag: bool) -> str:
    """The Accept header diffusers sends for a decode (docs/protocol.md, "Decode")."""
    if output_type == "mp4":
        return MP4_ACCEPT
    if output_type == "pil" and not processor_flag:
        return PNG_TYPE if image_format == "png" else JPEG_TYPE
    return TENSOR_TYPE


def build_decode_request(  # noqa: PLR0913 - one keyword per field of diffusers' decode request
    tensor: torch.Tensor,
    *,
    output_type: str = "pil",
    image_format: str = "jpg",
    partial_postprocess: bool = False,
    do_scaling: bool | None = True,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    height: int | None = None,
    width: int | None = None,
    processor_flag: bool = False,
    extensions: Extensions | None = None,
) -> WireRequest:
    """A decode request byte-identical to diffusers' `prepare_decode`, plus optional extensions."""
    if output_type not in OUTPUT_TYPES:
        raise ProtocolError(f"output_type {output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
    if image_format not in IMAGE_FORMATS:
        raise ProtocolError(f"image_format {image_format!r} is not one of {', '.join(IMAGE_FORMATS)}")
    params: list[tuple[str, str]] = [
        ("image_format", image_format),
        ("output_type", output_type),
        ("partial_postprocess", _wire(bool(partial_postprocess))),
    ]
    params += [("shape", _wire(int(d))) for d in tensor.shape]
    params.append(("dtype", dtype_name(tensor.dtype)))
    if do_scaling and scaling_factor is not None:
        params.append(("scaling_factor", _wire(scaling_factor)))
    if do_scaling and shift_factor is not None:
        params.append(("shift_factor", _wire(shift_factor)))
    if do_scaling and scaling_factor is None:
        params.append(("do_scaling", _wire(do_scaling)))
    if height is not None and width is not None:
        params += [("height", _wire(height)), ("width", _wire(width))]
    params += (extensions or Extensions()).params()
    headers = {
        "Content-Type": TENSOR_TYPE,
        "Accept": decode_accept(output_type, image_format, processor_flag),
    }
    return WireRequest(params, headers, tensor_to_bytes(tensor))


def build_encode_request(
    image: torch.Tensor | bytes,
    *,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    extensions: Extensions | None = None,
) -> WireRequest:
    """An encode request as diffusers' `prepare_encode` builds it: no Content-Type header.

    `image` is either an encoded image file (PNG/JPEG bytes) or a tensor sent raw with shape/dtype.
    """
    params: list[tuple[str, str]] = []
    if scaling_factor is not None:
        params.append(("scaling_factor", _wire(scaling_factor)))
    if shift_factor is not None:
        params.append(("shift_factor", _wire(shift_factor)))
    if isinstance(image, torch.Tensor):
        params += [("shape", _wire(int(d))) for d in image.shape]
        params.append(("dtype", dtype_name(image.dtype)))
        body = tensor_to_bytes(image)
    else:
        body = bytes(image)
    params += (extensions or Extensions()).params()
    return WireRequest(params, {}, body)


# --------------------------------------------------------------------------- requests: server side


@dataclass
class Scaling:
    """How the server maps incoming latents to raw VAE space (docs/protocol.md, "Scaling").

    Factor parameters win; `do_scaling=True` without factors means "use the model's own config";
    nothing at all means the latents are already raw.
    """

    scaling_factor: float | None = None
    shift_factor: float | None = None
    use_model_defaults: bool = False

    @property
    def is_identity(self) -> bool:
        return self.scaling_factor is None and self.shift_factor is None and not self.use_model_defaults


@dataclass
class DecodeRequest:
    tensor: torch.Tensor
    output_type: str
    image_format: str
    partial_postprocess: bool
    accept: str
    scaling: Scaling
    height: int | None = None
    width: int | None = None
    extensions: Extensions = field(default_factory=Extensions)


@dataclass
class EncodeRequest:
    """Either `tensor` (raw body with shape/dtype) or `image_bytes` (a PNG/JPEG file)."""

    scaling: Scaling
    tensor: torch.Tensor | None = None
    image_bytes: bytes | None = None
    extensions: Extensions = field(default_factory=Extensions)


def parse_query(items: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """Group query items by key, keeping repeats (`shape=1&shape=4` -> ['1', '4'])."""
    grouped: dict[str, list[str]] = {}
    for key, value in items:
        grouped.setdefault(key, []).append(value)
    return grouped


def _one(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    return values[-1] if values else None


def parse_bool(value: str | None, name: str, default: bool = False) -> bool:
    if value is None:
        return default
    lowered = value.strip().lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0", "none", ""):
        return False
    raise ProtocolError(f"{name}={value!r} is not a boolean; send True or False")


def parse_float(value: str | None, name: str) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        raise ProtocolError(f"{name}={value!r} is not a number") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ProtocolError(f"{name}={value!r} must be a finite number")
    return number


def parse_int(value: str | None, name: str, minimum: int | None = 1) -> int | None:
    if value is None:
        return None
    try:
        number = int(value.strip())
    except ValueError:
        raise ProtocolError(f"{name}={value!r} is not an integer") from None
    if minimum is not None and number < minimum:
        raise ProtocolError(f"{name}={number} must be at least {minimum}")
    return number


def parse_shape_params(query: dict[str, list[str]]) -> list[int]:
    values = query.get("shape")
    if not values:
        raise ProtocolError("expected `shape` in query params (one `shape=` per dimension)")
    shape = []
    for value in values:
        try:
            shape.append(int(value.strip()))
        except ValueError:
            raise ProtocolError(f"shape value {value!r} is not an integer") from None
    validate_shape(shape)
    return shape


def declared_tensor(query: dict[str, list[str]]) -> torch.Tensor:
    """The tensor the query declares, as a meta tensor: its shape and dtype without data.

    Everything that depends only on shapes (limits, layouts, the answer's size) can be checked on it
    before the body is read.
    """
    dtype = _one(query, "dtype")
    if dtype is None:
        raise ProtocolError("expected `dtype` in query params")
    torch_dtype = parse_dtype(dtype)
    shape = parse_shape_params(query)
    size = expected_nbytes(shape, torch_dtype)
    if size > MAX_DECLARED_BYTES:  # beyond what torch can even describe
        raise ProtocolError(
            f"shape {shape} with dtype {dtype} would need {size} bytes; send a smaller tensor"
        )
    return torch.empty(shape, dtype=torch_dtype, device="meta")


def parse_tensor_body(query: dict[str, list[str]], body: bytes | None) -> torch.Tensor:
    """The declared tensor read from `body` (None: the meta tensor, before the body is read)."""
    declared = declared_tensor(query)
    if body is None:
        return declared
    tensor = tensor_from_bytes(body, list(declared.shape), declared.dtype)
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ProtocolError("tensor contains NaN or infinite values; send finite numbers")
    return tensor


def _parse_scaling(query: dict[str, list[str]], allow_model_defaults: bool) -> Scaling:
    scaling_factor = parse_float(_one(query, "scaling_factor"), "scaling_factor")
    shift_factor = parse_float(_one(query, "shift_factor"), "shift_factor")
    if scaling_factor == 0:
        raise ProtocolError("scaling_factor=0 would divide by zero")
    do_scaling = allow_model_defaults and parse_bool(_one(query, "do_scaling"), "do_scaling")
    return Scaling(scaling_factor, shift_factor, use_model_defaults=do_scaling and scaling_factor is None)


def _media_type(value: str | None) -> str:
    return (value or "").split(";")[0].strip().lower()


def parse_decode_request(
    query_items: Iterable[tuple[str, str]], headers: Mapping[str, str], body: bytes | None
) -> DecodeRequest:
    """Parse a decode request as the HF endpoints do; unknown parameters are ignored.

    `body=None` parses the query alone: `tensor` is then the declared meta tensor (`declared_tensor`).
    """
    query = parse_query(query_items)
    lower = {k.lower(): v for k, v in headers.items()}
    content_type = _media_type(lower.get("content-type"))
    if content_type not in ("", *DECODE_TYPES):
        raise ProtocolError(f"Content-Type {content_type!r} is not supported for decode; send {TENSOR_TYPE}")
    output_type = (_one(query, "output_type") or "pil").lower()
    if output_type not in OUTPUT_TYPES:
        raise ProtocolError(f"output_type={output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
    image_format = (_one(query, "image_format") or "jpg").lower()
    if image_format == "jpeg":
        image_format = "jpg"
    if image_format not in IMAGE_FORMATS:
        raise ProtocolError(f"image_format={image_format!r} is not one of {', '.join(IMAGE_FORMATS)}")
    tensor = parse_tensor_body(query, body)
    if tensor.dtype == torch.uint8:
        raise ProtocolError("latents must be float16, bfloat16 or float32, not uint8")
    height = parse_int(_one(query, "height"), "height")
    width = parse_int(_one(query, "width"), "width")
    # A 3-D latent is packed (an image model: the server then needs height and width) or audio [B,C,L]:
    # only the server knows which, from the model it hosts.
    if tensor.ndim not in (3, 4, 5):
        raise ProtocolError(
            f"latent shape {list(tensor.shape)} has {tensor.ndim} dimensions; expected 3 (packed), "
            "4 [B,C,H,W] or 5 [B,C,T,H,W] (audio models: 3 [B,C,L])"
        )
    return DecodeRequest(
        tensor=tensor,
        output_type=output_type,
        image_format=image_format,
        partial_postprocess=parse_bool(_one(query, "partial_postprocess"), "partial_postprocess"),
        accept=_media_type(lower.get("accept")) or "*/*",
        scaling=_parse_scaling(query, allow_model_defaults=True),
        height=height if tensor.ndim == 3 else None,
        width=width if tensor.ndim == 3 else None,
        extensions=Extensions.parse(query),
    )


def parse_encode_request(
    query_items: Iterable[tuple[str, str]], headers: Mapping[str, str], body: bytes | None
) -> EncodeRequest:
    """Parse an encode request: a raw tensor iff `shape` and `dtype` are given, else an image file.

    `body=None` parses the query alone: a declared tensor is a meta tensor, an image is not known yet.
    """
    query = parse_query(query_items)
    scaling = _parse_scaling(query, allow_model_defaults=True)
    extensions = Extensions.parse(query)
    if "shape" in query or "dtype" in query:
        return EncodeRequest(scaling, tensor=parse_tensor_body(query, body), extensions=extensions)
    if body is None:
        return EncodeRequest(scaling, extensions=extensions)
    if not body:
        raise ProtocolError(
            "encode request has an empty body; send a PNG/JPEG image or a raw tensor with shape/dtype"
        )
    if not (body.startswith(PNG_MAGIC) or body.startswith(JPEG_MAGIC) or body[:4] == b"RIFF"):
        raise ProtocolError(
            "encode body is neither a PNG/JPEG/WebP image nor a raw tensor (no `shape`/`dtype` parameters)"
        )
    return EncodeRequest(scaling, image_bytes=bytes(body), extensions=extensions)


def operation_for(content_type: str | None) -> Operation:
    """The operation a POST without one in its path asks for: diffusers sends decodes as
    `tensor/binary` and encodes with no Content-Type at all (or an image type)."""
    media = _media_type(content_type)
    if media in DECODE_TYPES:
        return "decode"
    if not media or media.startswith("image/"):
        return "encode"
    raise ProtocolError(
        f"Content-Type {media!r} is not supported: send {TENSOR_TYPE} latents to decode, "
        "or an image (no Content-Type, or image/png|jpeg) to encode"
    )
