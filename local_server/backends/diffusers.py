"""The diffusers backend: HF-style VAE classes (AutoencoderKL, AutoencoderKLWan, ...), loaded by `loading.py`.

Any module with diffusers' `decode(z).sample` / `encode(x).latent_dist` interface works when handed in
built; its `config` (if any) supplies the scaling factors.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from ...remote.presets import Preset
from ...remote.protocol import Reference
from .. import accel, memory, parity
from ..latents import Factors
from .base import BackendName, Geometry, Placement, Shape

log = logging.getLogger("remote_vae.server")


class ReadFn(Protocol):
    def __call__(
        self, preset: Preset, source: str | None, *, device: torch.device, dtype: torch.dtype
    ) -> torch.nn.Module: ...


def read_vae(
    preset: Preset, source: str | None, *, device: torch.device, dtype: torch.dtype
) -> torch.nn.Module:
    """`loading.load_vae`, imported only when a model is first needed."""
    from ..loading import load_vae

    return load_vae(preset, source, device=device, dtype=dtype)


@dataclass(frozen=True)
class DiffusersLoader:
    """Makes `DiffusersBackend`s; `read` builds the module (default: `loading.load_vae`)."""

    name: ClassVar[BackendName] = "diffusers"
    read: ReadFn = read_vae

    def load(self, preset: Preset, source: str | None, placement: Placement) -> DiffusersBackend:
        model = self.read(preset, source, device=placement.device, dtype=placement.dtype)
        backend = DiffusersBackend(model, preset, placement)
        if placement.accel.compile:
            backend.warm_up()
        return backend

    def wrap(self, model: torch.nn.Module, preset: Preset, placement: Placement) -> DiffusersBackend:
        return DiffusersBackend(_placed(model, placement.device, placement.dtype), preset, placement)

    def check(self, preset: Preset, source: str | None) -> None:
        from ..loading import resolve_source

        resolve_source(preset, source)  # names a hub repo, or a folder or file that exists


class DiffusersBackend:
    """A diffusers VAE module in eval mode without gradients, with the chosen speed-ups applied."""

    def __init__(self, model: torch.nn.Module, preset: Preset, placement: Placement) -> None:
        model = model.train(False).requires_grad_(False)
        self.model = accel.apply(model, placement.device, placement.accel, video=preset.is_video)
        self.preset = preset
        self.placement = placement
        self.geometry = Geometry.of(preset)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(accel.input_layout(z, self.placement.accel)).sample

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(accel.input_layout(x, self.placement.accel)).latent_dist.mode()

    def decode_bytes(self, shape: Shape, dtype: torch.dtype) -> int:
        return memory.decode_bytes(self.preset, shape, dtype)

    def encode_bytes(self, shape: Shape, dtype: torch.dtype) -> int:
        return memory.encode_bytes(self.preset, shape, dtype)

    def decode_tiled(self, z: torch.Tensor, tile_pixels: int) -> torch.Tensor | None:
        return self._builtin_tiled(self.decode, z, tile_pixels)

    def encode_tiled(self, x: torch.Tensor, tile_pixels: int) -> torch.Tensor | None:
        return self._builtin_tiled(self.encode, x, tile_pixels)

    def factors(self) -> Factors:
        return model_factors(self.model, self.preset)

    def behaving_like(self, reference: Reference) -> contextlib.AbstractContextManager[None]:
        return parity.behaving_like(self.model, reference)

    @contextlib.contextmanager
    def in_float32(self) -> Iterator[None]:
        self.model.to(torch.float32)
        try:
            yield
        finally:
            self.model.to(self.placement.dtype)

    def warm_up(self) -> None:
        """Compile now, on a small latent, rather than in the first user's request."""
        started = time.perf_counter()
        frames = (2,) if self.geometry.video else ()
        z = torch.zeros(
            1,
            self.geometry.latent_channels,
            *frames,
            32,
            32,
            device=self.placement.device,
            dtype=self.placement.dtype,
        )
        with torch.inference_mode():
            self.decode(z)
        log.info("%s warmed up (compiled) in %.1f s", self.preset.name, time.perf_counter() - started)

    def _builtin_tiled(
        self, run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile_pixels: int
    ) -> torch.Tensor | None:
        """Temporal + spatial tiling of causal video VAEs is diffusers' own: on for this call, at
        `tile_pixels` per side where settable. Image models have none (the runner tiles them)."""
        if not self.geometry.video:
            return None
        if not hasattr(self.model, "enable_tiling"):
            return run(x)
        stride = max(8, tile_pixels * 3 // 4)  # a quarter of each tile overlaps its neighbour
        try:
            self.model.enable_tiling(
                tile_sample_min_height=tile_pixels,
                tile_sample_min_width=tile_pixels,
                tile_sample_stride_height=stride,
                tile_sample_stride_width=stride,
            )
        except TypeError:  # an older signature without sizes
            self.model.enable_tiling()
        try:
            return run(x)
        finally:
            self.model.disable_tiling()


def model_factors(model: torch.nn.Module, preset: Preset) -> Factors:
    """The model's own scaling/shift (its diffusers config), falling back to the preset's values."""
    config = getattr(model, "config", None) or {}
    scale = config.get("scaling_factor") if hasattr(config, "get") else None
    shift = config.get("shift_factor") if hasattr(config, "get") else None
    return Factors(
        preset.scaling_factor if scale is None else float(scale),
        preset.shift_factor if shift is None else shift,
    )


def _placed(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move a handed-in model; cast only when needed (diffusers warns about every dtype cast)."""
    param = next(model.parameters(), None)
    if param is not None and param.dtype == dtype:
        return model.to(device=device)
    return model.to(device=device, dtype=dtype)
