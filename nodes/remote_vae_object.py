"""A `VAE` that lives on a server: what Remote VAE Loader gives, and what ComfyUI's core nodes accept.

Core nodes take a `comfy.sd.VAE` and use a small part of it. In ComfyUI 0.3.75: `decode` (VAEDecode,
VAEDecodeAudio), `decode_tiled` with `spacial_compression_decode` / `temporal_compression_decode`
(VAEDecodeTiled), `encode` (VAEEncode, VAEEncodeForInpaint, InpaintModelConditioning, WanImageToVideo,
HunyuanImageToVideo, LTXVImgToVideo, VAEEncodeAudio), `encode_tiled` (VAEEncodeTiled), `downscale_ratio`
(VAEEncodeForInpaint), `spacial_compression_encode` and `latent_channels` (Wan's other nodes),
`downscale_index_formula` (LTXVAddGuide), `get_ram_usage` (the RAM-pressure cache). Later versions also read
`latent_dim`, `audio_sample_rate`, `temporal_compression_encode` and friends; every attribute a `comfy.sd.VAE`
has in those versions is here, from the server's description of its model, except the weights:
`get_sd` and unknown attributes raise errors that say so.

Decode and encode go through the nodes' client path (operations.py: requests of bounded size sent in
parallel, progress, Cancel, failover over several endpoints), with raw latents; the default transfer
`exact` (float32 both ways) gives what the same file gives loaded locally on the server's device and
dtype. Tiled calls ask the server to tile (`tile=on`, `tile_size`); it tiles with its own overlap. Nothing
here holds weights or allocates device memory: results are float32 tensors on the CPU, in ComfyUI's
layouts ([B,H,W,C] images, [B,F,H,W,C] videos, [B,samples,channels] audio).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from ..remote.catalog import ServerModel, describe_model
from ..remote.protocol import MAX_TILE_SIZE, MIN_TILE_SIZE
from . import comfy_runtime
from .choices import AUTO, DEFAULT_TIMEOUT, TRANSFER_LOADER, TransferMode
from .operations import (
    CONNECT_TIMEOUT,
    Connection,
    NodeRequest,
    Outcome,
    RunOptions,
    decode_audio,
    decode_latent,
    encode_audio,
    encode_image,
    run_node,
)
from .resolve import NodeInputError, is_hugging_face

DEFAULT_AUDIO_RATE = 44100  # what ComfyUI's audio nodes assume where a VAE names no rate
DECODE_TILE = 64  # ComfyUI's own default tile sides: latent pixels (decode), image pixels (encode)
ENCODE_TILE = 512
NO_WEIGHTS = "its weights stay on the server: this node needs a VAE loaded here (Load VAE)"
LOADER_EXAMPLE = "http://127.0.0.1:8190/sd15"


def load_remote_vae(
    endpoint: str, transfer: TransferMode = "exact", timeout: int = DEFAULT_TIMEOUT
) -> RemoteVAE:
    """Remote VAE Loader: the model `endpoint` names, described once by its server; nothing is loaded here."""
    endpoint = (endpoint or "").strip()
    if not endpoint:
        raise NodeInputError(
            f"Remote VAE Loader needs the URL of a model on your server, such as {LOADER_EXAMPLE}"
        )
    if is_hugging_face(endpoint):
        raise NodeInputError(
            f"endpoint {endpoint} is a Hugging Face endpoint, which does not describe its model: Remote VAE Loader "
            "needs a remote-vae server; for Hugging Face use Remote VAE Decode / Encode with a preset"
        )
    _check_transfer(transfer)
    request = NodeRequest(AUTO, endpoint, transfer, timeout)
    conn = Connection.for_request(request, None, "decode", RunOptions())  # checks the URL, timeout and tokens
    model = describe_model(endpoint, tokens=conn.tokens, timeout=min(CONNECT_TIMEOUT * 3, float(timeout)))
    return RemoteVAE(request, model)


class RemoteVAE:
    """Stands in for `comfy.sd.VAE`; decode and encode run on the server that hosts `model`."""

    def __init__(self, request: NodeRequest, model: ServerModel) -> None:
        _check_transfer(request.transfer)
        self.model = model
        self.request = replace(request, preset=AUTO, model=model.preset(), upload=model.dtype)
        audio, video = model.dims == "audio", model.dims == "video"
        s, t = model.spatial_compression, model.temporal_compression
        self.latent_channels = model.latent_channels
        self.latent_dim = 1 if audio else 3 if video else 2
        self.output_channels = model.output_channels
        self.audio_sample_rate = model.sample_rate or DEFAULT_AUDIO_RATE
        self.audio_sample_rate_output = self.audio_sample_rate
        self.not_video = model.still_image
        # comfy.sd.VAE's ratios: numbers, or for video (frames formula, height, width) as ComfyUI writes them
        self.upscale_ratio: Any = (lambda a: max(0, a * t - (t - 1)), s, s) if video else s
        self.downscale_ratio: Any = (lambda a: max(0, math.floor((a + t - 1) / t)), s, s) if video else s
        self.upscale_index_formula = self.downscale_index_formula = (t, s, s) if video else None
        self.crop_input = True
        self.extra_1d_channel = self.pad_channel_value = self.format_encoded = None
        self.handles_tiling = False  # no model-owned tiling here: the server tiles
        # No weights and no device memory: nothing for ComfyUI's model management to load, offload or count
        # (`first_stage_model` and `patcher` are absent on purpose, see __getattr__).
        self.size = 0
        self.disable_offload = True
        self.device = self.output_device = torch.device("cpu")
        self.vae_dtype = torch.float32
        self.working_dtypes = [torch.float32]

    def __repr__(self) -> str:
        m = self.model
        return (
            f"RemoteVAE({self.request.endpoint}: {m.dims}, {m.latent_channels} channels, {m.backend} backend)"
        )

    def __getattr__(self, name: str) -> Any:  # only for attributes not set above
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"a Remote VAE Loader's VAE has no {name!r}: {NO_WEIGHTS}")

    # ------------------------------------------------------------------ what ComfyUI's nodes ask

    def throw_exception_if_invalid(self) -> None:
        """Valid once loaded: the server described the model."""

    def spacial_compression_decode(self) -> int:
        return self.model.spatial_compression

    def spacial_compression_encode(self) -> int:
        return self.model.spatial_compression

    def temporal_compression_decode(self) -> int | None:
        return self.model.temporal_compression if self.latent_dim == 3 else None

    def temporal_compression_encode(self) -> int | None:
        return self.temporal_compression_decode()

    def memory_used_decode(self, shape: Any, dtype: Any) -> int:
        return 0  # on the server

    def memory_used_encode(self, shape: Any, dtype: Any) -> int:
        return 0

    def model_size(self) -> int:
        return 0

    def get_ram_usage(self) -> int:
        return 0

    def is_dynamic(self) -> bool:
        return False

    def get_sd(self) -> dict:
        raise RuntimeError(f"a Remote VAE Loader's VAE cannot be saved: {NO_WEIGHTS}")

    def process_input(self, image: torch.Tensor) -> torch.Tensor:
        return image if self.latent_dim == 1 else image * 2.0 - 1.0

    def process_output(self, image: torch.Tensor) -> torch.Tensor:
        return image if self.latent_dim == 1 else torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0)

    def vae_encode_crop_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """ComfyUI's centre crop of every dimension between batch and channels to the compression."""
        ratio = self.spacial_compression_encode()
        for dim in range(1, pixels.ndim - 1):
            size = pixels.shape[dim]
            keep = (size // ratio) * ratio
            if keep != size:
                pixels = pixels.narrow(dim, (size % ratio) // 2, keep)
        return pixels

    # ------------------------------------------------------------------ decode and encode

    def decode(self, samples_in: torch.Tensor, vae_options: dict | None = None) -> torch.Tensor:
        """Raw latents -> [B,H,W,C] images, [B,F,H,W,C] videos or [B,samples,channels] audio, as VAE.decode."""
        if vae_options:
            raise NodeInputError(f"a Remote VAE Loader's VAE takes no vae_options ({', '.join(vae_options)})")
        return self._decode(samples_in, None)

    def decode_tiled(self, samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        """As `decode`, tiled by the server at `tile_x` x `tile_y` latent pixels (square tiles of the larger
        side; the server picks the overlap and decodes all frames at once)."""
        return self._decode(samples, _tile(max(tile_x or DECODE_TILE, tile_y or DECODE_TILE)))

    def encode(self, pixel_samples: torch.Tensor) -> torch.Tensor:
        """[B,H,W,C] images (a video VAE: the frames of one video; [B,F,H,W,C]: B videos) or [B,samples,
        channels] audio -> raw latents, as VAE.encode."""
        return self._encode(pixel_samples, None)

    def encode_tiled(
        self, pixel_samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None
    ):
        """As `encode`, tiled by the server at `tile_x` x `tile_y` image pixels (as `decode_tiled`)."""
        side = max(tile_x or ENCODE_TILE, tile_y or ENCODE_TILE)
        return self._encode(pixel_samples, _tile(side // self.spacial_compression_encode()))

    def _decode(self, samples: torch.Tensor, tile_size: int | None) -> torch.Tensor:
        request = self._with_tiles(tile_size)
        if self.latent_dim == 1:
            return self._run(
                lambda run: decode_audio(samples, request, self.output_channels, run), "decode"
            ).movedim(1, -1)
        frames = self._run(lambda run: decode_latent(samples, request, run), "decode")
        if samples.ndim == 5:  # the frames of each video, as VAE.decode gives them
            return frames.reshape(samples.shape[0], -1, *frames.shape[1:])
        return frames

    def _encode(self, pixels: torch.Tensor, tile_size: int | None) -> torch.Tensor:
        request = self._with_tiles(tile_size)
        if self.latent_dim == 1:
            audio = self.vae_encode_crop_pixels(pixels).movedim(-1, 1)
            return self._run(lambda run: encode_audio(audio, request, run), "encode")
        if pixels.ndim == 5:  # several videos
            return torch.cat([self._encode(video, tile_size) for video in pixels])
        return self._run(lambda run: encode_image(pixels, request, run), "encode")

    def _with_tiles(self, tile_size: int | None) -> NodeRequest:
        return replace(self.request, tile_size=tile_size)

    def _run(self, remote: Callable[[RunOptions], Outcome], what: str) -> torch.Tensor:
        """One call, reported on the node that made it (its progress bar, transfer event, Cancel)."""
        node_id = comfy_runtime.executing_node()
        return run_node(node_id, lambda: remote(RunOptions(node_id=node_id)), None, what)


def _check_transfer(transfer: str) -> None:
    if transfer not in TRANSFER_LOADER:
        raise NodeInputError(f"transfer {transfer!r} is not one of {', '.join(TRANSFER_LOADER)}")


def _tile(side: int) -> int:
    """A tile side the protocol accepts (docs/protocol.md, "Extensions")."""
    return max(MIN_TILE_SIZE, min(MAX_TILE_SIZE, int(side)))
