"""LATENT / IMAGE tensors <-> what goes on the wire, for one request ("chunk") at a time.

ComfyUI's conventions: LATENT samples are raw VAE-space latents [B,C,H,W] / [B,C,T,H,W]; IMAGE is
[B,H,W,3] float32 in [0,1], a video being its frames; ComfyUI's VAE maps pixels x to 2x-1 on the way in
and decoder output y to clamp((y+1)/2) on the way out. Every function here reproduces that.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch

from ..remote import protocol
from ..remote.presets import Preset

SEND_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class UnexpectedReply(ValueError):
    """A well-formed reply that does not hold what the request asked for."""


# --------------------------------------------------------------------------- decode


# Our server's request extension: where ComfyUI's VAE code differs from diffusers' (HunyuanVideo's
# mid-block attention), decode and encode like ComfyUI does. Other endpoints ignore it.
COMFYUI = protocol.Extensions(reference="comfyui")


def decode_request(latent: torch.Tensor, transfer: str) -> protocol.WireRequest:
    """The request for one chunk of raw latents: scaling off, output form chosen by `transfer`."""
    if latent.dtype not in SEND_DTYPES:
        latent = latent.float()
    if transfer == "lossless":
        return protocol.build_decode_request(
            latent, output_type="pt", partial_postprocess=True, do_scaling=False, extensions=COMFYUI
        )
    if transfer == "exact":
        return protocol.build_decode_request(
            latent, output_type="pt", do_scaling=False, extensions=protocol.Extensions(output_dtype="float32", reference="comfyui")
        )
    if transfer == "compact":
        return protocol.build_decode_request(
            latent, output_type="pil", image_format="jpg", do_scaling=False, extensions=COMFYUI
        )
    raise ValueError(f"transfer {transfer!r} is not one of lossless, exact, compact")


def decoded_size(preset: Preset, latent_shape: Sequence[int]) -> tuple[int, int, int]:
    """(frames per batch element, height, width) that `latent_shape` decodes to; frames is 1 for images."""
    s = preset.spatial_compression
    if len(latent_shape) == 5:
        return preset.frames_for(latent_shape[2]), latent_shape[3] * s, latent_shape[4] * s
    return 1, latent_shape[2] * s, latent_shape[3] * s


def image_from_reply(reply, transfer: str, preset: Preset, latent_shape: Sequence[int]) -> torch.Tensor:
    """IMAGE frames [B*F,H,W,3] float32 from a decode reply (the client's `Reply`: `.body`, `.tensor()`)."""
    frames, height, width = decoded_size(preset, latent_shape)
    batch = latent_shape[0]
    if transfer == "compact":
        return _image_from_jpeg(reply.body, height, width)
    tensor = reply.tensor()
    if transfer == "lossless":
        _expect(tensor, (batch * frames, height, width, 3), torch.uint8, preset, latent_shape)
        return tensor.float() / 255.0
    want = (batch, 3, frames, height, width) if len(latent_shape) == 5 else (batch, 3, height, width)
    _expect(tensor, want, None, preset, latent_shape)
    images = torch.clamp((tensor.float() + 1.0) / 2.0, min=0.0, max=1.0).movedim(1, -1)
    return images.reshape(-1, height, width, 3)


def _image_from_jpeg(body: bytes, height: int, width: int) -> torch.Tensor:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(body))
        image.load()
    except (UnidentifiedImageError, OSError) as err:
        raise UnexpectedReply(f"its body is not a readable JPEG image ({len(body)} bytes): {err}") from None
    if image.size != (width, height):
        raise UnexpectedReply(
            f"it is a {image.size[0]}x{image.size[1]} image where the latent decodes to {width}x{height}"
        )
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(pixels.copy()).float().div_(255.0).unsqueeze(0)


