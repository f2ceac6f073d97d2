"""Pixel conversions at the server's edges: decoder output -> what the client asked for, and
request images/tensors (or audio) -> encoder input.

Decode outputs follow docs/protocol.md, "Decode". uint8 pixels are computed as diffusers'
VaeImageProcessor does, with the denormalisation in float16 (this reproduces the HF endpoints'
reference vectors exactly). All functions here are CPU work for the server's conversion pool.
"""

from __future__ import annotations

import functools
import io
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from ..remote import protocol
from ..remote.frames import Codec
from ..remote.presets import Preset
from ..remote.protocol import DecodeRequest, EncodeRequest, ProtocolError
from .backends.base import Geometry
from .errors import first_line
from .limits import LimitExceeded

PNG_COMPRESS_LEVEL = 1  # level 6 (Pillow's default) costs ~5x the time for ~15% smaller files
DEFAULT_JPEG_QUALITY = 95
# At high quality keep chroma at full resolution (4:4:4): VAE output has fine colour detail that 4:2:0
# smears (~24 dB instead of ~36 dB PSNR at q95 on our test images) for ~1.5x the encode time.
FULL_CHROMA_FROM_QUALITY = 90

# libx264 refuses frames wider or taller than this (avcodec_open2 fails; its level limits only warn).
MAX_MP4_SIDE = 16384
# Integer greyscale (16-bit PNGs open as I;16) holds 0..65535: scaled to 8 bits by 1/257 (65535 -> 255).
WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

TENSOR, UINT8, UNIT, IMAGE, MP4 = "tensor", "uint8", "unit", "image", "mp4"
PIXEL_KINDS = (UINT8, IMAGE, MP4)  # answers made from uint8 pixels
_ASKED = {
    TENSOR: "output_type=pt without partial_postprocess",
    UINT8: "output_type=pt with partial_postprocess=True",
    UNIT: "output_type=pil",
    IMAGE: "output_type=pil",
    MP4: "output_type=mp4",
}  # what a request said, by the answer it chose

# Sees the shape of the pixels an encode will make ([B,3,H,W] or [B,3,F,H,W], cropped) before they are made.
PixelCheck = Callable[[torch.Size], None]


