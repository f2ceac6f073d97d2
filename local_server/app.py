"""The server's HTTP face: a Starlette app speaking Hugging Face's remote-VAE protocol.

One request reads top to bottom: pick the model, parse with `remote.protocol`, validate against the
preset, run on the device worker (`engine.ModelHost`), convert on the CPU pool (`postprocess`),
answer. Client mistakes get 4xx JSON naming the bad value; only the server's own faults get 5xx.
"""

from __future__ import annotations

import logging

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..remote import protocol
from ..remote.presets import PresetError, candidates_for
from ..remote.protocol import ProtocolError
from . import postprocess
from .engine import HostedModel, ModelHost, ModelUnavailable, UnknownModel, prepare_latent

log = logging.getLogger("remote_vae.server")

DECODE, ENCODE = "decode", "encode"
DECODE_TYPES = (protocol.TENSOR_TYPE, "application/octet-stream")
# Path words a hosted model may not be called, or its routes would shadow ours.
RESERVED_NAMES = frozenset({"predict", "health", "v1", "metrics", "decode", "encode", "docs"})


def create_app(host: ModelHost) -> Starlette:
    """The ASGI app serving `host`'s models (the caller owns `host` and closes it)."""
    for name in host.names:
        check_model_name(name)

    async def health(request: Request) -> Response:
        return PlainTextResponse("Ok")

    async def list_models(request: Request) -> Response:
        return JSONResponse({"default": host.names[0] if host.names else None, "models": [m.describe() for m in host.models()]})

    async def predict(request: Request) -> Response:  # POST / and /{model}: decode or encode by Content-Type
        return await _answer(host, request, None)

    async def decode(request: Request) -> Response:
        return await _answer(host, request, DECODE)

    async def encode(request: Request) -> Response:
        return await _answer(host, request, ENCODE)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    routes = [
        Route("/", health, methods=["GET"]),
        Route("/", predict, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/predict", predict, methods=["POST"]),
        Route("/{model}", predict, methods=["POST"]),
        Route("/{model}/predict", predict, methods=["POST"]),
        Route("/{model}/decode", decode, methods=["POST"]),
        Route("/{model}/encode", encode, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


def check_model_name(name: str) -> None:
    """Model names become URL paths: plain words that do not shadow the server's own routes."""
    if not name or name in RESERVED_NAMES or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(
            f"model name {name!r} cannot be a URL path here: use letters, digits, '-', '_' or '.', "
            f"and none of {', '.join(sorted(RESERVED_NAMES))}"
        )


async def _answer(host: ModelHost, request: Request, op: str | None) -> Response:
    """Run one request and turn every failure into the right status with a JSON body."""
    try:
        hosted = host.get(request.path_params.get("model") or host.default_name)
        op = op or operation_for(request.headers.get("content-type"))
        body = await request.body()
        if op == DECODE:
            return await _decode(host, hosted, request, body)
        return await _encode(host, hosted, request, body)
    except UnknownModel as exc:
        return _error(404, str(exc))
    except (ProtocolError, PresetError) as exc:
        log.info("400 for %s: %s", request.url.path, exc)
        return _error(400, str(exc))
    except ModelUnavailable as exc:
        return _error(503, str(exc))
    except Exception as exc:  # a server fault: log it whole, answer briefly, keep serving
        log.exception("request to %s failed", request.url.path)
        return _error(500, f"internal server error: {type(exc).__name__}: {str(exc)[:300]}")


def operation_for(content_type: str | None) -> str:
    """diffusers sends decodes as `tensor/binary` and encodes with no Content-Type at all."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media in DECODE_TYPES:
        return DECODE
    if not media or media.startswith("image/"):
        return ENCODE
    raise ProtocolError(
        f"Content-Type {media!r} is not supported: send {protocol.TENSOR_TYPE} latents to decode, "
        "or an image (no Content-Type, or image/png|jpeg) to encode"
    )


async def _decode(host: ModelHost, hosted: HostedModel, request: Request, body: bytes) -> Response:
    req = protocol.parse_decode_request(request.query_params.multi_items(), request.headers, body)
    try:
        latent = prepare_latent(hosted.preset, req.tensor, req.height, req.width)
    except PresetError as exc:
        raise PresetError(_for_model(host, hosted, exc, req.tensor.shape)) from None
    spec = postprocess.choose_output(req, hosted.preset)
    postprocess.check_output_fits(spec, hosted.preset, latent, hosted.name)
    pixels = await host.decode(hosted.name, latent, req.scaling, spec.device_dtype)
    content, headers = await host.run_cpu(postprocess.render_decode, pixels, spec)
    return Response(content, headers=headers)


async def _encode(host: ModelHost, hosted: HostedModel, request: Request, body: bytes) -> Response:
    req = protocol.parse_encode_request(request.query_params.multi_items(), request.headers, body)
    out_dtype = postprocess.output_dtype(req.extensions, default=protocol.DTYPES["float32"])
    pixels = await host.run_cpu(postprocess.encoder_input, req, hosted.preset)
    latents = await host.encode(hosted.name, pixels, req.scaling, out_dtype)
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
