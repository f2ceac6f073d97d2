"""LATENT / IMAGE tensors <-> what goes on the wire, for one request ("chunk") at a time.

ComfyUI's conventions: LATENT samples are raw VAE-space latents [B,C,H,W] / [B,C,T,H,W]; IMAGE is
[B,H,W,3] float32 in [0,1], a video being its frames; ComfyUI's VAE maps pixels x to 2x-1 on the way in
and decoder output y to clamp((y+1)/2) on the way out. Every function here reproduces that.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..remote import planes, protocol
from ..remote.frames import Codec
from ..remote.presets import Preset
from ..remote.receiving import ReceiverFactory, Target, received_frames, receiver_for
from ..remote.reply import FLOAT, Reply
from .choices import PIXEL_TRANSFERS, TransferMode

SEND_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# A reply that parses but does not fit the preset most likely comes from another model.
SAME_MODEL = "check that the endpoint URL and the preset name the same model"
# Float replies numpy reads in place (wire order is little-endian); others are converted by torch first.
LITTLE_ENDIAN = {torch.float32: np.dtype("<f4"), torch.float16: np.dtype("<f2")}


# --------------------------------------------------------------------------- decode


@dataclass(frozen=True)
class DecodeForm:
    """How one run's decode answers travel: the transfer asked for and what the run resolved for it."""

    transfer: TransferMode
    codec: Codec | None = None  # uint8 frames compressed by this codec (auto, near-lossless)
    upload: protocol.FloatDtype | None = None  # the latent sent in the dtype the server's model runs in
    packed: bool = False  # the latent sent packed (remote/planes.py), where that makes it smaller

    @property
    def pixels(self) -> bool:
        """Whether the answer is uint8 [N,H,W,3] pixels, taken as they arrive."""
        return self.transfer in PIXEL_TRANSFERS


def extensions(
    *, float32: bool = False, tile_size: int | None = None, codec: Codec | None = None
) -> protocol.Extensions:
    """Our request extensions on every node request: `reference=comfyui` (where ComfyUI's VAE code differs
    from diffusers', HunyuanVideo's mid-block attention, the server decodes and encodes like ComfyUI),
    float32 answers for `exact`, and tiles of `tile_size` latent pixels made by the server (VAE Decode
    (Tiled) / VAE Encode (Tiled) on a Remote VAE Loader's VAE). Other endpoints ignore them."""
    return protocol.Extensions(
        output_dtype="float32" if float32 else None,
        tile="on" if tile_size else "auto",
        tile_size=tile_size,
        reference="comfyui",
        codec=codec,
    )


def decode_request(
    latent: torch.Tensor, transfer: TransferMode | DecodeForm, tile_size: int | None = None
) -> protocol.WireRequest:
    """The request for one chunk of raw latents: scaling off, output form chosen by `transfer`."""
    form = transfer if isinstance(transfer, DecodeForm) else DecodeForm(transfer)
    transfer = form.transfer
    if form.upload is not None:
        latent = latent.to(protocol.DTYPES[form.upload])
    elif latent.dtype not in SEND_DTYPES:
        latent = latent.float()
    plain = extensions(tile_size=tile_size)
    if form.pixels:
        wire = protocol.build_decode_request(
            latent,
            output_type="pt",
            partial_postprocess=True,
            do_scaling=False,
            extensions=extensions(tile_size=tile_size, codec=form.codec),
        )
        return planes.packed(wire, latent.element_size()) if form.packed else wire
    if transfer == "exact":
        return protocol.build_decode_request(
            latent,
            output_type="pt",
            do_scaling=False,
            extensions=extensions(float32=True, tile_size=tile_size),
        )
    if transfer == "compact":
        return protocol.build_decode_request(
            latent, output_type="pil", image_format="jpg", do_scaling=False, extensions=plain
        )
    raise ValueError(f"transfer {transfer!r} is not one of auto, lossless, near-lossless, exact, compact")


def decoded_size(preset: Preset, latent_shape: Sequence[int]) -> tuple[int, int, int]:
    """(frames per batch element, height, width) that `latent_shape` decodes to; frames is 1 for images."""
    s = preset.spatial_compression
    if len(latent_shape) == 5:
        return preset.frames_for(latent_shape[2]), latent_shape[3] * s, latent_shape[4] * s
    return 1, latent_shape[2] * s, latent_shape[3] * s


def image_from_reply(
    reply: Reply, transfer: TransferMode, preset: Preset, latent_shape: Sequence[int]
) -> torch.Tensor:
    """IMAGE frames [B*F,H,W,3] float32 from a decode reply, checked against what the latent decodes to."""
    frames, height, width = decoded_size(preset, latent_shape)
    batch = latent_shape[0]
    decodes_to = f"a latent of shape {list(latent_shape)} decodes to"
    if transfer == "compact":
        image = reply.image(
            (width, height),
            kind="a readable JPEG image",
            meaning=f"the latent decodes to {width}x{height}",
            hint=SAME_MODEL,
        )
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).float().div_(255.0).unsqueeze(0)
    # uint8 pixels were checked and converted (`uint8 / 255` in float32) as they arrived (`pixel_receiver`);
    # float output is read in place from the body into one preallocated IMAGE, with the arithmetic of
    # `clamp((y + 1) / 2)` in float32 (the same IEEE operations, so the same values).
    if transfer in PIXEL_TRANSFERS:
        return received_frames(reply)
    want = [batch, 3, frames, height, width] if len(latent_shape) == 5 else [batch, 3, height, width]
    meaning = f"{decodes_to} {want} float with preset {preset.name}"
    declared = reply.declared_tensor(want, dtype=FLOAT, meaning=meaning, hint=SAME_MODEL)
    if declared.dtype in LITTLE_ENDIAN:
        decoded = np.frombuffer(reply.body, dtype=LITTLE_ENDIAN[declared.dtype]).reshape(want)
    else:  # bfloat16: numpy has no such dtype
        decoded = reply.tensor(want, dtype=FLOAT, meaning=meaning, hint=SAME_MODEL).float().numpy()
    image = torch.empty([batch, *want[2:], 3], dtype=torch.float32)  # [B,(F,)H,W,3]
    for channel in range(3):  # each channel read in order, written to its NHWC slots
        np.add(decoded[:, channel], np.float32(1.0), out=image.numpy()[..., channel], dtype=np.float32)
    return image.div_(2.0).clamp_(0.0, 1.0).view(-1, height, width, 3)


