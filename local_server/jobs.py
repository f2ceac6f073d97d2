"""The job runner: one decode or encode on a model's device worker, with batching, memory planning and
fallbacks. Decode and encode differ only in their `Op` record; the model itself is behind `Backend`.

A job: (batched with same-shape decodes that arrive together) -> the device worker -> load the model if
needed -> scaling on the latent side -> a plan from the memory estimate (whole, split by batch, or tiled)
-> smaller plans after out-of-memory -> one float32 retry after NaN/Inf in half precision -> the result on
the CPU in the requested dtype, with its `JobStats`.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import astuple, dataclass, field

import torch

from ..remote.presets import Preset
from ..remote.protocol import Extensions, Operation, Reference, Scaling, TileMode
from . import memory
from .backends.base import Backend, Geometry, Shape
from .batcher import Batcher, decode_activation_elements
from .errors import OutOfMemory
from .latents import Factors, as_is, to_diffusion_space, to_vae_space
from .postprocess import device_pixels
from .registry import HostedModel, ModelRegistry
from .tiling import run_tiled

log = logging.getLogger("remote_vae.server")

ScaleFn = Callable[[torch.Tensor, Scaling, Factors, Preset], torch.Tensor]


@dataclass(frozen=True)
class Op:
    """What differs between decode and encode, as data: the runner never asks which one it runs.

    The backend's methods are named after the operation (`decode`, `decode_tiled`, `decode_bytes`).
    """

    name: Operation
    into_model: ScaleFn  # on the input before the model (decode: diffusion -> VAE space)
    out_of_model: ScaleFn  # on the output after it (encode: VAE -> diffusion space)
    takes_pixels: bool  # pixels in and latents out (encode), or the other way round
    batch_cost: Callable[[torch.Tensor, Geometry], int] | None = (
        None  # elements a batch creates; None: never batched
    )

    def run(self, backend: Backend, x: torch.Tensor) -> torch.Tensor:
        return getattr(backend, self.name)(x)

    def run_tiled(self, backend: Backend, x: torch.Tensor, tile: int) -> torch.Tensor | None:
        """The backend's own tiling at `tile` pixels, or None where it has none."""
        return getattr(backend, f"{self.name}_tiled")(x, tile)

    def estimate(self, backend: Backend, shape: Shape, dtype: torch.dtype) -> int:
        """Peak bytes of one batch item."""
        return getattr(backend, f"{self.name}_bytes")(shape, dtype)

    def input_per_latent(self, g: Geometry) -> int:
        """Input pixels per latent pixel, per side."""
        return g.spatial_compression if self.takes_pixels else 1

    def output_per_latent(self, g: Geometry) -> int:
        return 1 if self.takes_pixels else g.spatial_compression


def _decode_cost(z: torch.Tensor, g: Geometry) -> int:
    return decode_activation_elements(z, g.spatial_compression, g.temporal_compression)


DECODE = Op(
    "decode", into_model=to_vae_space, out_of_model=as_is, takes_pixels=False, batch_cost=_decode_cost
)
ENCODE = Op("encode", into_model=as_is, out_of_model=to_diffusion_space, takes_pixels=True)


@dataclass(frozen=True)
class JobOptions:
    """Our optional request parameters that change how a job runs (see each field)."""

    mode: TileMode = "auto"
    size: int | None = None  # tile_size in latent pixels
    reference: Reference = "diffusers"  # whose implementation to match where they differ (parity.py)

    @classmethod
    def from_extensions(cls, extensions: Extensions) -> JobOptions:
        return cls(extensions.tile, extensions.tile_size, extensions.reference)


@dataclass(frozen=True)
class Job:
    """One decode or encode of one model, apart from its input tensor."""

    op: Op
    model: HostedModel
    scaling: Scaling
    out_dtype: torch.dtype  # of the result handed back on the CPU; uint8: pixels rendered on the device
    options: JobOptions = JobOptions()


@dataclass
class JobStats:
    """What happened to one job, for the request log and /metrics."""

    queue: float = 0.0  # seconds waiting for the device worker
    compute: float = 0.0  # seconds on the device
    batch: int = 1  # items in the batch the job ran in
    tiled: bool = False
    fallbacks: list[str] = field(default_factory=list)  # "oom", "nan"


