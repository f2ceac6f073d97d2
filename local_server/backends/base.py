"""The seam between the job runner and a model implementation.

A `BackendLoader` makes `Backend`s, from a source (hub id, folder or file) or from a model built
in-process. A `Backend` is one loaded model on its device: its geometry, decode and encode of device
tensors, memory estimates, and its own tiled path where it has one. The runner knows nothing else of
the model: batching, planning, out-of-memory and NaN fallbacks, scaling and timing are its own.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import torch

from ...remote.presets import Preset
from ...remote.protocol import Reference
from ..accel import Accel
from ..latents import Factors

BackendName = Literal["diffusers", "comfy"]
Dims = Literal["image", "video", "audio"]


@dataclass(frozen=True)
class Geometry:
    """The shapes a model works in: latent channels, 2-D or 3-D (video), compression, output channels."""

    latent_channels: int
    video: bool  # latents [B,C,T,H,W] and pixels [B,3,F,H,W]
    spatial_compression: int  # pixels per latent pixel, per side (audio: samples per latent step)
    temporal_compression: int  # frames per latent frame (1 for images)
    output_channels: int = 3  # colour channels, or audio channels
    audio: bool = False  # latents [B,C,L] (ComfyUI's latent_dim 1) decoding to audio [B,channels,samples]
    sample_rate: int | None = None  # of audio models
    still_image: bool = False  # video-shaped latents of one frame, each one image

    @classmethod
    def of(cls, preset: Preset) -> Geometry:
        return cls(
            preset.latent_channels,
            preset.is_video,
            preset.spatial_compression,
            preset.temporal_compression,
            still_image=preset.still_image,
        )

    @property
    def dims(self) -> Dims:
        return "audio" if self.audio else "video" if self.video else "image"

    def describe(self) -> dict[str, Any]:
        """What a client needs to shape latents and read outputs without guessing (for /v1/models)."""
        return {
            "dims": self.dims,
            "latent_channels": self.latent_channels,
            "spatial_compression": self.spatial_compression,
            "temporal_compression": self.temporal_compression,
            "output_channels": self.output_channels,
            "sample_rate": self.sample_rate,
            "still_image": self.still_image,
        }


@dataclass(frozen=True)
class Placement:
    """Where and how a model runs: its device, its dtype and the speed-ups applied to it."""

    device: torch.device
    dtype: torch.dtype
    accel: Accel = field(default_factory=Accel)


Shape = tuple[int, ...]


class Backend(Protocol):
    """One loaded model. Tensors come and go on its device; latents are in raw VAE space."""

    geometry: Geometry
    placement: (
        Placement  # as loaded: a backend may settle the dtype itself (the comfy backend: ComfyUI's choice)
    )

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw decoder output: [B,3,H,W] in about [-1,1], or [B,3,F,H,W] for video models."""
        ...

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior mode (deterministic, like ComfyUI's VAEEncode) of pixels in [-1,1]."""
        ...

    def decode_bytes(self, shape: Shape, dtype: torch.dtype) -> int:
        """Estimated peak bytes to decode ONE batch item of a latent of `shape`."""
        ...

    def encode_bytes(self, shape: Shape, dtype: torch.dtype) -> int:
        """Estimated peak bytes to encode ONE batch item of pixels of `shape`."""
        ...

    def decode_tiled(self, z: torch.Tensor, tile_pixels: int) -> torch.Tensor | None:
        """The model's own tiled decode at about `tile_pixels` image pixels a side; None where it has
        none (the runner then tiles spatially around `decode`)."""
        ...

    def encode_tiled(self, x: torch.Tensor, tile_pixels: int) -> torch.Tensor | None:
        """As `decode_tiled`, for encode."""
        ...

    def factors(self) -> Factors:
        """The model's own scaling and shift factors (for `do_scaling` without factors)."""
        ...

    def behaving_like(self, reference: Reference) -> AbstractContextManager[None]:
        """Within the block the model matches `reference`'s implementation where they differ (parity.py)."""
        ...

    def in_float32(self) -> AbstractContextManager[None]:
        """Within the block the model computes in float32 (the retry after NaN/Inf in half precision)."""
        ...


class BackendLoader(Protocol):
    """Makes backends of one implementation."""

    name: ClassVar[BackendName]

    def load(self, preset: Preset, source: str | None, placement: Placement) -> Backend:
        """The model for `preset` from `source` (None: the preset's checkpoint); raises ModelLoadError."""
        ...

    def wrap(self, model: Any, preset: Preset, placement: Placement) -> Backend:
        """A model built in-process, moved to `placement`."""
        ...

    def check(self, preset: Preset, source: str | None) -> None:
        """Raise ModelLoadError when `source` cannot be loaded, without reading any weights (for /ready)."""
        ...
