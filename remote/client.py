"""The public API: diffusers' `remote_decode` / `remote_encode`, made robust, and `send`.

The positional arguments and the bytes on the wire are diffusers'; the keyword-only transport options
(`TransportOptions`: timeouts, retries, token, cancel, progress...) are declared once in `transport` and
shared by all three functions.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from . import protocol
from .errors import RemoteVAECancelled, RemoteVAEError, RemoteVAETimeout
from .receiving import Target, received_frames, receiver_for
from .reply import Reply, Transfer
from .sending import send
from .transport import TransportOptions

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

__all__ = [
    "RemoteVAECancelled",
    "RemoteVAEError",
    "RemoteVAETimeout",
    "Reply",
    "Transfer",
    "TransportOptions",
    "remote_decode",
    "remote_encode",
    "send",
]


# --------------------------------------------------------------------------- diffusers-compatible API


def _warn_base64(name: str, value: str) -> None:
    if value == "base64":
        warnings.warn(f"{name}='base64' is deprecated. Using `binary`.", FutureWarning, stacklevel=3)
    elif value != "binary":
        raise ValueError(f"{name}={value!r} is not supported; use 'binary'")


def _check_decode_inputs(
    tensor: Any,
    processor: Any,
    output_type: str,
    return_type: str,
    partial_postprocess: bool,
    height: int | None,
    width: int | None,
) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if return_type not in protocol.OUTPUT_TYPES:
        raise ValueError(f"return_type={return_type!r} is not one of {', '.join(protocol.OUTPUT_TYPES)}")
    # An audio latent [B,C,L] takes no size; its one answer is the raw tensor (output_type="pt").
    audio = output_type == "pt" and not partial_postprocess and height is None and width is None
    if tensor.ndim == 3 and (height is None or width is None) and not audio:
        raise ValueError(
            f"`height` and `width` required for packed latents: a 3-D latent of shape {list(tensor.shape)} "
            "needs the image size in pixels (audio latents [B,C,L]: output_type='pt' and neither)"
        )
    if (
        output_type == "pt"
        and return_type == "pil"
        and not partial_postprocess
        and not callable(getattr(processor, "postprocess", None))
    ):
        raise ValueError(
            "`processor` is required: output_type='pt' with return_type='pil' and partial_postprocess=False "
            "needs a VaeImageProcessor or VideoProcessor to turn the raw tensor into images "
            "(or pass partial_postprocess=True)"
        )
    if (
        return_type == "mp4"
        and output_type != "mp4"
        and not (output_type == "pt" and not partial_postprocess)
    ):
        raise ValueError(f"return_type='mp4' needs output_type='mp4' (got output_type={output_type!r})")


def remote_decode(  # noqa: PLR0913 - diffusers' positional signature, kept for drop-in use
    endpoint: str,
    tensor: torch.Tensor,
    processor: Any = None,
    do_scaling: bool | None = True,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    output_type: str = "pil",
    return_type: str = "pil",
    image_format: str = "jpg",
    partial_postprocess: bool = False,
    input_tensor_type: str = "binary",
    output_tensor_type: str = "binary",
    height: int | None = None,
    width: int | None = None,
    *,
    extensions: protocol.Extensions | None = None,
    expected_shape: Sequence[int | None] | None = None,
    **options: Unpack[TransportOptions],
) -> Image.Image | list[Image.Image] | bytes | torch.Tensor:
    """Decode latents on a remote VAE; a drop-in for `diffusers.utils.remote_utils.remote_decode`.

    The positional arguments are diffusers' (same names, order and defaults), the request on the wire
    is the same, and so is the result wherever diffusers returns one:

    - output_type="pil", no processor, return_type="pil": a PIL RGB image whose `.format` is the
      lowercase sniffed type ("jpeg", "png", ...).
    - output_type="pil" with a processor (the video flag): return_type="pil" gives a list of PIL
      frames, return_type="pt" the tensor as received.
    - output_type="pt", partial_postprocess=True: return_type="pil" gives PIL images (a single image
      when there is one), return_type="pt" the uint8 [N,H,W,3] tensor.
    - output_type="pt", partial_postprocess=False: the raw tensor, or with a processor and
      return_type="pil" (or "mp4", as diffusers) `processor.postprocess(...)[0]`
      (`postprocess_video` for a video processor: a list of frames).
    - output_type="mp4", return_type="mp4": the MP4 bytes.

    Where diffusers crashes after the round trip, this does the obvious thing instead:

    - output_type="mp4" with return_type "pil" or "pt" (diffusers' own mp4 examples): the MP4 bytes.
    - output_type="pil", no processor, return_type="pt": the received image as a uint8 [1,H,W,3] tensor.
    - return_type="mp4" with output_type "pil", or "pt" with partial_postprocess=True: ValueError
      before anything is sent (there is no video to return).

    diffusers' input checks stay ValueErrors; a 3-D (packed) latent needs both `height` and
    `width` (diffusers only complains when both are missing, then sends neither), except an audio
    latent [B,C,L] decoded with output_type="pt" (no partial_postprocess), which takes neither: the
    raw audio [B,channels,samples] comes back. `input_tensor_type`
    / `output_tensor_type` "base64" warn and use binary, like diffusers. Unlike diffusers this warns
    about nothing for `do_scaling=True` without `scaling_factor` (it asks the server for its own VAE
    config, which our server supports).

    Keyword-only options: `extensions` (our optional query parameters, appended after diffusers'
    ones), `expected_shape` (checked against a tensor response; None or -1 entries match anything)
    and the `TransportOptions`: `timeout` (connect, read) seconds, `retries`/`backoff`, bearer
    `token` (else the one bound to the endpoint in `tokens`), `cold_start_timeout` (sent as
    X-Scale-Up-Timeout), `progress`, `cancel`, `session`. Every failure raises RemoteVAEError.
    With `extensions=Extensions(codec=...)` (output_type="pt", partial_postprocess=True, to a server whose
    /v1/models lists the codec) the frames arrive compressed and are decoded as they arrive: the result
    is the same uint8 tensor or PIL images; a corrupt or truncated answer is a RemoteVAEError.
    `total_timeout` bounds the whole call, retries included (default: connect + read timeout), and
    `max_reply_bytes` the answer (default: the most the request can decode to, remote/bounds.py).
    """
    _warn_base64("input_tensor_type", input_tensor_type)
    _warn_base64("output_tensor_type", output_tensor_type)
    _check_decode_inputs(tensor, processor, output_type, return_type, partial_postprocess, height, width)
    wire = protocol.build_decode_request(
        tensor,
        output_type=output_type,
        image_format=image_format,
        partial_postprocess=partial_postprocess,
        do_scaling=do_scaling,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        height=height,
        width=width,
        processor_flag=processor is not None,
        extensions=extensions,
    )
    if extensions is not None and extensions.codec and output_type == "pt" and partial_postprocess:
        want = [None] * 4 if expected_shape is None else expected_shape
        options["receiver"] = receiver_for(lambda shape: Target(np.empty(shape, dtype=np.uint8)), want)
    reply = send(endpoint, wire, **options)
    if reply.receiver is not None:
        frames = received_frames(reply)
        if return_type == "pt":
            return frames
        images = [Image.fromarray(frame) for frame in frames.numpy()]
        return images[0] if len(images) == 1 else images
    if output_type == "mp4":
        return reply.mp4()
    if output_type == "pil" and processor is None:
        image = reply.image()
        if return_type == "pt":
            return torch.from_numpy(np.array(image)).unsqueeze(0)
        return image
    if return_type == "pt":
        return reply.tensor(expected_shape)
    if output_type == "pil":  # with a processor: float frames in 0..1
        pixels = (reply.float_frames(expected_shape).permute(0, 2, 3, 1).float().numpy() * 255).round()
        # diffusers casts without clipping; clipping changes nothing in range and avoids wrap-around.
        return [Image.fromarray(frame) for frame in np.clip(pixels, 0, 255).astype("uint8")]
    if partial_postprocess:
        images = [Image.fromarray(image.numpy()) for image in reply.uint8_frames(expected_shape)]
        return images[0] if len(images) == 1 else images
    if processor is None:  # return_type="mp4" without processor: diffusers returns the tensor
        return reply.tensor(expected_shape)
    if callable(getattr(processor, "postprocess_video", None)):
        return processor.postprocess_video(
            reply.decoder_output(expected_shape, video=True), output_type="pil"
        )[0]
    return processor.postprocess(reply.decoder_output(expected_shape), output_type="pil")[0]


def remote_encode(
    endpoint: str,
    image: torch.Tensor | Image.Image,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    *,
    extensions: protocol.Extensions | None = None,
    expected_shape: Sequence[int | None] | None = None,
    **options: Unpack[TransportOptions],
) -> torch.Tensor:
    """Encode an image on a remote VAE; a drop-in for `diffusers.utils.remote_utils.remote_encode`.

    A PIL image is sent as PNG exactly like diffusers; a tensor is sent raw with `shape`/`dtype`.
    Returns the latent tensor the server answers with (checked against `expected_shape` if given).
    Keyword-only options as in `remote_decode`.
    """
    if isinstance(image, torch.Tensor):
        payload: torch.Tensor | bytes = image
    elif isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        payload = buffer.getvalue()
    else:
        raise TypeError(f"image must be a PIL image or a torch.Tensor, got {type(image).__name__}")
    wire = protocol.build_encode_request(
        payload, scaling_factor=scaling_factor, shift_factor=shift_factor, extensions=extensions
    )
    reply = send(endpoint, wire, **options)
    return reply.tensor(expected_shape)
