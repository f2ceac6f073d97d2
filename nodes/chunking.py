"""Request chunking: a batch split into requests of bounded size, run a few at a time, results in order."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

T = TypeVar("T")

# Output pixels per image request: 1 MP, one 1024x1024 image (3 MiB as uint8) or several smaller ones.
# Smaller requests in flight together overlap one image's transfer with the next one's decode: over a
# 100 Mbit/s, 20 ms link a batch of four 1024^2 images took 1.21 s this way against 1.63 s as one
# request (bench/network.py, bench/RESULTS.md).
PIXEL_BUDGET = 1024 * 1024
MAX_PARALLEL = 3
POLL_SECONDS = 0.25


def plan_chunks(
    batch: int, item_pixels: int, pixel_budget: int = PIXEL_BUDGET, max_items: int | None = None
) -> list[slice]:
    """Consecutive slices covering range(batch), each holding at most `pixel_budget` pixels (at least one item)."""
    if batch < 1:
        raise ValueError(f"batch of {batch} items: nothing to send")
    per_chunk = max(1, pixel_budget // max(1, item_pixels))
    if max_items is not None:
        per_chunk = min(per_chunk, max_items)
    return [slice(start, min(start + per_chunk, batch)) for start in range(0, batch, per_chunk)]


def run_in_order(
    jobs: Sequence[Callable[[threading.Event], T]],
    *,
    parallel: int = MAX_PARALLEL,
    on_done: Callable[[], None] | None = None,
) -> list[T]:
    """Run `jobs` on up to `parallel` threads and return their results in job order.

    Each job gets a `stop` event that is set as soon as the run fails (a job raised, or `on_done`,
    which runs on this thread after each finished job, raised - e.g. ComfyUI's interrupt); jobs pass
    it to the client's `cancel` so that requests still in flight end within a second. The first
    exception is re-raised here after the pool has wound down.
    """
    stop = threading.Event()
    results: list[T | None] = [None] * len(jobs)
    pool = ThreadPoolExecutor(max_workers=max(1, min(parallel, len(jobs))), thread_name_prefix="remote_vae")
    try:
        pending: dict[Future, int] = {pool.submit(job, stop): i for i, job in enumerate(jobs)}
        while pending:
            done, _ = wait(pending, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
            for future in done:
                results[pending.pop(future)] = future.result()
                if on_done is not None:
                    on_done()
    except BaseException:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results  # type: ignore[return-value]