def pixel_receiver(preset: Preset, latent_shape: Sequence[int]) -> ReceiverFactory:
    """Receivers converting a uint8 answer (raw or compressed) into one preallocated IMAGE as it arrives,
    with the arithmetic of `uint8 / 255` (so the same values as `image_from_reply` gives)."""
    frames, height, width = decoded_size(preset, latent_shape)
    want = [latent_shape[0] * frames, height, width, 3]
    target = Target(np.empty(want, dtype=np.float32))
    meaning = f"a latent of shape {list(latent_shape)} decodes to {want} uint8 with preset {preset.name}"
    return receiver_for(lambda _: target, want, meaning=meaning, hint=SAME_MODEL)


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
    pixels: torch.Tensor,
    transfer: TransferMode,
    as_video: bool,
    as_png: bool = False,
    tile_size: int | None = None,
) -> protocol.WireRequest:
    """The request for IMAGE pixels [B,H,W,3]: uint8 NHWC (lossless) or float32 NCHW in [-1,1] (exact).

    `as_video`: the images are the frames of one video; the float form is then [1,3,F,H,W].
    `as_png`: one image as a PNG file instead of a raw tensor (lossless too): the input the Hugging Face
    encode endpoints were tested with (diffusers sends PIL images so), where raw uint8 is untested.
    `tile_size`: the server encodes in tiles of that many latent pixels.
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
    return protocol.build_encode_request(wire, extensions=extensions(tile_size=tile_size))


def _png(image: torch.Tensor) -> bytes:
    from PIL import Image

    pixels = (image.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)  # level 6 costs ~100x the time
    return buffer.getvalue()


def latent_from_reply(
    reply: Reply, preset: Preset | None, pixel_shape: Sequence[int], as_video: bool, one_frame: bool
) -> torch.Tensor:
    """LATENT samples (float32) from an encode reply, checked against what the pixels encode to."""
    batch, height, width = pixel_shape[0], pixel_shape[1], pixel_shape[2]
    if preset is None:
        tensor = reply.tensor()
        if tensor.ndim not in (4, 5) or tensor.shape[0] != batch:
            raise reply.unexpected(
                f"but it holds {list(tensor.shape)}, not a latent batch of {batch} for {list(pixel_shape)} "
                "pixels (for a video model pick its preset: the frames are then sent as one video)",
                SAME_MODEL,
            )
    else:
        s = preset.spatial_compression
        channels = preset.latent_channels
        if as_video:
            want = [1, channels, preset.latent_frames_for(batch), height // s, width // s]
        elif one_frame:
            want = [batch, channels, 1, height // s, width // s]
        else:
            want = [batch, channels, height // s, width // s]
        meaning = f"{list(pixel_shape)} pixels encode to {want} with preset {preset.name}"
        tensor = reply.tensor(want, meaning=meaning, hint=SAME_MODEL)
    if not tensor.is_floating_point():
        raise reply.unexpected(
            f"but it holds {protocol.dtype_name(tensor.dtype)} values where a float latent was expected",
            SAME_MODEL,
        )
    return tensor.float()


# --------------------------------------------------------------------------- audio (a Remote VAE Loader's VAE)


def audio_request(waveform: torch.Tensor, tile_size: int | None = None) -> protocol.WireRequest:
    """The encode request for audio [B,channels,samples]: float32 as it is (docs/protocol.md: audio is raw)."""
    return protocol.build_encode_request(
        waveform.float().contiguous(), extensions=extensions(tile_size=tile_size)
    )


def audio_from_reply(reply: Reply, channels: int, latent_shape: Sequence[int]) -> torch.Tensor:
    """Audio [B,channels,samples] float32 from a decode reply to latents of `latent_shape`."""
    batch = latent_shape[0]
    meaning = f"a latent of shape {list(latent_shape)} decodes to audio [{batch},{channels},samples]"
    return reply.tensor([batch, channels, None], dtype=FLOAT, meaning=meaning, hint=SAME_MODEL).float()


def audio_latent_from_reply(reply: Reply, channels: int, audio_shape: Sequence[int]) -> torch.Tensor:
    """Audio latents [B,C,...] float32 from an encode reply to audio of `audio_shape`."""
    tensor = reply.tensor(dtype=FLOAT)
    if tensor.ndim < 3 or tensor.shape[0] != audio_shape[0] or tensor.shape[1] != channels:
        raise reply.unexpected(
            f"but it holds {list(tensor.shape)} where audio of shape {list(audio_shape)} encodes to "
            f"[{audio_shape[0]},{channels},...]",
            SAME_MODEL,
        )
    return tensor.float()
