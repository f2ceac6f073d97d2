"""The server's HTTP face: a Starlette app speaking Hugging Face's remote-VAE protocol.

One request reads top to bottom: pick the model, parse with `remote.protocol`, validate against the
preset, run on the device worker (`engine.ModelHost`), convert on the CPU pool (`postprocess`),
answer. Client mistakes get 4xx JSON naming the bad value; only the server's own faults get 5xx.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..remote import protocol
from ..remote.presets import PresetError, candidates_for
from ..remote.protocol import ProtocolError
from . import postprocess
from .auth import is_authorized
from .engine import (
    HostedModel,
    JobOptions,
    JobStats,
    ModelHost,
    ModelUnavailable,
    OutOfMemory,
    UnknownModel,
    prepare_latent,
)
from .limits import LimitExceeded, Limits
from .metrics import Registry, server_registry

log = logging.getLogger("remote_vae.server")

DECODE, ENCODE = "decode", "encode"
# Path words a hosted model may not be called, or its routes would shadow ours.
RESERVED_NAMES = frozenset({"predict", "health", "v1", "metrics", "decode", "encode", "docs"})


@dataclass
class Settings:
    """Server-wide policy: limits, the bearer token (None: no auth), CORS origins, metrics."""

    limits: Limits = field(default_factory=Limits)
    token: str | None = None
    cors_origins: Sequence[str] = ()
    registry: Registry = field(default_factory=server_registry)


@dataclass
class Exchange:
    """One request as it goes through the server, for its log line and metrics."""

    request_id: str
    model: str = "-"
    op: str = "-"
    shape: list[int] = field(default_factory=list)
    stats: JobStats = field(default_factory=JobStats)
    render_seconds: float = 0.0
    bytes_in: int = 0


def create_app(host: ModelHost, settings: Settings | None = None) -> Starlette:
    """The ASGI app serving `host`'s models (the caller owns `host` and closes it)."""
    settings = settings or Settings()
    for name in host.names:
        check_model_name(name)
    admission = Admission(settings.limits.max_concurrency + settings.limits.max_queue, settings.registry)

    async def health(request: Request) -> Response:
        return PlainTextResponse("Ok")

    async def list_models(request: Request) -> Response:
        if not is_authorized(settings.token, request.headers.get("authorization")):
            return _unauthorized(settings)
        return JSONResponse({"default": host.names[0] if host.names else None, "models": [m.describe() for m in host.models()]})

    async def metrics(request: Request) -> Response:
        if not is_authorized(settings.token, request.headers.get("authorization")):
            return _unauthorized(settings)
        return PlainTextResponse(settings.registry.render(), media_type="text/plain; version=0.0.4")

    async def predict(request: Request) -> Response:  # POST / and /{model}: decode or encode by Content-Type
        return await _serve(host, settings, admission, request, None)

    async def decode(request: Request) -> Response:
        return await _serve(host, settings, admission, request, DECODE)

    async def encode(request: Request) -> Response:
        return await _serve(host, settings, admission, request, ENCODE)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    routes = [
        Route("/", health, methods=["GET"]),
        Route("/", predict, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/predict", predict, methods=["POST"]),
        Route("/{model}", predict, methods=["POST"]),
        Route("/{model}/predict", predict, methods=["POST"]),
        Route("/{model}/decode", decode, methods=["POST"]),
        Route("/{model}/encode", encode, methods=["POST"]),
    ]
    middleware = []
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["*"],
                expose_headers=["shape", "dtype", "x-request-id"],
            )
        )
    return Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: http_error})


class Admission:
    """Bounded concurrency plus a bounded queue: past `capacity` requests are refused at once."""

    def __init__(self, capacity: int, registry: Registry) -> None:
        self.capacity = capacity
        self.active = 0
        self._registry = registry

    def enter(self) -> bool:
        if self.active >= self.capacity:
            return False
        self.active += 1
        self._registry.set("remote_vae_queue_depth", self.active)
        return True

    def leave(self) -> None:
        self.active -= 1
        self._registry.set("remote_vae_queue_depth", self.active)


REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


async def _serve(host: ModelHost, settings: Settings, admission: Admission, request: Request, op: str | None) -> Response:
    """Authorise, admit, run under the deadline, and log and count the outcome of one request."""
    supplied = request.headers.get("x-request-id", "")
    ex = Exchange(supplied if REQUEST_ID.match(supplied) else uuid.uuid4().hex[:16])
    started = time.perf_counter()
    registry = settings.registry
    if not is_authorized(settings.token, request.headers.get("authorization")):
        registry.inc("remote_vae_rejected_total", reason="auth")
        response = _unauthorized(settings)
    elif not admission.enter():
        registry.inc("remote_vae_rejected_total", reason="queue_full")
        response = _error(503, f"the server is busy ({admission.capacity} requests in progress or queued); retry shortly")
        response.headers["retry-after"] = "1"
    else:
        try:
            response = await asyncio.wait_for(_answer(host, settings, request, op, ex), settings.limits.request_timeout)
        except asyncio.TimeoutError:
            response = _error(504, f"the request took longer than the server's limit of {settings.limits.request_timeout:g} s (--request-timeout)")
        finally:
            admission.leave()
    response.headers["x-request-id"] = ex.request_id
    _account(settings.registry, ex, response, time.perf_counter() - started)
    return response


def _account(registry: Registry, ex: Exchange, response: Response, seconds: float) -> None:
    status = response.status_code
    outcome = "ok" if status < 400 else "client_error" if status < 500 else "server_error"
    model, op = ex.model, ex.op
    registry.inc("remote_vae_requests_total", model=model, op=op, outcome=outcome, status=str(status))
    registry.observe("remote_vae_request_seconds", seconds, model=model, op=op)
    registry.inc("remote_vae_bytes_in_total", ex.bytes_in, model=model)
    registry.inc("remote_vae_bytes_out_total", len(response.body), model=model)
    if status < 400 and op != "-":
        registry.observe("remote_vae_queue_seconds", ex.stats.queue, model=model, op=op)
        registry.observe("remote_vae_compute_seconds", ex.stats.compute, model=model, op=op)
        registry.observe("remote_vae_encode_seconds", ex.render_seconds, model=model, op=op)
        if ex.stats.tiled:
            registry.inc("remote_vae_tiled_total", model=model)
        for kind in ex.stats.fallbacks:
            registry.inc("remote_vae_fallback_total", model=model, kind=kind)
    log.info(
        "request %s %s %s shape=%s status=%d batch=%d queue=%.3fs compute=%.3fs render=%.3fs total=%.3fs%s%s",
        ex.request_id, model, op, ex.shape, status, ex.stats.batch, ex.stats.queue, ex.stats.compute,
        ex.render_seconds, seconds, " tiled" if ex.stats.tiled else "",
        f" fallbacks={','.join(ex.stats.fallbacks)}" if ex.stats.fallbacks else "",
    )  # fmt: skip


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused as soon as it is known to pass `limit` (before reading it all)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit():
        Limits.check_body_length(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        Limits.check_body_length(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _unauthorized(settings: Settings) -> Response:
    response = _error(401, "missing or wrong bearer token: send Authorization: Bearer <token>")
    response.headers["www-authenticate"] = "Bearer"
    return response


def check_model_name(name: str) -> None:
    """Model names become URL paths: plain words that do not shadow the server's own routes."""
    if not name or name in RESERVED_NAMES or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(
            f"model name {name!r} cannot be a URL path here: use letters, digits, '-', '_' or '.', "
            f"and none of {', '.join(sorted(RESERVED_NAMES))}"
        )


async def _answer(host: ModelHost, settings: Settings, request: Request, op: str | None, ex: Exchange) -> Response:
    """Run one request and turn every failure into the right status with a JSON body."""
    try:
        hosted = host.get(request.path_params.get("model") or host.default_name)
        op = op or protocol.operation_for(request.headers.get("content-type"))
        ex.model, ex.op = hosted.name, op
        body = await read_body(request, settings.limits.max_request_bytes)
        ex.bytes_in = len(body)
        if op == DECODE:
            return await _decode(host, settings.limits, hosted, request, body, ex)
        return await _encode(host, settings.limits, hosted, request, body, ex)
    except UnknownModel as exc:
        return _error(404, str(exc))
    except LimitExceeded as exc:
        return _error(exc.status, str(exc))
    except OutOfMemory as exc:
        return _error(507, str(exc))
    except (ProtocolError, PresetError) as exc:
        log.info("400 for %s: %s", request.url.path, exc)
        return _error(400, str(exc))
    except ModelUnavailable as exc:
        return _error(503, str(exc))
    except Exception as exc:  # a server fault: log it whole, answer briefly, keep serving
        log.exception("request to %s failed", request.url.path)
        return _error(500, f"internal server error: {type(exc).__name__}: {str(exc)[:300]}")


async def _decode(host: ModelHost, limits: Limits, hosted: HostedModel, request: Request, body: bytes, ex: Exchange) -> Response:
    # Parsing copies the body and scans it for NaN: CPU work for the pool, not the event loop.
    req = await host.run_cpu(protocol.parse_decode_request, request.query_params.multi_items(), request.headers, body)
    ex.shape = list(req.tensor.shape)
    try:
        latent = prepare_latent(hosted.preset, req.tensor, req.height, req.width)
    except PresetError as exc:
        raise PresetError(_for_model(host, hosted, exc, req.tensor.shape)) from None
    preset = hosted.preset
    frames = preset.frames_for(latent.shape[2]) if latent.ndim == 5 else 1
    limits.check_output(latent.shape[0], frames, latent.shape[-2] * preset.spatial_compression, latent.shape[-1] * preset.spatial_compression)
    spec = postprocess.choose_output(req, preset)
    postprocess.check_output_fits(spec, preset, latent, hosted.name)
    job = JobOptions.from_extensions(req.extensions)
    pixels, ex.stats = await host.decode(hosted.name, latent, req.scaling, spec.device_dtype, job)
    started = time.perf_counter()
    content, headers = await host.run_cpu(postprocess.render_decode, pixels, spec)
    ex.render_seconds = time.perf_counter() - started
    return Response(content, headers=headers)


async def _encode(host: ModelHost, limits: Limits, hosted: HostedModel, request: Request, body: bytes, ex: Exchange) -> Response:
    req = await host.run_cpu(protocol.parse_encode_request, request.query_params.multi_items(), request.headers, body)
    out_dtype = req.extensions.torch_output_dtype(protocol.DTYPES["float32"])
    job = JobOptions.from_extensions(req.extensions)
    pixels = await host.run_cpu(postprocess.encoder_input, req, hosted.preset)
    ex.shape = list(pixels.shape)
    limits.check_output(pixels.shape[0], pixels.shape[2] if pixels.ndim == 5 else 1, pixels.shape[-2], pixels.shape[-1])
    latents, ex.stats = await host.encode(hosted.name, pixels, req.scaling, out_dtype, job)
    content, headers = protocol.tensor_response(latents)  # tensor/binary even for Accept: */*
    return Response(content, headers=headers)


def _for_model(host: ModelHost, hosted: HostedModel, exc: PresetError, shape: tuple[int, ...]) -> str:
    """The preset's complaint, said of this model, with the hosted models the latent would fit."""
    message = str(exc)
    if hosted.name != hosted.preset.name:
        message = f"model {hosted.name} (preset {hosted.preset.name}): {message}"
    fits = [m.name for m in host.models() if m.preset in candidates_for(list(shape))]
    if fits:
        message += "; hosted models that fit: " + ", ".join(f"/{name}" for name in fits)
    return message


def _error(status: int, message: str) -> Response:
    return Response(protocol.error_body(message), status_code=status, media_type=protocol.JSON_TYPE)
