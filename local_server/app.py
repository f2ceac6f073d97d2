"""The server's HTTP face: a Starlette app speaking Hugging Face's remote-VAE protocol (docs/protocol.md).

One request reads top to bottom: pick the model, read the body (`uploads`), take an admission slot
(`limits.Admission`), parse with `remote.protocol`, validate against the preset, run on the device worker
(`jobs.JobRunner`), convert on the CPU pool (`postprocess`), answer (uint8 pixels streamed as they are
rendered and, with our `codec` extension, compressed: `answers`). Around the job routes: the request log
and metrics and the token check, as route middleware; below them, the connection limits (`http_server`).
Errors carry their status (`errors.ServerError`); client mistakes get 4xx JSON naming the bad value,
only the server's own faults get 5xx.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..remote import frames, protocol
from ..remote.frames import Codec
from ..remote.presets import PresetError
from ..remote.protocol import Operation, ProtocolError
from . import answers, memory, postprocess
from .auth import RequireToken, is_authorized
from .backends.base import Shape
from .errors import DeadlineExceeded, ServerError, error_response
from .jobs import DECODE, ENCODE, Job, JobOptions, JobRunner, Op
from .latents import Factors, check_scaling, latent_fits, prepare_latent, preset_factors
from .limits import Admission, Limits
from .metrics import Metrics, server_metrics
from .postprocess import UINT8, OutputSpec, PixelCheck
from .registry import HostedModel, ModelRegistry
from .request_log import Exchange, RequestLog
from .uploads import (
    UploadLimits,
    body_encoding,
    check_packed_length,
    content_encoding,
    offered_encodings,
    read_body,
    unpacked,
)

T = TypeVar("T")

log = logging.getLogger("remote_vae.server")

# Path words a hosted model may not be called, or its routes would shadow ours.
RESERVED_NAMES = frozenset({"predict", "health", "ready", "v1", "metrics", "decode", "encode", "docs"})


@dataclass
class Settings:
    """Server-wide policy: limits, how fast bodies must arrive, the bearer token (None: no auth), CORS
    origins, metrics, the codecs offered for compressed answers and the content codings of packed uploads."""

    limits: Limits = field(default_factory=Limits)
    uploads: UploadLimits = field(default_factory=UploadLimits)
    token: str | None = None
    cors_origins: Sequence[str] = ()
    metrics: Metrics = field(default_factory=server_metrics)
    codecs: tuple[Codec, ...] = field(default_factory=answers.offered_codecs)
    upload_encodings: tuple[str, ...] = field(default_factory=offered_encodings)


def create_app(models: ModelRegistry, settings: Settings | None = None) -> Starlette:
    """The ASGI app serving `models` (the caller owns `models` and closes it)."""
    settings = settings or Settings()
    for name in models.names:
        check_model_name(name)
    metrics = settings.metrics
    endpoints = JobEndpoints(models, settings)

    async def health(request: Request) -> Response:
        return PlainTextResponse("Ok")

    async def list_models(request: Request) -> Response:
        return JSONResponse(
            {
                "default": models.names[0] if models.names else None,
                "models": [m.describe() for m in models.models()],
                "codecs": list(settings.codecs),
                "upload_encodings": list(settings.upload_encodings),
            }
        )

    async def ready(request: Request) -> Response:
        """Readiness for load balancers and probes: 503 while a model is queued or loading, or cannot load.
        Open like /health; why a model is not ready (paths, loader messages) only with the token."""
        reasons = models.not_ready()
        body: dict = {"ready": not reasons, "not_ready": sorted(reasons)}
        if reasons and is_authorized(settings.token, request.headers.get("authorization")):
            body["reasons"] = reasons
        return JSONResponse(body, status_code=503 if reasons else 200)

    async def render_metrics(request: Request) -> Response:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    private = [Middleware(RequireToken, token=settings.token)]
    job = [
        Middleware(RequestLog, metrics=metrics),
        Middleware(
            RequireToken,
            token=settings.token,
            on_refusal=lambda: metrics.inc("remote_vae_rejected_total", reason="auth"),
        ),
    ]
    routes = [
        Route("/", health, methods=["GET"]),
        Route("/", endpoints.predict, methods=["POST"], middleware=job),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"], middleware=private),
        Route("/metrics", render_metrics, methods=["GET"], middleware=private),
        Route("/predict", endpoints.predict, methods=["POST"], middleware=job),
        Route("/{model}", endpoints.predict, methods=["POST"], middleware=job),
        Route("/{model}/predict", endpoints.predict, methods=["POST"], middleware=job),
        Route("/{model}/decode", endpoints.decode, methods=["POST"], middleware=job),
        Route("/{model}/encode", endpoints.encode, methods=["POST"], middleware=job),
    ]
    middleware = []
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["*"],
                expose_headers=["shape", "dtype", "x-request-id", frames.CODEC_HEADER],
            )
        )
    handlers = {
        HTTPException: http_error,
        ServerError: server_error,
        ProtocolError: bad_request,
        PresetError: bad_request,
    }
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)


# --------------------------------------------------------------------------- errors: the one mapping


async def http_error(request: Request, exc: Exception) -> Response:
    """Routing's own: an unknown path or method."""
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")


