"""The comfy backend: single-file VAEs loaded and run by ComfyUI's own `comfy.sd.VAE`.

Every architecture the named ComfyUI version detects is served, with its own geometry, memory estimates
and tiled decode/encode. ComfyUI's VAE works on IMAGE tensors ([B,H,W,C] in 0..1, `process_input` /
`process_output`); the runner hands pixels NCHW in [-1,1] and raw latents. For the usual mapping
(`clamp((y + 1) / 2)`) the model's own output is our wire's raw decoder output as it is, so a client that
applies that mapping gets exactly ComfyUI's VAE.decode; other mappings (tiny decoders that output 0..1)
are converted. Audio is handed on as ComfyUI gives it. Device and dtype are ComfyUI's choices for the
architecture (its `vae_device`/`vae_dtype`) unless `--device`/`--dtype` say otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from ...remote.presets import Preset
from ...remote.protocol import Reference
from ..comfyui_import import ComfyUI
from ..errors import CannotEncode, ModelLoadError, first_line
from ..latents import Factors
from .base import BackendName, Geometry, Placement, Shape

log = logging.getLogger("remote_vae.server")

SAFE_SUFFIXES = (".safetensors", ".sft")  # ComfyUI would torch.load the others: pickles (docs/protocol.md)
DEFAULT_SAMPLE_RATE = 44100  # ComfyUI versions whose VAE has no `audio_sample_rate` hard-code this rate
# ComfyUI's list of loaded models is not thread-safe, and each device has its own worker thread.
_model_management_lock = threading.Lock()


def geometry_of(vae: Any) -> Geometry:
    """The shapes of a `comfy.sd.VAE`, from the attributes ComfyUI's nodes read."""
    latent_dim = vae.latent_dim
    audio = latent_dim == 1 or getattr(vae, "extra_1d_channel", None) is not None
    spatial = vae.spacial_compression_decode()
    if spatial != int(spatial):
        raise ModelLoadError(f"a VAE with a non-integer compression ({spatial}) cannot be served")
    return Geometry(
        latent_channels=vae.latent_channels,
        video=latent_dim == 3,
        spatial_compression=int(spatial),
        temporal_compression=vae.temporal_compression_decode() or 1,
        output_channels=vae.output_channels,
        audio=audio,
        sample_rate=int(getattr(vae, "audio_sample_rate", DEFAULT_SAMPLE_RATE)) if audio else None,
        still_image=latent_dim == 3 and bool(getattr(vae, "not_video", False)),
    )


@dataclass(frozen=True)
class Boundary:
    """How one VAE's tensors meet our wire: pixels NCHW in [-1,1] (audio as it is), raw latents."""

    audio: bool
    usual_output: bool  # process_output is clamp((y + 1) / 2): the model's output is our raw output
    usual_input: bool  # process_input is x * 2 - 1: our [-1,1] pixels are the model's input
    can_encode: bool

    @classmethod
    def of(cls, vae: Any, geometry: Geometry) -> Boundary:
        probe = torch.linspace(-2.0, 2.0, 9)
        usual_output = torch.equal(
            vae.process_output(probe.clone()), torch.clamp((probe + 1.0) / 2.0, min=0.0, max=1.0)
        )
        try:
            usual_input, can_encode = torch.equal(vae.process_input(probe.clone()), probe * 2.0 - 1.0), True
        except NotImplementedError:  # decoders without an encoder say so here
            usual_input, can_encode = False, False
        return cls(geometry.audio, usual_output, usual_input, can_encode)

    def decoded(self, y: torch.Tensor, process_output: Any) -> torch.Tensor:
        """The model's output -> our raw decoder output."""
        if self.audio:
            return process_output(y)
        return y if self.usual_output else process_output(y.float()) * 2.0 - 1.0

    def model_input(self, x: torch.Tensor, process_input: Any) -> torch.Tensor:
        """Our pixels in [-1,1] (audio as it is) -> the model's input, laid out as ComfyUI's encode hands it
        over: a channels-last IMAGE viewed channels-first (convolutions may round differently on that layout)."""
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
        if self.audio:
            return process_input(x)
        return x if self.usual_input else process_input((x + 1.0) / 2.0)

    def from_comfy(self, out: torch.Tensor) -> torch.Tensor:
        """ComfyUI's IMAGE/audio (channels last, after process_output) -> our raw decoder output."""
        out = out.movedim(-1, 1)
        return out if self.audio else out * 2.0 - 1.0

    def to_comfy(self, x: torch.Tensor, geometry: Geometry) -> list[torch.Tensor]:
        """Our pixels -> the IMAGE/audio tensors ComfyUI's encode takes: one per video, else one for all."""
        if self.audio:
            return [x.movedim(1, -1)]
        unit = (x + 1.0) / 2.0
        if geometry.video and not geometry.still_image:  # ComfyUI encodes an IMAGE [F,H,W,3] as one video
            return [video.movedim(0, -1) for video in unit]
        if geometry.still_image:
            unit = unit[:, :, 0]
        return [unit.movedim(1, -1)]


