"""Where work runs: the device and dtype a model gets, one worker thread per device, and a CPU pool.

One single-thread executor per device runs that device's loads and jobs one at a time, so the event
loop stays free to answer `/health`; CPU-side conversions (parsing, image and video encoding) run on a
separate small pool so they never wait behind a device job.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from ..remote.presets import Preset

T = TypeVar("T")


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


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


class Workers:
    """One worker thread per device plus a pool of `cpu_threads` (default: every usable CPU) for
    conversions: rendering and the codecs release the GIL, so a streamed answer uses them all."""

    def __init__(self, cpu_threads: int | None = None) -> None:
        cpu_threads = cpu_threads or usable_cpus()
        self.cpu_threads = cpu_threads
        self._devices: dict[str, ThreadPoolExecutor] = {}
        self._cpu = ThreadPoolExecutor(max_workers=cpu_threads, thread_name_prefix="remote-vae-cpu")

    def add(self, device: torch.device) -> None:
        if str(device) not in self._devices:
            self._devices[str(device)] = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"remote-vae-{device}"
            )

    def submit(self, device: torch.device, fn: Callable[..., T], *args: Any) -> Future[T]:
        return self._devices[str(device)].submit(fn, *args)

    async def on_device(self, device: torch.device, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._devices[str(device)], fn, *args)

    async def on_cpu(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._cpu, fn, *args)

    def submit_cpu(self, fn: Callable[[], T]) -> Future[T]:
        """`fn` on the conversion pool, not awaited yet (a streamed answer keeps several in flight)."""
        return self._cpu.submit(fn)

    def close(self) -> None:
        for worker in self._devices.values():
            worker.shutdown(wait=True, cancel_futures=True)
        self._cpu.shutdown(wait=True, cancel_futures=True)