class JobRunner:
    """Runs jobs on the models of `models`, on their device workers."""

    def __init__(self, models: ModelRegistry) -> None:
        self.models = models
        self.options = models.options
        self._batchers: dict[tuple[str, Operation], Batcher] = {}

    async def run(self, job: Job, x: torch.Tensor) -> tuple[torch.Tensor, JobStats]:
        """`x` (a validated latent, or pixels in [-1,1]) through `job`; the result is on the CPU.

        Same-shape requests that arrive together are batched when batching is on (never tiled ones).
        Cancelling the call (the deadline passed, the client left) drops a job that has not reached the
        device yet: its worker never runs it (the batcher drops a batch all of whose requests left).
        """
        if job.op.batch_cost is not None and self._batching(job.model) and job.options.mode != "on":
            key = (tuple(x.shape[1:]), x.dtype, astuple(job.scaling), job.out_dtype, job.options)
            return await self._batcher_for(job.op, job.model).submit(key, x)
        return await self._on_device(job, x)

    def _batching(self, hosted: HostedModel) -> bool:
        enabled = self.options.batching
        return hosted.device.type == "cuda" if enabled is None else enabled

    def _batcher_for(self, op: Op, hosted: HostedModel) -> Batcher:
        if (hosted.name, op.name) not in self._batchers:

            async def run(key: tuple, batch: torch.Tensor) -> tuple[torch.Tensor, JobStats]:
                _shape, _dtype, scaling, out_dtype, options = key
                return await self._on_device(Job(op, hosted, Scaling(*scaling), out_dtype, options), batch)

            cost, geometry = op.batch_cost, hosted.geometry  # known before the model loads
            self._batchers[(hosted.name, op.name)] = Batcher(
                run,
                window=self.options.batch_window,
                max_items=self.options.batch_max_items,
                element_cost=lambda x: cost(x, geometry),
            )
        return self._batchers[(hosted.name, op.name)]

    async def _on_device(self, job: Job, x: torch.Tensor) -> tuple[torch.Tensor, JobStats]:
        return await self.models.workers.on_device(job.model.device, self._job, time.perf_counter(), job, x)

    # ---------------------------------------------------------------- on the device worker

    def _job(self, submitted: float, job: Job, x: torch.Tensor) -> tuple[torch.Tensor, JobStats]:
        """The whole job, timed: the loaded model, scaling on the latent side, the model's reference."""
        stats = JobStats(queue=time.perf_counter() - submitted, batch=x.shape[0])
        backend = self.models.loaded(job.model)
        started = time.perf_counter()
        op, preset = job.op, job.model.preset
        with torch.inference_mode():
            factors = backend.factors()
            x = op.into_model(x.to(job.model.device), job.scaling, factors, preset)
            with backend.behaving_like(job.options.reference):
                out = self._retrying_nan(job, backend, x, stats)
            out = op.out_of_model(out, job.scaling, factors, preset)
            if job.out_dtype == torch.uint8:  # a quarter of float32's bytes to copy back (`device_pixels`)
                out = device_pixels(out)
        stats.compute = time.perf_counter() - started
        return out.to(dtype=job.out_dtype).cpu(), stats

    def _retrying_nan(self, job: Job, backend: Backend, x: torch.Tensor, stats: JobStats) -> torch.Tensor:
        """Run in the model's dtype; NaN/Inf in half precision gets one float32 retry (logged)."""
        name, op, dtype = job.model.name, job.op.name, job.model.dtype
        out = self._planned(job, backend, x.to(dtype), stats)
        if _all_finite(out):
            return out
        if dtype != torch.float32:
            log.warning("%s %s produced NaN/Inf in %s; retrying in float32", name, op, dtype)
            stats.fallbacks.append("nan")
            with backend.in_float32():
                out = self._planned(job, backend, x.float(), stats)
            if _all_finite(out):
                return out
        log.warning("%s %s produced NaN/Inf values (dtype %s); try --dtype float32", name, op, out.dtype)
        return out

    def _planned(self, job: Job, backend: Backend, x: torch.Tensor, stats: JobStats) -> torch.Tensor:
        """Whole, split by batch, or tiled, as memory allows; out of memory falls back to smaller plans."""
        unit = job.op.input_per_latent(backend.geometry)
        latent_hw = (
            1 if x.ndim == 3 else x.shape[-2] // unit,
            x.shape[-1] // unit,
        )  # audio: [B,C,L] or [B,ch,samples]
        per_item = job.op.estimate(backend, tuple(x.shape), x.dtype)
        budget = self.options.memory_budget or memory.free_bytes(job.model.device)
        mode, size = job.options.mode, job.options.size
        plan = memory.plan(per_item, x.shape[0], latent_hw, budget, tile=mode, tile_size=size)
        fallbacks = [] if mode == "off" else memory.smaller_plans(plan, latent_hw)
        for attempt in itertools.chain([plan], fallbacks):
            try:
                out = self._run_plan(job.op, backend, x, attempt)
                stats.tiled = stats.tiled or attempt.tiled
                return out
            except torch.OutOfMemoryError:
                log.warning(
                    "%s %s ran out of memory with %s; trying a smaller plan",
                    job.model.name,
                    job.op.name,
                    attempt,
                )
                stats.fallbacks.append("oom")
                if job.model.device.type == "cuda":
                    torch.cuda.empty_cache()
        raise OutOfMemory(
            f"{job.model.name} {job.op.name} of shape {list(x.shape)} does not fit in device memory even tiled at "
            f"{memory.MIN_TILE} latent pixels; send smaller images or fewer frames"
        )

    def _run_plan(self, op: Op, backend: Backend, x: torch.Tensor, plan: memory.Plan) -> torch.Tensor:
        geometry = backend.geometry

        def whole(t: torch.Tensor) -> torch.Tensor:
            return op.run(backend, t)

        def tiled(t: torch.Tensor) -> torch.Tensor:
            own = op.run_tiled(backend, t, plan.tile * geometry.spatial_compression)
            if own is not None:
                return own
            unit_in, unit_out = op.input_per_latent(geometry), op.output_per_latent(geometry)
            scale = unit_out / unit_in  # output pixels per input pixel
            return run_tiled(
                whole, t, tile=plan.tile * unit_in, overlap=plan.overlap * unit_in, scale=scale
            ).to(t.dtype)

        step = tiled if plan.tiled else whole
        chunks = [step(chunk) for chunk in x.split(plan.batch)]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def _all_finite(x: torch.Tensor) -> bool:
    """Whether `x` holds no NaN/Inf, in one reduction pass (isfinite().all() is two full passes): min
    and max propagate NaN, and any Inf is the min or the max."""
    if x.numel() == 0:
        return True
    low, high = torch.aminmax(x)
    return bool(low.isfinite() & high.isfinite())
