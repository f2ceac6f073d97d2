"""The inference engine: hosted models, lazy loading, and one worker thread per device.

Decode and encode are plain functions on tensors (`decode_latents`, `encode_pixels`); `ModelHost`
only decides where and when they run: on a single-thread executor per device (so one device runs
one job at a time and the event loop stays free to answer `/health`), with CPU-side conversions on
a separate small pool. Batching, tiling, memory planning and fallbacks wrap these functions.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from ..remote.presets import Preset, PresetError, check_latent
from ..remote.protocol import Extensions, Reference, Scaling, TileMode
from . import accel, memory, parity
from .accel import Accel
from .batcher import Batcher, decode_activation_elements
from .tiling import run_tiled

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


class OutOfMemory(RuntimeError):
    """Even the smallest plan (one item, smallest tile) ran out of device memory (HTTP 507)."""


@dataclass(frozen=True)
class EngineOptions:
    """How jobs run. Batching is on by default, on the CPU too: with 2 to 8 concurrent clients it
    raised throughput 1.4-3.1x over one client on a 2-core CPU (without it: 1.1-1.3x), for ~12% more
    latency with one client alone (bench/load.py, bench/RESULTS.md). `batching=None`: CUDA only."""

    batching: bool | None = True
    batch_window: float = 0.01  # seconds a request waits for others to join its batch
    batch_max_items: int = 8
    memory_budget: int | None = None  # bytes one job may use; None: the device's free memory
    accel: Accel = field(default_factory=Accel)


@dataclass(frozen=True)
class JobOptions:
    """Our optional request parameters that change how a job runs (see each field)."""

    mode: TileMode = "auto"
    size: int | None = None  # tile_size in latent pixels
    reference: Reference = "diffusers"  # whose implementation to match where they differ (parity.py)

    @classmethod
    def from_extensions(cls, extensions: Extensions) -> JobOptions:
        return cls(extensions.tile, extensions.tile_size, extensions.reference)


@dataclass
class JobStats:
    """What happened to one job, for the request log and /metrics."""

    queue: float = 0.0  # seconds waiting for the device worker
    compute: float = 0.0  # seconds on the device
    batch: int = 1  # items in the batch the job ran in
    tiled: bool = False
    fallbacks: list[str] = field(default_factory=list)  # "oom", "nan"


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

    def __init__(
        self,
        *,
        loader: LoadFn = load_from_source,
        cpu_threads: int = 2,
        load_hint: str | None = None,
        options: EngineOptions | None = None,
    ) -> None:
        self._loader = loader
        self.options = options or EngineOptions()
        self._batchers: dict[str, Batcher] = {}  # one per hosted model
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
            model = _placed(model, dev, hosted.dtype).train(False).requires_grad_(False)
            hosted.model = accel.apply(model, dev, self.options.accel, video=preset.is_video)
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

    async def decode(
        self,
        name: str,
        latent: torch.Tensor,
        scaling: Scaling,
        out_dtype: torch.dtype,
        job: JobOptions = JobOptions(),
    ) -> tuple[torch.Tensor, JobStats]:
        """Decode a validated latent on the model's device worker; the result is on the CPU in `out_dtype`.

        Same-shape requests that arrive together are batched when batching is on (never tiled ones).
        """
        hosted = self.get(name)
        if self._batching(hosted) and job.mode != "on":
            key = (name, tuple(latent.shape[1:]), latent.dtype, _scaling_key(scaling), out_dtype, job)
            return await self._batcher_for(hosted).submit(key, latent)
        return await self._on_device(hosted, self._decode_job, hosted, latent, scaling, out_dtype, job)

    async def encode(
        self,
        name: str,
        pixels: torch.Tensor,
        scaling: Scaling,
        out_dtype: torch.dtype,
        job: JobOptions = JobOptions(),
    ) -> tuple[torch.Tensor, JobStats]:
        """Encode pixels in [-1,1] (NCHW, or [B,3,F,H,W] for video models) to latents on the CPU."""
        hosted = self.get(name)
        return await self._on_device(hosted, self._encode_job, hosted, pixels, scaling, out_dtype, job)

    async def run_cpu(self, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU-bound conversions (image/video encoding, uint8) off the loop and off the device workers."""
        return await asyncio.get_running_loop().run_in_executor(self._cpu, fn, *args)

    def _batching(self, hosted: HostedModel) -> bool:
        enabled = self.options.batching
        return hosted.device.type == "cuda" if enabled is None else enabled

    def _batcher_for(self, hosted: HostedModel) -> Batcher:
        if hosted.name not in self._batchers:

            async def run(key: tuple, batch: torch.Tensor) -> tuple[torch.Tensor, JobStats]:
                _name, _shape, _dtype, scaling, out_dtype, job = key
                return await self._on_device(hosted, self._decode_job, hosted, batch, Scaling(*scaling), out_dtype, job)

            preset = hosted.preset
            self._batchers[hosted.name] = Batcher(
                run,
                window=self.options.batch_window,
                max_items=self.options.batch_max_items,
                element_cost=lambda z: decode_activation_elements(z, preset.spatial_compression, preset.temporal_compression),
            )
        return self._batchers[hosted.name]

    async def _on_device(self, hosted: HostedModel, fn: Callable[..., T], *args: Any) -> T:
        submitted = time.perf_counter()
        return await asyncio.get_running_loop().run_in_executor(self._workers[str(hosted.device)], fn, submitted, *args)

    def _decode_job(
        self, submitted: float, hosted: HostedModel, latent: torch.Tensor, scaling: Scaling, out_dtype: torch.dtype, job: JobOptions
    ) -> tuple[torch.Tensor, JobStats]:
        return self._job(submitted, hosted, DECODE, latent, scaling, out_dtype, job)

    def _encode_job(
        self, submitted: float, hosted: HostedModel, pixels: torch.Tensor, scaling: Scaling, out_dtype: torch.dtype, job: JobOptions
    ) -> tuple[torch.Tensor, JobStats]:
        return self._job(submitted, hosted, ENCODE, pixels, scaling, out_dtype, job)

    def _job(
        self, submitted: float, hosted: HostedModel, op: str, x: torch.Tensor, scaling: Scaling, out_dtype: torch.dtype, job: JobOptions
    ) -> tuple[torch.Tensor, JobStats]:
        """One decode or encode on the device worker: scaling applied on the latent side, timed."""
        stats = JobStats(queue=time.perf_counter() - submitted, batch=x.shape[0])
        model = self._ensure_loaded(hosted)
        started = time.perf_counter()
        with torch.inference_mode():
            x = x.to(hosted.device)
            if op == DECODE:
                x = to_vae_space(x, scaling, model, hosted.preset)
            out = self._run_checked(hosted, model, x, op, job, stats)
            if op == ENCODE:
                out = from_vae_space(out, scaling, model, hosted.preset)
        stats.compute = time.perf_counter() - started
        return out.to(dtype=out_dtype).cpu(), stats

    def _run_checked(
        self, hosted: HostedModel, model: torch.nn.Module, x: torch.Tensor, op: str, job: JobOptions, stats: JobStats
    ) -> torch.Tensor:
        """Run with the model's dtype; NaN/Inf in half precision gets one float32 retry (logged)."""
        with parity.behaving_like(model, job.reference):
            return self._run_with_retry(hosted, model, x, op, job, stats)

    def _run_with_retry(
        self, hosted: HostedModel, model: torch.nn.Module, x: torch.Tensor, op: str, job: JobOptions, stats: JobStats
    ) -> torch.Tensor:
        out = self._run_planned(hosted, model, x.to(hosted.dtype), op, job, stats)
        if bool(torch.isfinite(out).all()) or hosted.dtype == torch.float32:
            if hosted.dtype == torch.float32:
                warn_if_not_finite(hosted.name, op, out)
            return out
        log.warning("%s %s produced NaN/Inf in %s; retrying in float32", hosted.name, op, hosted.dtype)
        stats.fallbacks.append("nan")
        model.to(torch.float32)
        try:
            out = self._run_planned(hosted, model, x.float(), op, job, stats)
        finally:
            model.to(hosted.dtype)
        warn_if_not_finite(hosted.name, op, out)
        return out

    def _run_planned(
        self, hosted: HostedModel, model: torch.nn.Module, x: torch.Tensor, op: str, job: JobOptions, stats: JobStats
    ) -> torch.Tensor:
        """Whole, split by batch, or tiled, as memory allows; out of memory falls back to smaller plans."""
        preset, spatial = hosted.preset, (x.shape[-2], x.shape[-1])
        latent_spatial = spatial if op == DECODE else (spatial[0] // preset.spatial_compression, spatial[1] // preset.spatial_compression)
        estimate = memory.decode_bytes if op == DECODE else memory.encode_bytes
        per_item = estimate(preset, tuple(x.shape), x.dtype)
        budget = self.options.memory_budget or memory.free_bytes(hosted.device)
        plan = memory.plan(per_item, x.shape[0], latent_spatial, budget, tile=job.mode, tile_size=job.size)
        fallbacks = [] if job.mode == "off" else memory.smaller_plans(plan, latent_spatial)
        for attempt in itertools.chain([plan], fallbacks):
            try:
                out = self._run_plan(hosted, model, x, op, attempt)
                stats.tiled = stats.tiled or attempt.tiled
                return out
            except torch.OutOfMemoryError:
                log.warning("%s %s ran out of memory with %s; trying a smaller plan", hosted.name, op, attempt)
                stats.fallbacks.append("oom")
                if hosted.device.type == "cuda":
                    torch.cuda.empty_cache()
        raise OutOfMemory(
            f"{hosted.name} {op} of shape {list(x.shape)} does not fit in device memory even tiled at "
            f"{memory.MIN_TILE} latent pixels; send smaller images or fewer frames"
        )

    def _run_plan(self, hosted: HostedModel, model: torch.nn.Module, x: torch.Tensor, op: str, plan: memory.Plan) -> torch.Tensor:
        run = decode_latents if op == DECODE else encode_pixels
        options = self.options.accel
        spatial = hosted.preset.spatial_compression

        def whole(t: torch.Tensor) -> torch.Tensor:
            return run(model, accel.input_layout(t, options))

        def tiled(t: torch.Tensor) -> torch.Tensor:
            if hosted.preset.is_video:  # temporal + spatial tiling of causal video VAEs: diffusers' own
                return _with_builtin_tiling(model, lambda: whole(t), plan.tile * spatial)
            scale, tile, overlap = (spatial, plan.tile, plan.overlap) if op == DECODE else (1 / spatial, plan.tile * spatial, plan.overlap * spatial)
            return run_tiled(whole, t, tile=tile, overlap=overlap, scale=scale).to(t.dtype)

        step = tiled if plan.tiled else whole
        chunks = [step(chunk) for chunk in x.split(plan.batch)]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

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
        model = model.train(False).requires_grad_(False)
        hosted.model = accel.apply(model, hosted.device, self.options.accel, video=hosted.preset.is_video)
        if self.options.accel.compile:
            _warm_up(hosted.name, hosted.model, hosted.preset, hosted.device, hosted.dtype)
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


DECODE, ENCODE = "decode", "encode"


def _scaling_key(scaling: Scaling) -> tuple:
    return (scaling.scaling_factor, scaling.shift_factor, scaling.use_model_defaults)


def _with_builtin_tiling(model: torch.nn.Module, fn: Callable[[], torch.Tensor], tile_pixels: int) -> torch.Tensor:
    """Run `fn` with the model's own (diffusers) tiling on, at `tile_pixels` per side where settable."""
    if not hasattr(model, "enable_tiling"):
        return fn()
    stride = max(8, tile_pixels * 3 // 4)  # a quarter of each tile overlaps its neighbour
    try:
        model.enable_tiling(
            tile_sample_min_height=tile_pixels,
            tile_sample_min_width=tile_pixels,
            tile_sample_stride_height=stride,
            tile_sample_stride_width=stride,
        )
    except TypeError:  # an older signature without sizes
        model.enable_tiling()
    try:
        return fn()
    finally:
        model.disable_tiling()


def _warm_up(name: str, model: torch.nn.Module, preset: Preset, device: torch.device, dtype: torch.dtype) -> None:
    """Compile now, on a small latent, rather than in the first user's request."""
    started = time.perf_counter()
    frames = (2,) if preset.is_video else ()
    z = torch.zeros(1, preset.latent_channels, *frames, 32, 32, device=device, dtype=dtype)
    with torch.inference_mode():
        decode_latents(model, z)
    log.info("%s warmed up (compiled) in %.1f s", name, time.perf_counter() - started)