def read_state_dict(
    comfy: ComfyUI, path: str | Path
) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """The file's tensors and metadata, read by ComfyUI's own loader (safetensors only)."""
    check_file(path)
    try:
        return comfy.utils.load_torch_file(str(path), return_metadata=True)
    except Exception as exc:
        raise ModelLoadError(f"{path} could not be read: {first_line(exc)}") from exc


def check_file(path: str | Path) -> None:
    path = Path(path)
    if path.suffix.lower() not in SAFE_SUFFIXES:
        raise ModelLoadError(
            f"{path} is not a .safetensors file: only safetensors are served (.ckpt/.pt/.bin files are pickles, "
            "which can run code when loaded); convert it to safetensors",
            has_hint=True,
        )
    if not path.is_file():
        raise ModelLoadError(f"no such file: {path}", has_hint=True)


def build_vae(
    comfy: ComfyUI,
    state_dict: dict[str, torch.Tensor],
    metadata: dict[str, str] | None,
    source: str,
    **options: Any,
) -> Any:
    """`comfy.sd.VAE(sd=..., metadata=...)` as ComfyUI's VAELoader builds it; a clear error when no
    architecture of this ComfyUI version matches the file."""
    try:
        vae = comfy.sd.VAE(sd=state_dict, metadata=metadata, **options)
    except Exception as exc:
        raise ModelLoadError(
            f"{comfy.describe()} could not load {source} as a VAE: {first_line(exc)}", has_hint=True
        ) from exc
    if vae.first_stage_model is None:
        keys = ", ".join(sorted(state_dict)[:3]) or "none"
        raise UnknownArchitecture(
            f"{comfy.describe()} does not recognise {source} as a VAE: none of its VAE architectures matches the "
            f"file's tensor names (first of {len(state_dict)}: {keys}); is it a VAE, and does this ComfyUI version know it?",
            has_hint=True,
        )
    return vae


class UnknownArchitecture(ModelLoadError):
    """No VAE architecture of this ComfyUI version matches the file's tensor names."""


@dataclass(frozen=True)
class ComfyLoader:
    """Makes `ComfyBackend`s from single files. `dtype`: None follows ComfyUI's choice for each VAE
    (`--dtype auto`); a dtype overrides it. The placement's dtype is a guess made before loading."""

    name: ClassVar[BackendName] = "comfy"
    comfy: ComfyUI
    dtype: torch.dtype | None = None

    def load(self, preset: Preset, source: str | None, placement: Placement) -> ComfyBackend:
        if source is None:
            raise ModelLoadError(f"model {preset.name} names no VAE file", has_hint=True)
        state_dict, metadata = read_state_dict(self.comfy, source)
        vae = build_vae(self.comfy, state_dict, metadata, source, device=placement.device, dtype=self.dtype)
        return ComfyBackend(self.comfy, vae, preset, placement)

    def wrap(self, model: Any, preset: Preset, placement: Placement) -> ComfyBackend:
        """A `comfy.sd.VAE` built in-process (it keeps its own device and dtype)."""
        return ComfyBackend(self.comfy, model, preset, placement)

    def check(self, preset: Preset, source: str | None) -> None:
        if source is None:
            raise ModelLoadError(f"model {preset.name} names no VAE file", has_hint=True)
        check_file(source)