async def server_error(request: Request, exc: Exception) -> Response:
    """Ours: each error carries its status (and headers)."""
    assert isinstance(exc, ServerError)
    return error_response(exc.status, str(exc), exc.headers)


async def bad_request(request: Request, exc: Exception) -> Response:
    """The codec's and the presets': the request does not follow the protocol or does not fit the model."""
    log.info("400 for %s: %s", request.url.path, exc)
    return error_response(400, str(exc))


# --------------------------------------------------------------------------- the job routes


class JobEndpoints:
    """POST a decode or encode: by path (/{model}/decode, /{model}/encode) or by Content-Type."""

    def __init__(self, models: ModelRegistry, settings: Settings) -> None:
        self.models = models
        self.limits = settings.limits
        self.uploads = settings.uploads
        self.admission = Admission(settings.limits.max_in_flight, settings.metrics)
        self.codecs = settings.codecs
        self.upload_encodings = settings.upload_encodings
        self.jobs = JobRunner(models)
        self._before_body = {"decode": self._check_decode_query, "encode": self._check_encode_query}
        self._answers = {"decode": self._decode, "encode": self._encode}

    async def predict(self, request: Request) -> Response:
        return await self._within_deadline(request, None)

    async def decode(self, request: Request) -> Response:
        return await self._within_deadline(request, "decode")

    async def encode(self, request: Request) -> Response:
        return await self._within_deadline(request, "encode")

    async def _within_deadline(self, request: Request, op: Operation | None) -> Response:
        timeout = self.limits.request_timeout
        request.state.deadline = time.monotonic() + timeout  # a streamed answer keeps to it as it is sent
        try:
            return await asyncio.wait_for(self._answer(request, op), timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(
                f"the request took longer than the server's limit of {timeout:g} s (--request-timeout)"
            ) from None

    async def _answer(self, request: Request, op: Operation | None) -> Response:
        ex: Exchange = request.state.exchange
        hosted = self.models.get(request.path_params.get("model") or self.models.default_name)
        op = op or protocol.operation_for(request.headers.get("content-type"))
        ex.model, ex.op = hosted.name, op
        encoding = body_encoding(request, self.upload_encodings)
        self._before_body[op](hosted, request)  # every limit the query decides, before the body is read
        body = await read_body(request, self.limits, self.uploads)  # before a slot: a slow upload holds none
        ex.bytes_in = len(body)
        if encoding is not None:  # the declared tensor's size passed the limits before it was read
            body = await self.models.workers.on_cpu(unpacked, request, body)
        with self.admission.slot():
            return await until_client_leaves(request, self._answers[op](hosted, request, body, ex))

    # ---------------------------------------------------------------- decode

    def _check_decode_query(self, hosted: HostedModel, request: Request) -> None:
        req = protocol.parse_decode_request(request.query_params.multi_items(), request.headers, None)
        self._checked_decode(hosted, req)
        check_declared_length(request, req.tensor)

    async def _decode(self, hosted: HostedModel, request: Request, body: bytes, ex: Exchange) -> Response:
        # Parsing copies the body and scans it for NaN, the scaling check runs over the latent: CPU work
        # for the pool, not the event loop, unless the latent is small (then a hop costs more than it).
        on_cpu = self.models.workers.on_cpu
        check = on_cpu if len(body) > INLINE_BYTES else _inline
        req = await check(
            protocol.parse_decode_request, request.query_params.multi_items(), request.headers, body
        )
        ex.shape = list(req.tensor.shape)
        latent, spec = self._checked_decode(hosted, req)
        await check(check_scaling, latent, req.scaling, self._factors(hosted), hosted.preset)
        on_device = spec.kind in postprocess.PIXEL_KINDS and self._renders_on_device(hosted)
        out_dtype = torch.uint8 if on_device else spec.device_dtype
        job = Job(DECODE, hosted, req.scaling, out_dtype, JobOptions.from_extensions(req.extensions))
        pixels, ex.stats = await self.jobs.run(job, latent)
        if spec.kind == UINT8:  # sent as it is rendered
            return self._streamed(pixels, spec.codec, request, ex)
        started = time.perf_counter()
        content, headers = await on_cpu(postprocess.render_decode, pixels, spec)
        ex.render_seconds = time.perf_counter() - started
        return Response(content, headers=headers)

    def _renders_on_device(self, hosted: HostedModel) -> bool:
        chosen = self.models.options.render_on_device
        return hosted.device.type == "cuda" if chosen is None else chosen

    def _streamed(
        self, pixels: torch.Tensor, codec: Codec | None, request: Request, ex: Exchange
    ) -> Response:
        workers = self.models.workers
        streaming = answers.Streaming(
            workers.submit_cpu, workers.cpu_threads, request.state.deadline, self.limits.request_timeout, ex
        )
        if codec is None:
            return answers.raw_answer(pixels, streaming)
        return answers.frames_answer(pixels, codec, streaming)

    def _checked_decode(
        self, hosted: HostedModel, req: protocol.DecodeRequest
    ) -> tuple[torch.Tensor, OutputSpec]:
        """The latent unpacked and checked against the model, the limits and the answer's format: first
        on the declared meta tensor (before the body is read), then on the real one."""
        body = nbytes(req.tensor)
        self.limits.check_body(body)
        try:
            latent = prepare_latent(hosted.preset, req.tensor, req.height, req.width)
        except PresetError as exc:
            raise PresetError(self._for_model(hosted, exc, req.tensor.shape)) from None
        preset, audio = hosted.preset, hosted.geometry.audio
        if audio:  # [B,C,L] -> [B,channels,L*s]: its size and memory
            self._check_audio(hosted, DECODE, tuple(latent.shape), body)
        else:
            frames = preset.frames_for(latent.shape[2]) if latent.ndim == 5 else 1
            spatial = preset.spatial_compression
            self.limits.check_output(
                latent.shape[0], frames, latent.shape[-2] * spatial, latent.shape[-1] * spatial
            )
        spec = postprocess.choose_output(req, preset)
        postprocess.check_output_fits(spec, preset, latent, hosted.name)
        answers.check_offered(spec.codec, self.codecs)
        if not audio:
            need = memory.decode_footprint(preset, tuple(latent.shape), hosted.dtype, hosted.device, body)
            self.limits.check_memory(need, hosted.device)
        return latent, spec

    def _factors(self, hosted: HostedModel) -> Factors:
        return hosted.backend.factors() if hosted.backend is not None else preset_factors(hosted.preset)

    # ---------------------------------------------------------------- encode

    def _check_encode_query(self, hosted: HostedModel, request: Request) -> None:
        req = protocol.parse_encode_request(request.query_params.multi_items(), request.headers, None)
        if req.extensions.codec is not None:
            raise ProtocolError(
                f"codec={req.extensions.codec} compresses decode answers only; send encodes without it"
            )
        if req.tensor is not None:  # an image file's size is known from its header, once it is read
            self.limits.check_body(nbytes(req.tensor))
            self._encoder_input(hosted, req, nbytes(req.tensor))
            check_declared_length(request, req.tensor)
        elif hosted.geometry.audio:  # an image file, refused before it is read
            postprocess.audio_input(req, hosted.name, hosted.geometry)

    async def _encode(self, hosted: HostedModel, request: Request, body: bytes, ex: Exchange) -> Response:
        on_cpu = self.models.workers.on_cpu
        req = await on_cpu(
            protocol.parse_encode_request, request.query_params.multi_items(), request.headers, body
        )
        out_dtype = req.extensions.torch_output_dtype(protocol.DTYPES["float32"])
        pixels = await on_cpu(self._encoder_input, hosted, req, len(body))
        ex.shape = list(pixels.shape)
        job = Job(ENCODE, hosted, req.scaling, out_dtype, JobOptions.from_extensions(req.extensions))
        latents, ex.stats = await self.jobs.run(job, pixels)
        content, headers = protocol.tensor_response(latents)  # tensor/binary even for Accept: */*
        return Response(content, headers=headers)

    def _encoder_input(self, hosted: HostedModel, req: protocol.EncodeRequest, body: int) -> torch.Tensor:
        """The request's pixels (or audio) as the encoder takes them, checked against the limits."""
        if not hosted.geometry.audio:
            return postprocess.encoder_input(req, hosted.preset, self._pixel_check(hosted, body))
        audio = postprocess.audio_input(req, hosted.name, hosted.geometry)
        self._check_audio(hosted, ENCODE, tuple(audio.shape), body)
        return audio

    def _check_audio(self, hosted: HostedModel, op: Op, shape: Shape, body: int) -> None:
        """The limits of the audio [B,channels,samples] a decode of latents [B,C,L] (`shape`) makes, or an
        encode of audio (`shape`) receives; the memory estimate is the backend's once it is loaded."""
        geometry, dtype = hosted.geometry, hosted.dtype
        step = geometry.spatial_compression
        samples = shape[2] * step if op is DECODE else shape[2]
        audio = (shape[0], geometry.output_channels, samples)
        self.limits.check_audio(*audio)
        if hosted.backend is None:  # not loaded yet
            per_clip = memory.audio_bytes(samples, dtype)
        else:
            per_clip = op.estimate(hosted.backend, (1, *shape[1:]), dtype)
        need = memory.audio_footprint(audio, per_clip, samples // step, dtype, hosted.device, body)
        self.limits.check_memory(need, hosted.device)

    def _pixel_check(self, hosted: HostedModel, body: int) -> PixelCheck:
        """The limits of an encode's pixels ([B,3,H,W] or [B,3,F,H,W]), checked before they are made."""

        def check(shape: torch.Size) -> None:
            self.limits.check_output(shape[0], shape[2] if len(shape) == 5 else 1, shape[-2], shape[-1])
            need = memory.encode_footprint(hosted.preset, tuple(shape), hosted.dtype, hosted.device, body)
            self.limits.check_memory(need, hosted.device)

        return check

    def _for_model(self, hosted: HostedModel, exc: PresetError, shape: tuple[int, ...]) -> str:
        """The preset's complaint, said of this model, with the hosted models the latent would fit."""
        message = str(exc)
        if hosted.name != hosted.preset.name:
            message = f"model {hosted.name} (preset {hosted.preset.name}): {message}"
        fits = [m.name for m in self.models.models() if latent_fits(m.preset, shape)]
        if fits:
            message += "; hosted models that fit: " + ", ".join(f"/{name}" for name in fits)
        return message


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.nelement() * tensor.element_size()


INLINE_BYTES = 1 << 20  # latents up to this size are parsed and checked on the event loop (<= ~0.5 ms)


async def _inline(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)


def check_declared_length(request: Request, declared: torch.Tensor) -> None:
    """A Content-Length that cannot match the declared tensor is refused before the body is read."""
    length = request.headers.get("content-length", "")
    if not length.isdigit():
        return
    if content_encoding(request) is None:
        protocol.check_body_length(int(length), list(declared.shape), declared.dtype)
    else:  # a packed body (body_encoding allowed its coding)
        check_packed_length(int(length), declared)


async def until_client_leaves(request: Request, work: Coroutine[Any, Any, Response]) -> Response:
    """`work`, cancelled if the client closes the connection first: a job still waiting for its device
    is then dropped and never runs (as when the deadline cancels it)."""
    answer = asyncio.ensure_future(work)
    left = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((answer, left), return_when=asyncio.FIRST_COMPLETED)
        if answer.done():
            return answer.result()
        raise ClientDisconnect("the client closed the connection before its answer was ready")
    finally:
        left.cancel()
        answer.cancel()  # no effect once it is done


async def _disconnected(request: Request) -> None:
    # After the body, the only message left to receive is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def check_model_name(name: str) -> None:
    """Model names become URL paths: plain words that do not shadow the server's own routes."""
    if not name or name in RESERVED_NAMES or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(
            f"model name {name!r} cannot be a URL path here: use letters, digits, '-', '_' or '.', "
            f"and none of {', '.join(sorted(RESERVED_NAMES))}"
        )
