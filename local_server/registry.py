"""The models a server hosts: their names, presets, placement and load state.

Models are either handed in built (`add(..., model=vae)`) or loaded from `source` by the registry's
`BackendLoader` on first use (or by `preload()`), always on their device's worker thread, so loads never
race with each other or with that device's jobs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..remote.presets import Preset
from .accel import Accel
from .backends.base import Backend, BackendLoader, BackendName, Geometry, Placement
from .backends.diffusers import DiffusersLoader
from .devices import Workers, resolve_device, resolve_dtype
from .errors import ModelLoadError, ModelUnavailable, UnknownModel, without_addresses

log = logging.getLogger("remote_vae.server")

LoadState = Literal["not loaded", "queued", "loading", "loaded", "failed"]  # queued: waiting for preload
IN_PROCESS = "(model built in-process)"


@dataclass(frozen=True)
class Tuning:
    """How jobs run. Batching is on by default, on the CPU too: with 2 to 8 concurrent clients it
    raised throughput 1.4-3.1x over one client on a 2-core CPU (without it: 1.1-1.3x), for ~12% more
    latency with one client alone (bench/load.py, bench/RESULTS.md). `batching=None`: CUDA only."""

    batching: bool | None = True
    batch_window: float = 0.01  # seconds a request waits for others to join its batch
    batch_max_items: int = 8
    memory_budget: int | None = None  # bytes one job may use; None: the device's free memory
    # uint8 pixels rendered by the device job, where the model runs (None: on CUDA only; a CPU renders
    # faster in the answer's own bit-exact pass, band by band as it is sent)
    render_on_device: bool | None = None
    accel: Accel = field(default_factory=Accel)


@dataclass(eq=False)
class HostedModel:
    name: str
    preset: Preset
    source: str | None
    device: torch.device
    dtype: torch.dtype
    geometry: Geometry  # known before loading: the preset's, or what the comfy backend read from the file
    backend_name: BackendName = "diffusers"
    backend: Backend | None = None
    state: LoadState = "not loaded"
    error: str | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "backend": self.backend_name,
            "geometry": self.geometry.describe(),
            "preset": self.preset.describe(),
            "source": self.source or self.preset.checkpoint,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "state": self.state,
            "error": self.error,
        }


class ModelRegistry:
    """The hosted models by name (the first is the default), and the worker threads that run them.

    `load_hint` is appended to load failures whose message does not already say how to point the
    server at local weights; it may use {name} and {spec} (the name, or alias:preset).
    """

    def __init__(
        self,
        *,
        loader: BackendLoader | None = None,
        cpu_threads: int | None = None,  # the conversion pool's width (None: every usable CPU)
        load_hint: str | None = None,
        options: Tuning | None = None,
    ) -> None:
        self.loader = loader or DiffusersLoader()
        self.options = options or Tuning()
        self.workers = Workers(cpu_threads)
        self._load_hint = load_hint
        self._models: dict[str, HostedModel] = {}
        self._preloading: set[str] = set()  # names `preload()` has not finished with: not ready yet
        self._lock = threading.Lock()

    def add(
        self,
        name: str,
        preset: Preset,
        *,
        source: str | None = None,
        model: Any = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        geometry: Geometry | None = None,
    ) -> HostedModel:
        if name in self._models:
            raise ValueError(f"model name {name!r} is used twice")
        dev = resolve_device(device)
        hosted = HostedModel(
            name,
            preset,
            source,
            dev,
            resolve_dtype(dtype, preset, dev),
            geometry or Geometry.of(preset),
            self.loader.name,
        )
        if model is not None:
            hosted.backend = self.loader.wrap(model, preset, self._placement(hosted))
            hosted.state, hosted.source = "loaded", source or IN_PROCESS
        self._models[name] = hosted
        self.workers.add(dev)
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

    def loaded(self, hosted: HostedModel) -> Backend:
        """The model's backend, loading it first; call on its device worker.

        A failed load is retried by the next request (the file may have appeared meanwhile).
        """
        if hosted.backend is not None:
            return hosted.backend
        source = hosted.source or hosted.preset.checkpoint
        self._set_state(hosted, "loading")
        log.info("loading model %s (preset %s) from %s", hosted.name, hosted.preset.name, source)
        try:
            backend = self.loader.load(hosted.preset, hosted.source, self._placement(hosted))
        except Exception as exc:
            message = self._failure(hosted, source, exc)
            log.error(
                "%s", message, exc_info=not isinstance(exc, ModelLoadError)
            )  # expected ones need no traceback
            self._set_state(hosted, "failed", message)
            raise ModelUnavailable(message) from exc
        hosted.backend, hosted.dtype = (
            backend,
            backend.placement.dtype,
        )  # the comfy backend may choose its dtype
        self._set_state(hosted, "loaded")
        log.info("model %s loaded on %s as %s", hosted.name, hosted.device, hosted.dtype)
        return backend

    def preload(self) -> None:
        """Load every model now (each on its device worker); failures are logged, not raised."""
        waiting = [h for h in self._models.values() if h.backend is None]
        for hosted in waiting:
            self._set_state(hosted, "queued")
            self._preloading.add(hosted.name)
        futures = [self.workers.submit(h.device, self.loaded, h) for h in waiting]
        for hosted, future in zip(waiting, futures):
            with contextlib.suppress(ModelUnavailable):  # already logged; requests answer 503 with the reason
                future.result()
            self._preloading.discard(hosted.name)

    def not_ready(self) -> dict[str, str]:
        """Why each model that cannot serve cannot: waiting for preload, failed, or a source that cannot
        load. A model not loaded yet (or loading) whose source is sound is ready: it loads on first use."""
        reasons = {}
        for hosted in self._models.values():
            if hosted.state in ("queued", "loading") and hosted.name in self._preloading:
                reasons[hosted.name] = f"model {hosted.name!r} is being preloaded"
            elif hosted.state == "failed":
                reasons[hosted.name] = hosted.error or f"model {hosted.name!r} failed to load"
            elif hosted.state != "loaded":
                try:
                    self.loader.check(hosted.preset, hosted.source)
                except ModelLoadError as exc:
                    reasons[hosted.name] = f"model {hosted.name!r} cannot be loaded: {exc}"
        return reasons

    def close(self) -> None:
        self.workers.close()

    def _placement(self, hosted: HostedModel) -> Placement:
        return Placement(hosted.device, hosted.dtype, self.options.accel)

    def _set_state(self, hosted: HostedModel, state: LoadState, error: str | None = None) -> None:
        with self._lock:
            hosted.state, hosted.error = state, error

    def _failure(self, hosted: HostedModel, source: str | None, exc: Exception) -> str:
        message = f"model {hosted.name!r} could not be loaded from {source}: {without_addresses(str(exc))}"  # also in /v1/models
        if self._load_hint and not (isinstance(exc, ModelLoadError) and exc.has_hint):
            spec = hosted.name if hosted.name == hosted.preset.name else f"{hosted.name}:{hosted.preset.name}"
            message += "; " + self._load_hint.format(name=hosted.name, spec=spec)
        return message