class ComfyBackend:
    """One `comfy.sd.VAE`: its first-stage model runs our jobs; ComfyUI's model management keeps it on
    its device; ComfyUI's tiled decode/encode is the tiled path."""

    def __init__(self, comfy: ComfyUI, vae: Any, preset: Preset, placement: Placement) -> None:
        self.comfy = comfy
        self.vae = vae
        self.preset = preset
        self.placement = replace(placement, device=torch.device(vae.device), dtype=vae.vae_dtype)
        self.geometry = geometry_of(vae)
        self.boundary = Boundary.of(vae, self.geometry)
        self._load(0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """As ComfyUI's VAE.decode, before its process_output."""
        vae = self.vae
        self._load(vae.memory_used_decode(z.shape, vae.vae_dtype))
        y = vae.first_stage_model.decode(z.to(vae.vae_dtype).to(vae.device))
        return self.boundary.decoded(y, vae.process_output)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """As ComfyUI's VAE.encode, after its crop and layout change (done by the server already)."""
        vae = self._encoder()
        self._load(vae.memory_used_encode(x.shape, vae.vae_dtype))
        pixels = self.boundary.model_input(x, vae.process_input)
        return vae.first_stage_model.encode(pixels.to(vae.vae_dtype).to(vae.device))

    def decode_bytes(self, shape: Shape, dtype: torch.dtype) -> int:
        return int(self.vae.memory_used_decode((1, *shape[1:]), dtype))

    def encode_bytes(self, shape: Shape, dtype: torch.dtype) -> int:
        return int(self.vae.memory_used_encode((1, *shape[1:]), dtype))

    def decode_tiled(self, z: torch.Tensor, tile_pixels: int) -> torch.Tensor:
        """ComfyUI's VAE.decode_tiled, tiles of about `tile_pixels` a side overlapping by a quarter (the
        proportions of ComfyUI's own fallback after out-of-memory)."""
        tile = max(2, tile_pixels // self.geometry.spatial_compression)
        with _model_management_lock:
            out = self.vae.decode_tiled(z, tile_x=tile, tile_y=tile, overlap=tile // 4)
        return self.boundary.from_comfy(out.to(z.device))

    def encode_tiled(self, x: torch.Tensor, tile_pixels: int) -> torch.Tensor:
        """ComfyUI's VAE.encode_tiled at `tile_pixels` a side (overlap: ComfyUI's defaults' share)."""
        vae = self._encoder()
        overlap = tile_pixels // 4 if self.geometry.video else tile_pixels // 8
        with _model_management_lock:
            latents = [
                vae.encode_tiled(image, tile_x=tile_pixels, tile_y=tile_pixels, overlap=overlap)
                for image in self.boundary.to_comfy(x, self.geometry)
            ]
        return torch.cat(latents).to(x.device)

    def factors(self) -> Factors:
        return Factors(self.preset.scaling_factor, self.preset.shift_factor)

    def behaving_like(self, reference: Reference) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # ComfyUI's own code: it behaves like ComfyUI whatever is asked

    @contextlib.contextmanager
    def in_float32(self) -> Iterator[None]:
        vae, dtype = self.vae, self.vae.vae_dtype
        vae.first_stage_model.to(torch.float32)
        vae.vae_dtype = torch.float32
        try:
            yield
        finally:
            vae.first_stage_model.to(dtype)
            vae.vae_dtype = dtype

    def _encoder(self) -> Any:
        if not self.boundary.can_encode:
            raise CannotEncode(f"model {self.preset.name} is a decoder only: ComfyUI cannot encode with it")
        return self.vae

    def _load(self, memory_required: float) -> None:
        """ComfyUI's model management puts the weights on the device (a no-op while they are there)."""
        patcher, full = self.vae.patcher, self.vae.disable_offload
        with _model_management_lock:
            self.comfy.model_management.load_models_gpu(
                [patcher], memory_required=memory_required, force_full_load=full
            )
