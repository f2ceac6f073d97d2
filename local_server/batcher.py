"""Dynamic batching: requests with the same key that arrive while the device is busy run as one batch.

The key holds everything that must match (model, operation, shape after the batch dimension, dtype
and options). A request that finds the batcher idle (no batch of its own on the device, none forming)
starts on the next turn of the event loop, with whatever was submitted in the same turn: a lone request
never waits for a window. Requests arriving while a batch runs gather into the next one, which closes
when the device frees (every batch in flight has finished), when the window ends, or earlier when one
more request would pass the item or element budget (kept below 2^31 elements, the limit of many GPU
kernels). Results are split back along the batch dimension, in order. Requests that leave (cancelled
waiters) are dropped when their batch forms, and a batch all of whose requests left is cancelled before
it reaches the device.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

KERNEL_ELEMENT_LIMIT = 2**31 - 1

# `run(key, batch)` returns the batched result and something every request of the batch shares
# (e.g. timings); each request gets back its own slice of the result and that shared part.
RunBatch = Callable[[Hashable, torch.Tensor], Awaitable[tuple[torch.Tensor, Any]]]


@dataclass
class _Pending:
    tensors: list[torch.Tensor] = field(default_factory=list)
    futures: list[asyncio.Future] = field(default_factory=list)
    elements: int = 0
    timer: asyncio.Handle | None = None


class Batcher:
    """Groups same-key tensors and runs them through `run(key, batch)` together.

    `element_cost(tensor)` estimates the elements the batch will create (e.g. output pixels x
    channels); a batch never exceeds `max_elements` of that cost, nor `max_items` tensors.
    """

    def __init__(
        self,
        run: RunBatch,
        *,
        window: float = 0.01,
        max_items: int = 8,
        max_elements: int = KERNEL_ELEMENT_LIMIT,
        element_cost: Callable[[torch.Tensor], int] = lambda t: t.numel(),
    ) -> None:
        self._run = run
        self._window = window
        self._max_items = max_items
        self._max_elements = min(max_elements, KERNEL_ELEMENT_LIMIT)
        self._cost = element_cost
        self._pending: dict[Hashable, _Pending] = {}
        self._in_flight = 0  # batches handed to `run` and not finished

    async def submit(self, key: Hashable, tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        loop = asyncio.get_running_loop()
        cost = self._cost(tensor)
        pending = self._pending.get(key)
        if pending and (
            pending.elements + cost > self._max_elements or len(pending.tensors) >= self._max_items
        ):
            self._flush(key)
            pending = None
        if pending is None:
            idle = self._in_flight == 0 and not self._pending
            pending = self._pending[key] = _Pending()
            pending.timer = (
                loop.call_soon(self._flush, key) if idle else loop.call_later(self._window, self._flush, key)
            )
        future = loop.create_future()
        pending.tensors.append(tensor)
        pending.futures.append(future)
        pending.elements += cost
        if len(pending.tensors) >= self._max_items:
            self._flush(key)
        return await future

    def _flush(self, key: Hashable) -> None:
        pending = self._pending.pop(key, None)
        if pending is None:
            return
        if pending.timer is not None:
            pending.timer.cancel()
        self._in_flight += 1
        asyncio.get_running_loop().create_task(self._executing(key, pending))

    async def _executing(self, key: Hashable, pending: _Pending) -> None:
        try:
            await self._execute(key, pending)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:  # the device is free: what gathered meanwhile starts now
                for waiting in list(self._pending):
                    self._flush(waiting)

    async def _execute(self, key: Hashable, pending: _Pending) -> None:
        # Requests that left while the batch formed (deadline passed, client gone) are dropped from it.
        live = [(t, f) for t, f in zip(pending.tensors, pending.futures) if not f.done()]
        if not live:
            return
        tensors, futures = [t for t, _ in live], [f for _, f in live]
        sizes = [t.shape[0] for t in tensors]
        try:
            run = asyncio.ensure_future(self._run(key, tensors[0] if len(sizes) == 1 else torch.cat(tensors)))
            for future in futures:  # once every request has left, the batch never reaches the device
                future.add_done_callback(lambda _: run.cancel() if all(f.done() for f in futures) else None)
            out, shared = await run
            if out.shape[0] != sum(sizes):
                raise RuntimeError(f"batched run returned {out.shape[0]} items for {sum(sizes)} inputs")
            parts = torch.split(out, sizes) if len(sizes) > 1 else (out,)
        except BaseException as exc:  # every waiter learns of the failure
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            return
        for future, part in zip(futures, parts):
            if not future.done():
                future.set_result((part, shared))


def decode_activation_elements(
    latent: torch.Tensor, spatial: int, temporal: int = 1, widest: int = 128
) -> int:
    """Elements of a decoder's biggest activation for `latent`: `widest` channels at full resolution
    (audio latents [B,C,L]: `spatial` samples a latent step)."""
    if latent.ndim == 3:
        return math.prod((latent.shape[0], widest, latent.shape[2] * spatial))
    height, width = latent.shape[-2:]
    frames = (latent.shape[2] - 1) * temporal + 1 if latent.ndim == 5 else 1
    return math.prod((latent.shape[0], widest, frames, height * spatial, width * spatial))