def _expect(
    tensor: torch.Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype | None,
    preset: Preset,
    latent_shape: Sequence[int],
) -> None:
    if tuple(tensor.shape) != shape or (dtype is not None and tensor.dtype != dtype):
        want = f"{list(shape)} {protocol.dtype_name(dtype) if dtype else 'float'}"
        raise UnexpectedReply(
            f"it holds {list(tensor.shape)} {protocol.dtype_name(tensor.dtype)} where a latent of shape "
            f"{list(latent_shape)} decodes to {want} with preset {preset.name}"
        )
    if dtype is None and not tensor.is_floating_point():
        raise UnexpectedReply(
            f"it holds {protocol.dtype_name(tensor.dtype)} values where floats were asked for"
        )


# --------------------------------------------------------------------------- encode


def crop_pixels(pixels: torch.Tensor, multiple: int) -> torch.Tensor:
    """Centre-crop H and W down to a multiple of the compression, as ComfyUI's `vae_encode_crop_pixels`."""
    for dim in (1, 2):
        size = pixels.shape[dim]
        keep = (size // multiple) * multiple
        if keep != size:
            pixels = pixels.narrow(dim, (size % multiple) // 2, keep)
    return pixels


def encode_request(
    pixels: torch.Tensor, transfer: str, as_video: bool, as_png: bool = False
) -> protocol.WireRequest:
    """The request for IMAGE pixels [B,H,W,3]: uint8 NHWC (lossless) or float32 NCHW in [-1,1] (exact).

    `as_video`: the images are the frames of one video; the float form is then [1,3,F,H,W].
    `as_png`: one image as a PNG file instead of a raw tensor (lossless too): the input the Hugging Face
    encode endpoints were tested with (diffusers sends PIL images so), where raw uint8 is untested.
    """
    if as_png and transfer == "lossless":
        if pixels.shape[0] != 1:
            raise ValueError(f"a PNG holds one image, not a batch of {pixels.shape[0]}")
        return protocol.build_encode_request(_png(pixels[0]))
    if transfer == "lossless":
        wire = (pixels.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).contiguous()
    elif transfer == "exact":
        wire = pixels.float().movedim(-1, 1) * 2.0 - 1.0
        if as_video:
            wire = wire.movedim(1, 0).unsqueeze(0)
    else:
        raise ValueError(f"transfer {transfer!r} is not one of lossless, exact")
    return protocol.build_encode_request(wire, extensions=COMFYUI)


def _png(image: torch.Tensor) -> bytes:
    from PIL import Image

    pixels = (image.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)  # level 6 costs ~100x the time
    return buffer.getvalue()


def latent_from_reply(
    reply, preset: Preset | None, pixel_shape: Sequence[int], as_video: bool, one_frame: bool
) -> torch.Tensor:
    """LATENT samples (float32) from an encode reply, checked against what the pixels encode to."""
    tensor = reply.tensor()
    batch, height, width = pixel_shape[0], pixel_shape[1], pixel_shape[2]
    if not tensor.is_floating_point():
        raise UnexpectedReply(
            f"it holds {protocol.dtype_name(tensor.dtype)} values where a float latent was expected"
        )
    if preset is not None:
        s = preset.spatial_compression
        channels = preset.latent_channels
        if as_video:
            want = (1, channels, preset.latent_frames_for(batch), height // s, width // s)
        elif one_frame:
            want = (batch, channels, 1, height // s, width // s)
        else:
            want = (batch, channels, height // s, width // s)
        if tuple(tensor.shape) != want:
            raise UnexpectedReply(
                f"it holds a latent of shape {list(tensor.shape)} where {list(pixel_shape)} pixels encode to "
                f"{list(want)} with preset {preset.name}"
            )
    elif tensor.ndim not in (4, 5) or tensor.shape[0] != batch:
        raise UnexpectedReply(
            f"it holds {list(tensor.shape)}, not a latent batch of {batch} for {list(pixel_shape)} pixels "
            "(for a video model pick its preset: the frames are then sent as one video)"
        )
    return tensor.float()