def limit_pillow(max_pixels: int) -> None:
    """Pillow's own decompression-bomb limit from ours (--max-pixels), at server start-up: it is
    process-wide. A backstop: `encoder_input` checks every image's declared size before decoding it."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own check answers those with a 413


@dataclass(frozen=True)
class OutputSpec:
    """What one decode answers with.

    kind: TENSOR raw decoder output; UINT8 partial_postprocess NHWC pixels (compressed frames when
    `codec` is set); UNIT float pixels in [0,1] (pil + Accept tensor/binary); IMAGE a JPEG/PNG file;
    MP4 a video file.
    """

    kind: str
    codec: Codec | None = None  # of a UINT8 answer sent as compressed frames
    dtype: torch.dtype = torch.float16  # of TENSOR and UNIT outputs
    image_format: str = "jpeg"  # jpeg | png
    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    fps: int = 24

    @property
    def device_dtype(self) -> torch.dtype:
        """The dtype the device worker hands over: uint8/image/mp4 pixels all start from float16."""
        return self.dtype if self.kind in (TENSOR, UNIT) else torch.float16


def choose_output(req: DecodeRequest, preset: Preset) -> OutputSpec:
    """Map output_type / partial_postprocess / Accept (and our extensions) to an OutputSpec."""
    ext = req.extensions
    # float16 keeps 11 bits: more than an 8-bit image holds, less than 16-bit PCM audio.
    dtype = ext.torch_output_dtype(torch.float32 if preset.is_audio else torch.float16)
    if req.output_type == "pt" and req.partial_postprocess:
        return OutputSpec(UINT8, dtype=dtype, codec=ext.codec)
    spec = _other_output(req, dtype, preset)
    if ext.codec is not None:
        raise ProtocolError(
            f"codec={ext.codec} compresses the uint8 pixels of output_type=pt with partial_postprocess=True "
            f"only, not the answer to {_ASKED[spec.kind]}: send those two parameters, or no codec"
        )
    return spec


def _other_output(req: DecodeRequest, dtype: torch.dtype, preset: Preset) -> OutputSpec:
    ext = req.extensions
    if req.output_type == "pt":
        return OutputSpec(TENSOR, dtype=dtype)
    if req.output_type == "mp4":
        return OutputSpec(MP4, fps=ext.fps or preset.fps)
    if req.accept == protocol.TENSOR_TYPE:  # diffusers' "processor as a flag" path
        return OutputSpec(UNIT, dtype=dtype)
    quality = ext.jpeg_quality or DEFAULT_JPEG_QUALITY
    if req.accept == protocol.PNG_TYPE:
        fmt = "png"
    elif req.accept == protocol.JPEG_TYPE:
        fmt = "jpeg"
    else:  # no usable Accept: follow image_format
        fmt = "png" if req.image_format == "png" else "jpeg"
    return OutputSpec(IMAGE, image_format=fmt, jpeg_quality=quality)


def check_output_fits(spec: OutputSpec, preset: Preset, latent: torch.Tensor, model_name: str) -> None:
    """Refuse, before decoding, outputs that cannot hold what this latent decodes to."""
    if preset.is_audio:
        if spec.kind != TENSOR:
            raise ProtocolError(
                f"model {model_name} decodes audio, which it answers only as a raw tensor [B,channels,samples]: "
                f"send output_type=pt without partial_postprocess (not {_ASKED[spec.kind]})"
            )
        return
    batch = latent.shape[0]
    frames = preset.frames_for(latent.shape[2]) if latent.ndim == 5 else 1
    if spec.kind == IMAGE and batch * frames > 1:
        what = f"{batch} images" if frames == 1 else f"{batch * frames} frames"
        raise ProtocolError(
            f"output_type=pil returns one image file but this latent decodes to {what}; "
            "use output_type=pt (optionally with partial_postprocess=True), or send one image per request"
        )
    if spec.kind == MP4 and not preset.is_video:
        raise ProtocolError(
            f"output_type=mp4 needs a video model; {model_name} decodes images: use pil or pt"
        )
    if spec.kind == MP4 and batch > 1:
        raise ProtocolError(
            f"output_type=mp4 returns one video but the latent holds {batch}; send one video per request"
        )
    height, width = (side * preset.spatial_compression for side in latent.shape[-2:])
    if (
        spec.kind == MP4 and max(height + height % 2, width + width % 2) > MAX_MP4_SIDE
    ):  # odd sides are padded
        raise LimitExceeded(
            f"output_type=mp4 of {width}x{height} pixels per frame is over H.264's (libx264's) limit of "
            f"{MAX_MP4_SIDE} pixels per side; decode a smaller video, or use output_type=pt"
        )
    if spec.codec == "h264rgb" and max(height, width) > MAX_MP4_SIDE:  # refused before, not mid-answer
        raise LimitExceeded(
            f"codec=h264rgb of {width}x{height} pixels per frame is over H.264's (libx264's) limit of "
            f"{MAX_MP4_SIDE} pixels per side; use codec=jxl, or no codec"
        )


# --------------------------------------------------------------------------- decode outputs


def frames_first(x: torch.Tensor) -> torch.Tensor:
    """[B,3,F,H,W] -> [B*F,3,H,W] (video frames as an image batch); 4-D passes through."""
    if x.ndim == 5:
        batch, channels, frames, height, width = x.shape
        return x.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
    return x


def to_unit(x: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Decoder output -> pixels in [0,1], NCHW frames; the denormalisation is done in float16."""
    return (frames_first(x).half() * 0.5 + 0.5).clamp(0, 1).to(dtype)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Decoder output -> uint8 NHWC frames, exactly as `uint8_reference` computes them.

    On the CPU in one gather: every float16 (or bfloat16) value has one answer, so each channel is read
    from a 65536-entry table by its 16-bit patterns straight into its NHWC slots, in bands of rows on
    torch's intra-op thread count (numpy releases the GIL), as torch's own passes would run. float32 is
    rounded to float16 first, as the formula does.
    """
    if x.device.type != "cpu":
        return uint8_reference(x)
    if x.dtype not in HALF_DTYPES:
        x = x.half()
    bits = x.view(torch.int16).numpy().view(np.uint16)  # [B,C,H,W] or [B,C,F,H,W]
    pixels = np.empty((*bits.shape[:1], *bits.shape[2:], bits.shape[1]), dtype=np.uint8)  # channels last
    table = _uint8_table(x.dtype)

    def gather(rows: slice) -> None:
        for channel in range(bits.shape[1]):
            # mode="wrap": every uint16 is a valid index, and numpy then writes `out` without buffering it
            np.take(
                table, bits[:, channel][..., rows, :], out=pixels[..., channel][..., rows, :], mode="wrap"
            )

    height = bits.shape[-2]
    bands = min(torch.get_num_threads(), pixels.size // _BAND_VALUES, height) or 1
    edges = [height * band // bands for band in range(bands + 1)]
    if bands == 1:
        gather(slice(None))
    else:
        list(_render_pool().map(gather, [slice(a, b) for a, b in zip(edges, edges[1:])]))
    return torch.from_numpy(pixels).reshape(-1, *pixels.shape[-3:])


_BAND_VALUES = 1 << 19  # smaller bands cost more to hand over than they save


@functools.cache
def _render_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(
        max_workers=max(1, torch.get_num_threads()), thread_name_prefix="remote-vae-render"
    )


def uint8_frames(x: torch.Tensor) -> torch.Tensor:
    """Decoder output -> uint8 NHWC frames [N,H,W,3]; pixels the device job rendered already
    (`device_pixels`) are only viewed as frames."""
    if x.dtype == torch.uint8:
        return x.reshape(-1, *x.shape[-3:])
    return to_uint8(x)


def device_pixels(x: torch.Tensor) -> torch.Tensor:
    """Decoder output -> uint8 NHWC pixels where it lies (on the device: no float output to copy back),
    one item per batch item: [B,H,W,3] or [B,F,H,W,3] (a batch is split by its first dimension)."""
    return uint8_reference(x).reshape(x.shape[0], *x.shape[2:-2], *x.shape[-2:], 3)


def uint8_reference(x: torch.Tensor) -> torch.Tensor:
    """Decoder output -> uint8 NHWC frames: float16 denormalise, then *255 in float32, round half to even."""
    unit = (frames_first(x).half() * 0.5 + 0.5).clamp(0, 1)
    return (unit.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


HALF_DTYPES = (torch.float16, torch.bfloat16)  # 16-bit floats: a table of every bit pattern each


@functools.cache
def _uint8_table(dtype: torch.dtype) -> np.ndarray:
    """`uint8_reference` of every bit pattern of a 16-bit `dtype`, indexed by the pattern as an unsigned
    integer (bfloat16: its rounding to float16 included, so no conversion pass is needed)."""
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)
    return uint8_reference(every.view(1, 1, 1, -1)).flatten().numpy()


def encode_image(pixels: np.ndarray, image_format: str, jpeg_quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    """One HxWx3 uint8 image as a JPEG or PNG file."""
    buffer = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(pixels))
    if image_format == "png":
        image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    else:
        subsampling = 0 if jpeg_quality >= FULL_CHROMA_FROM_QUALITY else 2  # 0 = 4:4:4, 2 = 4:2:0
        image.save(buffer, format="JPEG", quality=jpeg_quality, subsampling=subsampling)
    return buffer.getvalue()


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """F x H x W x 3 uint8 frames as an H.264 (yuv420p) mp4.

    yuv420p needs even sizes: an odd edge is padded by repeating its last row/column.
    """
    import av  # only the mp4 path needs PyAV

    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        # veryfast: ~7x quicker than libx264's default preset at the same crf
        stream = container.add_stream("libx264", rate=fps, options={"preset": "veryfast", "crf": "23"})
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(
                av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            ):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def render_decode(x: torch.Tensor, spec: OutputSpec) -> tuple[bytes | memoryview, dict[str, str]]:
    """Decoder output (on the CPU, in `spec.device_dtype`, or pixels from `device_pixels`) -> response
    body and headers."""
    if spec.kind == TENSOR:
        return protocol.tensor_response(x.to(spec.dtype))
    if spec.kind == UINT8:
        return protocol.tensor_response(uint8_frames(x))
    if spec.kind == UNIT:
        return protocol.tensor_response(to_unit(x, spec.dtype))
    pixels = uint8_frames(x).numpy()
    if spec.kind == MP4:
        return encode_mp4(pixels, spec.fps), {"content-type": "video/mp4"}
    content_type = protocol.PNG_TYPE if spec.image_format == "png" else protocol.JPEG_TYPE
    return encode_image(pixels[0], spec.image_format, spec.jpeg_quality), {"content-type": content_type}


# --------------------------------------------------------------------------- encode inputs


def encoder_input(req: EncodeRequest, preset: Preset, check: PixelCheck | None = None) -> torch.Tensor:
    """An encode request's image or tensor -> float32 pixels in [-1,1] the model can take.

    Layouts: float tensors NCHW in [-1,1] ([B,3,F,H,W] for video models, where 4-D means single
    frames); uint8 tensors NHWC pixels 0..255 (a 4th channel, alpha, is dropped; for video models a
    4-D uint8 tensor is the frames of one video). H and W are centre-cropped to a multiple of the
    spatial compression like ComfyUI; video frames are cut to 1 + a multiple of the temporal one.
    `check` sees the final shape: for an image file from its header, before a pixel is decoded.
    """
    check = check or (lambda shape: None)
    if req.image_bytes is not None:
        x = _read_image(req.image_bytes, preset, check)
    else:
        assert req.tensor is not None
        x = _float_pixels(req.tensor, preset)
    if x.shape[1] != 3:
        raise ProtocolError(
            f"encode input of shape {list(req.tensor.shape) if req.tensor is not None else list(x.shape)} "
            f"has {x.shape[1]} colour channels; send RGB: float [B,3,H,W] in [-1,1] or uint8 [B,H,W,3]"
        )
    x = _crop(x, preset)
    check(x.shape)
    return x


def audio_input(req: EncodeRequest, model: str, geometry: Geometry) -> torch.Tensor:
    """An audio model's encode input: a float tensor [B,channels,samples], centre-cropped to whole
    latent steps as ComfyUI's VAE.encode does. Image files and uint8 tensors are refused."""
    channels, step = geometry.output_channels, geometry.spatial_compression
    want = f"a raw float tensor [B,{channels},samples] ({geometry.sample_rate} Hz) with `shape` and `dtype`"
    audio = req.tensor
    if audio is None:
        raise ProtocolError(f"model {model} encodes audio, not images: send {want}")
    if audio.dtype == torch.uint8 or audio.ndim != 3 or audio.shape[1] != channels:
        raise ProtocolError(
            f"encode input of shape {list(audio.shape)} ({protocol.dtype_name(audio.dtype)}) is not audio "
            f"model {model} takes: send {want}"
        )
    samples = audio.shape[2] // step * step
    if samples == 0:
        raise ProtocolError(
            f"audio of {audio.shape[2]} samples is shorter than model {model}'s latent step of {step} samples"
        )
    return audio.narrow(2, (audio.shape[2] - samples) // 2, samples).float().contiguous()


def _read_image(data: bytes, preset: Preset, check: PixelCheck) -> torch.Tensor:
    """An image file -> [1,3,H,W] ([1,3,1,H,W] for video models) in [-1,1], checked from its header first."""
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as exc:
        raise LimitExceeded(
            f"encode image is far over the server's limit of {Image.MAX_IMAGE_PIXELS} pixels per image "
            f"(--max-pixels): Pillow refused its header ({first_line(exc)})"
        ) from None
    except (OSError, ValueError) as exc:
        raise ProtocolError(f"encode body could not be read as an image: {exc}") from None
    with image:
        declared = torch.empty((1, 3, image.height, image.width), device="meta")
        check(_crop(_as_frames(declared, preset), preset).shape)  # EXIF rotation keeps the pixel counts
        try:
            pixels = as_rgb(image)  # decodes
        except (OSError, ValueError) as exc:
            raise ProtocolError(f"encode body could not be read as an image: {exc}") from None
    return _as_frames(_nchw_from_uint8(torch.from_numpy(pixels)[None]), preset)


def _as_frames(x: torch.Tensor, preset: Preset) -> torch.Tensor:
    """An image for a video model is a one-frame video."""
    return x.unsqueeze(2) if preset.is_video else x


def as_rgb(image: Image.Image) -> np.ndarray:
    """What an image shows, as H x W x 3 uint8 pixels.

    The EXIF orientation is applied; 16- and 32-bit integer greyscale is scaled to 8 bits (x/257);
    alpha is dropped, keeping the colour under it, as ComfyUI's LoadImage does; bilevel, palette,
    CMYK and YCbCr images are converted by Pillow. Float images (mode F) have no agreed range: refused.
    """
    if image.mode == "F":
        raise ProtocolError(
            "encode image has mode F (32-bit float pixels), whose brightness range is not defined; "
            "send an 8- or 16-bit PNG, a JPEG or a WebP"
        )
    image = ImageOps.exif_transpose(image)
    if image.mode in WIDE_GREY_MODES:
        grey = np.clip(np.rint(np.asarray(image).astype(np.float32) / 257), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.array(image.convert("RGB"))


def _nchw_from_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[B,H,W,C] uint8 -> [B,3,H,W] float32 in [-1,1] (alpha dropped), as VaeImageProcessor does."""
    if pixels.shape[-1] == 4:
        pixels = pixels[..., :3]
    return (pixels.float() / 255.0 * 2.0 - 1.0).permute(0, 3, 1, 2)


def _float_pixels(t: torch.Tensor, preset: Preset) -> torch.Tensor:
    shape = list(t.shape)
    if t.dtype == torch.uint8:
        if t.ndim == 3:
            t = t[None]
        if t.ndim == 4 and preset.is_video:  # frames of one video
            t = t[None]
        if t.ndim not in (4, 5) or (t.ndim == 5 and not preset.is_video) or t.shape[-1] not in (3, 4):
            raise ProtocolError(
                f"uint8 encode input of shape {shape} is not [B,H,W,3] pixels"
                + (" or [F,H,W,3] frames" if preset.is_video else "")
            )
        if t.ndim == 5:
            return torch.stack([_nchw_from_uint8(video) for video in t]).permute(0, 2, 1, 3, 4)
        return _nchw_from_uint8(t)
    x = t.float()
    if x.ndim == 3:
        x = x[None]
    if x.ndim == 4 and preset.is_video:
        x = x.unsqueeze(2)  # each image a one-frame video
    want = 5 if preset.is_video else 4
    if x.ndim != want:
        layout = "[B,3,F,H,W] or [B,3,H,W]" if preset.is_video else "[B,3,H,W]"
        raise ProtocolError(f"float encode input of shape {shape} is not {layout} in [-1,1]")
    return x


def _crop(x: torch.Tensor, preset: Preset) -> torch.Tensor:
    factor = preset.spatial_compression
    for dim in (x.ndim - 2, x.ndim - 1):
        size = x.shape[dim]
        keep = size // factor * factor
        if keep == 0:
            raise ProtocolError(
                f"encode input of {x.shape[-1]}x{x.shape[-2]} pixels is smaller than the model's "
                f"{factor}-pixel latent cell"
            )
        x = x.narrow(dim, (size - keep) // 2, keep)
    if preset.is_video and preset.temporal_compression > 1:
        frames = x.shape[2]
        x = x[:, :, : (frames - 1) // preset.temporal_compression * preset.temporal_compression + 1]
    return x.contiguous()
