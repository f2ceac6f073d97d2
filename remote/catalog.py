"""What a server hosts: one model's geometry, from the server's own model list (`GET /v1/models`).

A model URL names a server and a model: `http://host:8190/sd15` is model `sd15` of the server at
`http://host:8190` (a trailing `/decode`, `/encode` or `/predict` is dropped; no model: the server's
default). Our server describes each model's shapes there (docs/protocol.md, "Other routes"); for models
of its `comfy` backend, which have no preset row, that description is the only truth a client has.
Hugging Face endpoints have no model list.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, replace
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import requests

from .errors import RemoteVAEError, display_url, server_message, server_root, status_hint
from .frames import CODECS, Codec
from .presets import Preset
from .protocol import FLOAT_DTYPES, FloatDtype
from .sending import split_endpoints
from .tokens import TokenStore
from .transport import authorization, connection_error, thread_session

Dims = Literal["image", "video", "audio"]
OPERATION_PATHS = ("decode", "encode", "predict")
MAX_LIST_BYTES = 1 << 20  # a model list larger than 1 MiB is not a model list
MODELS_PATH = "v1/models"
DIMS_OF_PRESET: dict[int, Dims] = {1: "audio", 2: "image", 3: "video"}
NEEDS_OUR_SERVER = "the model list comes from a remote-vae server (remote-vae-server); check the URL"
KNOWN_FOR = 300.0  # seconds a looked-up description is reused (a server that was not asked again)
UNKNOWN_FOR = 30.0  # seconds a failed look-up is remembered


@dataclass(frozen=True)
class ServerModel:
    """One hosted model as its server describes it: where it is, which backend runs it, its shapes."""

    name: str
    server: str  # the server's base URL
    backend: str
    dims: Dims
    latent_channels: int
    spatial_compression: int  # pixels per latent pixel per side (audio: samples per latent step)
    temporal_compression: int = 1  # frames per latent frame
    output_channels: int = 3  # colour channels, or audio channels
    sample_rate: int | None = None  # of audio models
    still_image: bool = False  # video-shaped latents of one frame, each one image
    dtype: FloatDtype | None = None  # what the model runs in: latents sent in it change nothing
    codecs: tuple[Codec, ...] = ()  # what its server can compress frames with (frames.CODECS)
    upload_encodings: tuple[str, ...] = ()  # the content codings its server unpacks (planes.ENCODING)

    def preset(self) -> Preset:
        """The geometry as a preset row (no scaling factors: the nodes send raw latents)."""
        return Preset(
            name=self.name,
            label=f"{self.name} at {self.server}",
            latent_channels=self.latent_channels,
            dims={"audio": 1, "image": 2, "video": 3}[self.dims],
            spatial_compression=self.spatial_compression,
            temporal_compression=self.temporal_compression,
            still_image=self.still_image,
        )


def split_model_url(url: str) -> tuple[str, str | None]:
    """(server base URL, model name or None for the server's default) of a model URL."""
    parts = urlsplit(url.strip())
    segments = [s for s in parts.path.split("/") if s]
    if segments and segments[-1] in OPERATION_PATHS:
        segments.pop()
    model = segments.pop() if segments else None
    base = urlunsplit((parts.scheme, parts.netloc, "/".join(["", *segments]), "", ""))
    return base.rstrip("/"), model


def describe_model(endpoint: str, *, tokens: TokenStore | None = None, timeout: float = 10.0) -> ServerModel:
    """The model `endpoint` names, as its server describes it. Several endpoints (commas or spaces) host
    the same model: the first that answers describes it. Raises RemoteVAEError naming what failed."""
    failures: list[RemoteVAEError] = []
    for one in split_endpoints(endpoint):
        try:
            model = _describe_one(one, tokens or TokenStore.load(), timeout)
        except RemoteVAEError as exc:
            if exc.status is not None and not exc.retryable:
                raise  # the server answered: another one hosting the same model would say the same
            failures.append(exc)
            continue
        _remember(one, model, KNOWN_FOR)  # what `known_model` would ask for next in the same run
        return model
    if not failures:
        raise RemoteVAEError(
            repr(endpoint), "names no server", hint="enter a URL such as http://127.0.0.1:8190/sd15"
        )
    if len(failures) == 1:
        raise failures[0]
    raise RemoteVAEError(
        endpoint, "could not be asked for its model: " + "; ".join(str(f) for f in failures),
        hint="are the servers running and reachable?",
    )  # fmt: skip


_known: dict[str, tuple[float, ServerModel | None]] = {}
_known_lock = threading.Lock()


def known_model(
    endpoint: str, *, tokens: TokenStore | None = None, timeout: float = 10.0
) -> ServerModel | None:
    """`describe_model`, reused for KNOWN_FOR seconds per endpoint; None where it fails (a Hugging Face
    endpoint or another server has no model list; one that cannot be reached says so when used). A
    `describe_model` of the same endpoint counts as a look-up: a run that described it asks once."""
    with _known_lock:
        cached = _known.get(endpoint)
    if cached is not None and cached[0] > time.monotonic():
        return cached[1]
    try:
        model: ServerModel | None = describe_model(endpoint, tokens=tokens, timeout=timeout)
    except RemoteVAEError:
        model = None
    _remember(endpoint, model, KNOWN_FOR if model else UNKNOWN_FOR)
    return model


def _remember(endpoint: str, model: ServerModel | None, seconds: float) -> None:
    with _known_lock:
        _known[endpoint] = (time.monotonic() + seconds, model)


def forget_known_models() -> None:
    with _known_lock:
        _known.clear()


def _describe_one(url: str, tokens: TokenStore, timeout: float) -> ServerModel:
    base, name = split_model_url(url)
    listing = _get_model_list(f"{base}/{MODELS_PATH}", tokens, timeout)
    models = listing.get("models")
    if not isinstance(models, list):
        raise RemoteVAEError(
            display_url(f"{base}/{MODELS_PATH}"),
            "answered 200 without a model list",
            status=200,
            hint=NEEDS_OUR_SERVER,
        )
    wanted = name if name is not None else listing.get("default")
    codecs = listing.get("codecs")
    offered = tuple(c for c in CODECS if isinstance(codecs, list) and c in codecs)
    encodings = listing.get("upload_encodings")
    unpacks = tuple(e for e in encodings if isinstance(e, str)) if isinstance(encodings, list) else ()
    for entry in models:
        if isinstance(entry, dict) and entry.get("name") == wanted:
            return replace(_server_model(entry, base), codecs=offered, upload_encodings=unpacks)
    hosted = ", ".join(f"/{m.get('name')}" for m in models if isinstance(m, dict)) or "none"
    what = f"model {wanted!r} is not hosted there" if wanted else "no default model is hosted there"
    raise RemoteVAEError(
        display_url(url), f"names no model of the server at {base}: {what}; hosted models: {hosted}",
        status=404, hint=f"use one of the hosted models, such as {base}/{hosted.split(', ')[0].lstrip('/')}",
    )  # fmt: skip


def _get_model_list(url: str, tokens: TokenStore, timeout: float) -> dict:
    where = display_url(url)
    token, advice = authorization(url, where, {"tokens": tokens})
    headers = {"Accept": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        with thread_session().get(
            url, headers=headers, timeout=timeout, stream=True, allow_redirects=False
        ) as reply:
            body = reply.raw.read(MAX_LIST_BYTES + 1, decode_content=True)
            status = reply.status_code
    except requests.Timeout:
        raise RemoteVAEError(
            where,
            f"did not answer within {timeout:g} s",
            hint=f"is the server running at {server_root(url)}?",
        ) from None
    except requests.ConnectionError as exc:
        raise connection_error(where, url, exc, token) from None
    except requests.RequestException as exc:
        raise RemoteVAEError(where, f"failed: {type(exc).__name__}", hint="check the endpoint URL") from None
    if status != 200:
        hint = NEEDS_OUR_SERVER if status == 404 else status_hint(status, token is not None, advice)
        message = server_message(body[:MAX_LIST_BYTES]) or "no message"
        raise RemoteVAEError(
            where,
            f"answered {status}: {message}",
            status=status,
            hint=hint,
            retryable=status in (429, 502, 503, 504),
        )
    if len(body) > MAX_LIST_BYTES:
        raise RemoteVAEError(
            where,
            f"answered more than {MAX_LIST_BYTES} bytes: not a model list",
            status=status,
            hint=NEEDS_OUR_SERVER,
        )
    try:
        listing = json.loads(body)
    except (ValueError, RecursionError):
        listing = None
    if not isinstance(listing, dict):
        raise RemoteVAEError(
            where,
            "answered 200 with something that is not a JSON model list",
            status=status,
            hint=NEEDS_OUR_SERVER,
        )
    return listing


def _server_model(entry: dict, base: str) -> ServerModel:
    """A model list entry: its `geometry` (servers since the comfy backend), else its preset's shapes."""
    name = str(entry["name"])
    geometry = entry.get("geometry") or _geometry_of_preset(entry.get("preset"))
    try:
        return ServerModel(
            name=name,
            server=base,
            backend=str(entry.get("backend", "diffusers")),
            dims=_dims(geometry["dims"]),
            latent_channels=_positive(geometry["latent_channels"]),
            spatial_compression=_positive(geometry["spatial_compression"]),
            temporal_compression=_positive(geometry.get("temporal_compression") or 1),
            output_channels=_positive(geometry.get("output_channels") or 3),
            sample_rate=None if geometry.get("sample_rate") is None else _positive(geometry["sample_rate"]),
            still_image=bool(geometry.get("still_image", False)),
            dtype=entry.get("dtype") if entry.get("dtype") in FLOAT_DTYPES else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise RemoteVAEError(
            display_url(f"{base}/{name}"), f"is described without a usable geometry ({type(exc).__name__}: {exc})",
            status=200, hint="update the server: remote-vae-server describes every model's geometry in /v1/models",
        ) from None  # fmt: skip


def _geometry_of_preset(preset: object) -> dict:
    if not isinstance(preset, dict):
        raise RemoteVAEError(
            "/v1/models", "entry has neither a geometry nor a preset", status=200, hint=NEEDS_OUR_SERVER
        )
    return {**preset, "dims": DIMS_OF_PRESET.get(preset.get("dims"), preset.get("dims"))}


def _dims(value: object) -> Dims:
    if value not in ("image", "video", "audio"):
        raise ValueError(f"dims {value!r} is not image, video or audio")
    return value  # type: ignore[return-value]


def _positive(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{value!r} is not a positive integer")
    return value
