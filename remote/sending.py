"""Sending to one endpoint or several: spread requests over a model's servers, fail over when one is down.

Requests go to the endpoint with the fewest requests outstanding from this process (ties: the one
that failed longest ago, then the order given). An endpoint that fails to connect or answers a
retryable status is skipped for a short cool-down, and the request moves on to the next one.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import protocol
from .errors import RemoteVAECancelled, RemoteVAEError, display_url
from .reply import Reply
from .transport import DEFAULT_RETRIES, TransportOptions, check_options, deadline_for, send_one

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

log = logging.getLogger(__name__)

COOL_DOWN = 10.0  # seconds an endpoint that just failed is tried only when nothing else is left


def send(
    endpoint: str | Sequence[str], wire: protocol.WireRequest, **options: Unpack[TransportOptions]
) -> Reply:
    """POST `wire` to `endpoint` and return the 2xx reply; see `send_one` for retries and errors.

    `endpoint` may name several servers hosting the same model (a list, or one string separated by
    commas or spaces): each request goes to the one with the fewest requests outstanding, and when
    it cannot be reached or answers what a retry may fix the request fails over to the next one. The
    total timeout bounds the whole call, fail-overs included.
    """
    check_options(options)
    deadline = deadline_for(options)
    candidates = split_endpoints(endpoint)
    if len(candidates) <= 1:
        return send_one(candidates[0] if candidates else "", wire, deadline=deadline, **options)
    retries = options.pop("retries", DEFAULT_RETRIES)
    pool = pool_for(candidates)
    tried: list[str] = []
    failures: list[RemoteVAEError] = []
    while (chosen := pool.acquire(exclude=tried)) is not None:
        last = len(tried) == len(candidates) - 1
        failed = False
        try:
            return send_one(chosen, wire, deadline=deadline, retries=retries if last else 0, **options)
        except RemoteVAECancelled:
            raise
        except RemoteVAEError as exc:
            if exc.status is not None and not exc.retryable:
                raise  # the request itself is wrong, or the job ran: another server would say the same
            if deadline.left() <= 0:
                raise
            failed = True
            tried.append(chosen)
            failures.append(exc)
            if not last:
                log.warning("%s; failing over to the next endpoint", exc)
        finally:
            pool.release(chosen, failed=failed)
    raise RemoteVAEError(
        ", ".join(display_url(e) for e in candidates),
        f"all {len(candidates)} endpoints failed: " + "; ".join(str(f) for f in failures),
        status=failures[-1].status,
        server_message=failures[-1].server_message,
        hint="are the servers running and reachable?",
    )


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


_POOLS: dict[tuple[str, ...], EndpointPool] = {}
_POOLS_LOCK = threading.Lock()


def pool_for(endpoints: Sequence[str]) -> EndpointPool:
    """The process-wide pool for this set of endpoints, so concurrent callers share the counts."""
    key = tuple(endpoints)
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = EndpointPool(key)
        return _POOLS[key]
