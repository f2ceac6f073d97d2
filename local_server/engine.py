"""The inference engine: hosted models, lazy loading, and one worker thread per device.

Decode and encode are plain functions on tensors (`decode_latents`, `encode_pixels`); `ModelHost`
only decides where and when they run: on a single-thread executor per device (so one device runs
one job at a time and the event loop stays free to answer `/health`), with CPU-side conversions on
a separate small pool. Batching, tiling, queue limits and metrics slot in around these functions.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from ..remote.presets import Preset, PresetError, check_latent
from ..remote.protocol import Scaling

log = logging.getLogger("remote_vae.server")

T = TypeVar("T")

NOT_LOADED, LOADING, LOADED, FAILED = "not loaded", "loading", "loaded", "failed"
IN_PROCESS = "(model built in-process)"


class LoadFn(Protocol):
    def __call__(self, preset: Preset, source: str | None, *, device: torch.device, dtype: torch.dtype) -> torch.nn.Module: ...


class UnknownModel(LookupError):
    """A request named a model this server does not host (HTTP 404)."""


class ModelUnavailable(RuntimeError):
    """A hosted model that could not be loaded (HTTP 503); the message carries the loader's reason."""


def load_from_source(preset: Preset, source: str | None, *, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The default loader: `loading.load_vae`, imported only when a model is first needed."""
    from .loading import load_vae

    return load_vae(preset, source, device=device, dtype=dtype)


# --------------------------------------------------------------------------- devices and dtypes


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """`auto`/None: CUDA when available, else CPU; anything else as torch spells it (`cuda:1`)."""
    if spec is None or str(spec) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def resolve_dtype(spec: str | torch.dtype | None, preset: Preset, device: torch.device) -> torch.dtype:
    """`auto`/None: the preset's first safe dtype on CUDA, float32 on CPU (half precision is slow there)."""
    if isinstance(spec, torch.dtype):
        return spec
    if spec is None or spec == "auto":
        name = preset.safe_dtypes[0] if device.type == "cuda" else "float32"
    else:
        name = spec
    dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    if name not in dtypes:
        raise ValueError(f"dtype {name!r} is not one of auto, {', '.join(dtypes)}")
    return dtypes[name]


# --------------------------------------------------------------------------- latents and scaling


def unpack_latents(latent: torch.Tensor, height: int, width: int, spatial: int) -> torch.Tensor:
    """Flux-style packed [B, N, C*4] -> [B, C, h, w], exactly as diffusers' `_unpack_latents`."""
    batch, tokens, features = latent.shape
    h, w = 2 * (height // (spatial * 2)), 2 * (width // (spatial * 2))
    if features % 4 or h == 0 or w == 0 or tokens != (h // 2) * (w // 2):
        raise PresetError(
            f"packed latent of shape {list(latent.shape)} does not fit height={height} width={width}: "
            f"that size packs into {(h // 2) * (w // 2)} tokens of 4*C features"
        )
    channels = features // 4
    x = latent.view(batch, h // 2, w // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(batch, channels, h, w)


def prepare_latent(preset: Preset, latent: torch.Tensor, height: int | None, width: int | None) -> torch.Tensor:
    """Validate a latent against `preset` and unpack 3-D packed latents (image models only)."""
    if latent.ndim == 3 and not preset.is_video:
        if height is None or width is None:  # protocol.parse_decode_request already insists; kept for direct callers
            raise PresetError("packed (3-D) latents need `height` and `width`")
        latent = unpack_latents(latent, height, width, preset.spatial_compression)
    check_latent(preset, latent.shape)
    return latent


def model_factors(model: torch.nn.Module, preset: Preset) -> tuple[float, float | None]:
    """The model's own scaling/shift (its diffusers config), falling back to the preset's values."""
    config = getattr(model, "config", None) or {}
    scale = config.get("scaling_factor") if hasattr(config, "get") else None
    shift = config.get("shift_factor") if hasattr(config, "get") else None
    return (preset.scaling_factor if scale is None else float(scale)), (preset.shift_factor if shift is None else shift)


def to_vae_space(latent: torch.Tensor, scaling: Scaling, model: torch.nn.Module, preset: Preset) -> torch.Tensor:
    """Undo the diffusion-space scaling before decoding (hf-protocol.md 4.1); float32 for accuracy.

    Factor parameters win; `do_scaling=True` alone uses the model's config (per-channel mean/std for
    Wan-style presets); nothing sent means the latent is already raw.
    """
    z = latent.float()
    if scaling.use_model_defaults:
        if preset.uses_mean_std:
            return preset.to_raw(z)
        scale, shift = model_factors(model, preset)
        shift = scaling.shift_factor if scaling.shift_factor is not None else shift
        return z / scale + (shift or 0.0)
    if scaling.scaling_factor is not None:
        z = z / scaling.scaling_factor
    if scaling.shift_factor is not None:
        z = z + scaling.shift_factor
    return z


def from_vae_space(z: torch.Tensor, scaling: Scaling, model: torch.nn.Module, preset: Preset) -> torch.Tensor:
    """The inverse of `to_vae_space`, for encode: `(z - shift) * scale` when asked for."""
    z = z.float()
    if scaling.use_model_defaults:
        if preset.uses_mean_std:
            return preset.from_raw(z)
        scale, shift = model_factors(model, preset)
        shift = scaling.shift_factor if scaling.shift_factor is not None else shift
        return (z - (shift or 0.0)) * scale
    if scaling.shift_factor is not None:
        z = z - scaling.shift_factor
    if scaling.scaling_factor is not None:
        z = z * scaling.scaling_factor
    return z


# --------------------------------------------------------------------------- the work itself


def decode_latents(model: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Raw decoder output: [B,3,H,W] in about [-1,1], or [B,3,F,H,W] for video models."""
    return model.decode(z).sample


def encode_pixels(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The posterior mode (deterministic, like ComfyUI's VAEEncode) of pixels in [-1,1]."""
    return model.encode(x).latent_dist.mode()


def warn_if_not_finite(name: str, op: str, x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        log.warning("%s %s produced NaN/Inf values (dtype %s); try --dtype float32", name, op, x.dtype)


# --------------------------------------------------------------------------- hosted models


@dataclass
class HostedModel:
    name: str
    preset: Preset
    source: str | None
    device: torch.device
    dtype: torch.dtype
    model: torch.nn.Module | None = None
    state: str = NOT_LOADED
    error: str | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "preset": self.preset.describe(),
            "source": self.source or self.preset.checkpoint,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "state": self.state,
            "error": self.error,
        }


class ModelHost:
    """The models a server hosts and the threads that run them.

    Models are either handed in built (`add(..., model=vae)`) or loaded from `source` by `loader` on
    first use (or by `preload()`). Each device gets one worker thread; CPU conversions run on a
    separate pool of `cpu_threads`.
    """

    def __init__(self, *, loader: LoadFn = load_from_source, cpu_threads: int = 2, load_hint: str | None = None) -> None:
        self._loader = loader
        self._load_hint = load_hint  # appended to load failures; may use {name} and {spec} (name or alias:preset)
        self._models: dict[str, HostedModel] = {}
        self._workers: dict[str, ThreadPoolExecutor] = {}
        self._cpu = ThreadPoolExecutor(max_workers=cpu_threads, thread_name_prefix="remote-vae-cpu")
        self._lock = threading.Lock()

    def add(
        self,
        name: str,
        preset: Preset,
        *,
        source: str | None = None,
        model: torch.nn.Module | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> HostedModel:
        if name in self._models:
            raise ValueError(f"model name {name!r} is used twice")
        dev = resolve_device(device)
        hosted = HostedModel(name, preset, source, dev, resolve_dtype(dtype, preset, dev))
        if model is not None:
            hosted.model = _placed(model, dev, hosted.dtype).eval().requires_grad_(False)
            hosted.state, hosted.source = LOADED, source or IN_PROCESS
        self._models[name] = hosted
        if str(dev) not in self._workers:
            self._workers[str(dev)] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"remote-vae-{dev}")
        return hosted

    @property
    def names(self) -> list[str]:
        return list(self._models)

    @property
    def default_name(self) -> str:
        if not self._models:
            raise UnknownModel("this server hosts no models")
        return next(iter(self._models))

    def get(self, name: str) -> HostedModel:
        try:
            return self._models[name]
        except KeyError:
            hosted = ", ".join(f"/{n}" for n in self._models)
            raise UnknownModel(f"model {name!r} is not hosted here; hosted models: {hosted}") from None

    def models(self) -> list[HostedModel]:
        return list(self._models.values())

    # ---------------------------------------------------------------- running jobs

    async def decode(self, name: str, latent: torch.Tensor, scaling: Scaling, out_dtype: torch.dtype) -> torch.Tensor:
        """Decode a validated latent on the model's device worker; the result is on the CPU in `out_dtype`."""
        hosted = self.get(name)
        return await self._on_device(hosted, self._decode_job, hosted, latent, scaling, out_dtype)

    async def encode(self, name: str, pixels: torch.Tensor, scaling: Scaling, out_dtype: torch.dtype) -> torch.Tensor:
        """Encode pixels in [-1,1] (NCHW, or [B,3,F,H,W] for video models) to latents on the CPU."""
        hosted = self.get(name)
        return await self._on_device(hosted, self._encode_job, hosted, pixels, scaling, out_dtype)

    async def run_cpu(self, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU-bound conversions (image/video encoding, uint8) off the loop and off the device workers."""
        return await asyncio.get_running_loop().run_in_executor(self._cpu, fn, *args)

    async def _on_device(self, hosted: HostedModel, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._workers[str(hosted.device)], fn, *args)

    def _decode_job(self, hosted: HostedModel, latent: torch.Tensor, scaling: Scaling, out_dtype: torch.dtype) -> torch.Tensor:
        model = self._ensure_loaded(hosted)
        with torch.inference_mode():
            z = to_vae_space(latent.to(hosted.device), scaling, model, hosted.preset).to(hosted.dtype)
            x = decode_latents(model, z)
            warn_if_not_finite(hosted.name, "decode", x)
            return x.to(dtype=out_dtype).cpu()

    def _encode_job(self, hosted: HostedModel, pixels: torch.Tensor, scaling: Scaling, out_dtype: torch.dtype) -> torch.Tensor:
        model = self._ensure_loaded(hosted)
        with torch.inference_mode():
            z = encode_pixels(model, pixels.to(device=hosted.device, dtype=hosted.dtype))
            warn_if_not_finite(hosted.name, "encode", z)
            return from_vae_space(z, scaling, model, hosted.preset).to(dtype=out_dtype).cpu()

    # ---------------------------------------------------------------- loading

    def _ensure_loaded(self, hosted: HostedModel) -> torch.nn.Module:
        """Load on the device worker, so loads never race with each other or with that device's jobs.

        A failed load is retried by the next request (the file may have appeared meanwhile).
        """
        if hosted.model is not None:
            return hosted.model
        source = hosted.source or hosted.preset.checkpoint
        with self._lock:
            hosted.state, hosted.error = LOADING, None
        log.info("loading model %s (preset %s) from %s", hosted.name, hosted.preset.name, source)
        try:
            model = self._loader(hosted.preset, hosted.source, device=hosted.device, dtype=hosted.dtype)
        except Exception as exc:
            message = f"model {hosted.name!r} could not be loaded from {source}: {exc}"
            if self._load_hint and "--model" not in message:  # loading.py's errors bring their own hint
                spec = hosted.name if hosted.name == hosted.preset.name else f"{hosted.name}:{hosted.preset.name}"
                message += "; " + self._load_hint.format(name=hosted.name, spec=spec)
            log.error("%s", message, exc_info=not _is_load_error(exc))
            with self._lock:
                hosted.state, hosted.error = FAILED, message
            raise ModelUnavailable(message) from exc
        hosted.model = model.eval().requires_grad_(False)
        with self._lock:
            hosted.state = LOADED
        log.info("model %s loaded on %s as %s", hosted.name, hosted.device, hosted.dtype)
        return hosted.model

    def preload(self) -> None:
        """Load every model now (each on its device worker); failures are logged, not raised."""
        futures = [self._workers[str(h.device)].submit(self._ensure_loaded, h) for h in self._models.values()]
        for future in futures:
            try:
                future.result()
            except ModelUnavailable:
                pass  # already logged; requests will answer 503 with the reason

    def close(self) -> None:
        for worker in self._workers.values():
            worker.shutdown(wait=True, cancel_futures=True)
        self._cpu.shutdown(wait=True, cancel_futures=True)


def _placed(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move a handed-in model; cast only when needed (diffusers warns about every dtype cast)."""
    param = next(model.parameters(), None)
    if param is not None and param.dtype == dtype:
        return model.to(device=device)
    return model.to(device=device, dtype=dtype)


def _is_load_error(exc: Exception) -> bool:
    """The loader's own, expected failures (`ModelLoadError`) need no traceback in the log."""
    return type(exc).__name__ == "ModelLoadError"
