"""Several endpoints for one model: spread requests over them and fail over when one is down.

Requests go to the endpoint with the fewest requests outstanding from this process (ties: the one
that failed longest ago, then the order given). An endpoint that fails to connect or answers a
retryable status is skipped for a short cool-down, and the request moves on to the next one.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

COOL_DOWN = 10.0  # seconds an endpoint that just failed is tried only when nothing else is left


def split_endpoints(endpoints: str | Sequence[str]) -> list[str]:
    """`"http://a:8190/sd15, http://b:8190/sd15"` (commas, spaces or new lines) -> a list, order kept."""
    items = re.split(r"[\s,]+", endpoints) if isinstance(endpoints, str) else list(endpoints)
    seen: list[str] = []
    for item in (i.strip() for i in items):
        if item and item not in seen:
            seen.append(item)
    return seen


@dataclass
class _State:
    outstanding: int = 0
    failed_at: float = float("-inf")


class EndpointPool:
    """Outstanding-request counts and recent failures for a set of endpoints (thread-safe)."""

    def __init__(self, endpoints: Iterable[str]) -> None:
        self.endpoints = list(endpoints)
        if not self.endpoints:
            raise ValueError("an endpoint pool needs at least one endpoint")
        self._state = {e: _State() for e in self.endpoints}
        self._lock = threading.Lock()

    def acquire(self, exclude: Iterable[str] = ()) -> str | None:
        """Reserve the best endpoint not in `exclude`; None when every endpoint is excluded."""
        excluded = set(exclude)
        now = time.monotonic()
        with self._lock:
            candidates = [e for e in self.endpoints if e not in excluded]
            if not candidates:
                return None
            best = min(
                candidates,
                key=lambda e: (
                    now - self._state[e].failed_at < COOL_DOWN,  # healthy ones first
                    self._state[e].outstanding,
                    self._state[e].failed_at,
                    self.endpoints.index(e),
                ),
            )
            self._state[best].outstanding += 1
            return best

    def release(self, endpoint: str, *, failed: bool) -> None:
        with self._lock:
            state = self._state[endpoint]
            state.outstanding -= 1
            if failed:
                state.failed_at = time.monotonic()

    def outstanding(self, endpoint: str) -> int:
        with self._lock:
            return self._state[endpoint].outstanding


_POOLS: dict[tuple[str, ...], EndpointPool] = {}
_POOLS_LOCK = threading.Lock()


def pool_for(endpoints: Sequence[str]) -> EndpointPool:
    """The process-wide pool for this set of endpoints, so concurrent callers share the counts."""
    key = tuple(endpoints)
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = EndpointPool(key)
        return _POOLS[key]
