"""One middleware around the job routes: the request id, the per-request log line and the metrics.

Each job request gets an `Exchange` (in `request.state.exchange`) that the handler fills in as it goes;
when the answer's last byte is about to leave, the outcome is counted and logged. A server fault that no
handler turned into an answer becomes a short 500 here, logged whole; a client that left before its answer
is a 499 (outcome "client_closed"), one log line and no traceback. A streamed answer that fails after its
status line was sent cannot change it: the failure is logged whole and the connection aborted (the client
sees a short body), counted as a 500.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass, field

from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ClientClosed, error_response
from .jobs import JobStats
from .metrics import Metrics

log = logging.getLogger("remote_vae.server")

REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass
class Exchange:
    """One request as it goes through the server, for its log line and metrics."""

    request_id: str
    model: str = "-"
    op: str = "-"
    shape: list[int] = field(default_factory=list)
    stats: JobStats = field(default_factory=JobStats)
    render_seconds: float = 0.0  # summed over the threads that rendered
    bytes_in: int = 0
    codec: str = "-"  # of a compressed-frames answer
    encode_seconds: float = 0.0  # CPU-seconds the codec took, summed over threads


class RequestLog:
    """ASGI middleware: answers `X-Request-ID` (the client's when it is a plain token), logs one line and
    records the metrics of each request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        supplied = Headers(scope=scope).get("x-request-id", "")
        ex = Exchange(supplied if REQUEST_ID.match(supplied) else uuid.uuid4().hex[:16])
        scope.setdefault("state", {})["exchange"] = ex
        started = time.perf_counter()
        status, sent, answering, done = 500, 0, False, False

        async def send_logged(message: Message) -> None:
            nonlocal status, sent, answering, done
            if message["type"] == "http.response.start":
                status, answering = message["status"], True
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-request-id", ex.request_id.encode())],
                }
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
                if not message.get("more_body", False):  # counted before the client can ask /metrics again
                    done = True
                    self._account(ex, status, sent, time.perf_counter() - started)
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
            if answering and not done:  # a streamed answer whose client left
                self._account(ex, ClientClosed.status, sent, time.perf_counter() - started)
        except Exception as exc:
            if answering:  # returning without the last body message makes uvicorn close the connection
                log.error("request %s to %s failed after %d bytes of its answer; connection aborted",
                          ex.request_id, scope["path"], sent, exc_info=exc)  # fmt: skip
                self._account(ex, 500, sent, time.perf_counter() - started)
                return
            if isinstance(exc, ClientDisconnect):  # read by something other than uploads.read_body: 499
                await error_response(ClientClosed.status, "the client closed the connection")(
                    scope, receive, send_logged
                )
                return
            # a server fault: log it whole, answer briefly, keep serving
            log.exception("request to %s failed", scope["path"])
            message = f"internal server error: {type(exc).__name__}: {str(exc)[:300]}"
            await error_response(500, message)(scope, receive, send_logged)

    def _account(self, ex: Exchange, status: int, bytes_out: int, seconds: float) -> None:
        metrics, model, op = self.metrics, ex.model, ex.op
        metrics.inc(
            "remote_vae_requests_total", model=model, op=op, outcome=outcome_of(status), status=str(status)
        )
        metrics.observe("remote_vae_request_seconds", seconds, model=model, op=op)
        metrics.inc("remote_vae_bytes_in_total", ex.bytes_in, model=model)
        metrics.inc("remote_vae_bytes_out_total", bytes_out, model=model)
        if status < 400 and op != "-":
            metrics.observe("remote_vae_queue_seconds", ex.stats.queue, model=model, op=op)
            metrics.observe("remote_vae_compute_seconds", ex.stats.compute, model=model, op=op)
            metrics.observe("remote_vae_render_seconds", ex.render_seconds, model=model, op=op)
            if ex.codec != "-":
                metrics.observe("remote_vae_encode_seconds", ex.encode_seconds, model=model, codec=ex.codec)
            if ex.stats.tiled:
                metrics.inc("remote_vae_tiled_total", model=model)
            for kind in ex.stats.fallbacks:
                metrics.inc("remote_vae_fallback_total", model=model, kind=kind)
        log.info(
            "request %s %s %s shape=%s status=%d batch=%d queue=%.3fs compute=%.3fs render=%.3fs total=%.3fs%s%s%s",
            ex.request_id, model, op, ex.shape, status, ex.stats.batch, ex.stats.queue, ex.stats.compute,
            ex.render_seconds, seconds, " tiled" if ex.stats.tiled else "",
            f" fallbacks={','.join(ex.stats.fallbacks)}" if ex.stats.fallbacks else "",
            f" codec={ex.codec} encode={ex.encode_seconds:.3f}s" if ex.codec != "-" else "",
        )  # fmt: skip


def outcome_of(status: int) -> str:
    """The `outcome` label of a request's metrics."""
    if status == ClientClosed.status:
        return "client_closed"  # not a client error: the request may have been fine
    return "ok" if status < 400 else "client_error" if status < 500 else "server_error"
