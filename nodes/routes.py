"""HTTP routes the web extension calls: an endpoint health check, the preset table and server tokens.

The logic lives in plain async functions (`check_endpoint`, `preset_descriptions`) so tests can run
them without ComfyUI; `register` puts them on an aiohttp route table, and importing this module inside
ComfyUI registers them on `PromptServer.instance.routes` (ComfyUI mirrors every route under /api).

The health check only ever contacts the scheme, host and port the user typed (no redirects are
followed), gives up after a short timeout, and reports every failure as data in a 200 reply so the
button on the node can show it. It sends a token only where the local configuration binds one.

The token routes write the settings file (`comfy_runtime.tokens_file`); they never send a token back.
"""

from __future__ import annotations

import asyncio
import json
import os
from http import HTTPStatus
from pathlib import Path

import aiohttp
from aiohttp import web
from yarl import URL

from ..remote import tokens
from . import comfy_runtime

DEFAULT_TIMEOUT = 5.0
MAX_PROBES = 4  # /v1/models lookups: up to three paths from the endpoint's own, then the root
MAX_BODY = 1 << 20  # a model list larger than 1 MiB is not a model list
MAX_TOKEN_REQUEST = 1 << 14


class CheckError(Exception):
    """A check that cannot go on; the message is shown on the node."""


# --------------------------------------------------------------------------- the health check


async def check_endpoint(
    endpoint: str, store: tokens.TokenStore | None = None, *, timeout: float = DEFAULT_TIMEOUT
) -> dict:
    """Ask the server behind `endpoint` for `/health` and, where it has one, `/v1/models`.

    Returns `{"ok", "endpoint", "status", "models", "error"}`; never raises for a bad URL, a refused
    connection, a timeout or a reply that is not what a VAE server sends.
    """
    result = {
        "ok": False,
        "endpoint": endpoint,
        "status": None,
        "models": [],
        "ready": None,
        "not_ready": [],
        "error": "",
    }
    try:
        url = parse_endpoint(endpoint)
        headers = auth_headers(str(url), store)
        async with aiohttp.ClientSession(headers=headers) as session:
            await asyncio.wait_for(_check(session, url, result), timeout)
    except CheckError as exc:
        result["error"] = str(exc)
    except asyncio.TimeoutError:
        result["error"] = f"no complete answer from {endpoint} within {timeout:g} s"
    except aiohttp.ClientConnectorError as exc:
        result["error"] = f"cannot connect to {exc.host}:{exc.port}: {exc.os_error.strerror or exc.os_error}"
    except aiohttp.ClientError as exc:
        result["error"] = f"request to {endpoint} failed: {type(exc).__name__}: {exc}"
    result["ok"] = not result["error"]
    return result


async def _check(session: aiohttp.ClientSession, url: URL, result: dict) -> None:
    base, models_status, models = await _find_models(session, url)
    health_url = (base or url) / "health"
    status, body, content_type = await _get(session, health_url)
    result["status"] = status
    if status != 200:
        raise CheckError(
            f"GET {health_url} answered {status} {_reason(status)}{_snippet(body, content_type)}"
        )
    if models_status in (401, 403):
        raise CheckError(
            f"server is up but GET {base / 'v1/models'} answered {models_status}: it wants a token; "
            f"bind one to {url.origin()} in Settings > Remote VAE"
        )
    if models_status is not None and models_status != 200:
        raise CheckError(
            f"server is up but GET {base / 'v1/models'} answered {models_status} {_reason(models_status)}"
        )
    result["models"] = models
    if base is not None:
        result["ready"], result["not_ready"] = await _readiness(session, base)


async def _readiness(session: aiohttp.ClientSession, base: URL) -> tuple[bool | None, list]:
    """The server's `/ready` (ours has one; None when there is none to ask)."""
    status, body, _ = await _get(session, base / "ready")
    if status not in (200, 503):
        return None, []
    try:
        data = json.loads(body.decode("utf-8"))
        return bool(data["ready"]), [str(name) for name in data.get("not_ready", [])]
    except (ValueError, KeyError, TypeError):
        return None, []


async def _find_models(session: aiohttp.ClientSession, url: URL) -> tuple[URL | None, int | None, list]:
    """Probe `/v1/models` at the endpoint path and its parents (an endpoint may name a model path).

    Returns (server base, status of its /v1/models, models); (None, None, []) when no path has one,
    which is what a Hugging Face endpoint looks like.
    """
    for base in candidate_bases(url):
        status, body, content_type = await _get(session, base / "v1/models")
        if status in (404, 405):  # nothing here (405: a route for another method, such as POST /{model})
            continue
        if status != 200:
            return base, status, []
        return base, status, parse_models(body, content_type, base / "v1/models")
    return None, None, []


async def _get(session: aiohttp.ClientSession, url: URL) -> tuple[int, bytes, str]:
    async with session.get(url, allow_redirects=False) as response:
        body = b""
        while len(body) <= MAX_BODY and (chunk := await response.content.read(MAX_BODY + 1 - len(body))):
            body += chunk
        return response.status, body, response.headers.get("Content-Type", "")


# --------------------------------------------------------------------------- pieces, testable alone


def parse_endpoint(endpoint: str) -> URL:
    """The endpoint as a URL without query or fragment; http(s) with a host, or a CheckError."""
    text = (endpoint or "").strip()
    if not text:
        raise CheckError("no endpoint given: type the URL of a VAE server or a Hugging Face endpoint")
    try:
        url = URL(text)
    except ValueError as exc:
        raise CheckError(f"endpoint {text!r} is not a URL: {exc}") from None
    if url.scheme not in ("http", "https"):
        raise CheckError(f"endpoint {text!r} must start with http:// or https://")
    if not url.host:
        raise CheckError(f"endpoint {text!r} has no host name")
    return url.with_query(None).with_fragment(None)


def candidate_bases(url: URL) -> list[URL]:
    """Where `/v1/models` may live: the endpoint path, then its parent paths, always ending at the root."""
    segments = [s for s in url.path.split("/") if s]
    prefixes = ["/" + "/".join(segments[:keep]) for keep in range(len(segments), 0, -1)]
    return [url.origin().with_path(path) for path in prefixes[: MAX_PROBES - 1] + ["/"]]


def auth_headers(url: str, store: tokens.TokenStore | None = None) -> dict[str, str]:
    """`Authorization: Bearer` with the token bound to `url`'s origin, where it may travel (else nothing)."""
    try:
        token = (store or comfy_runtime.local_tokens()).token_for(url)
    except tokens.TokenError as exc:
        raise CheckError(f"the server token configuration cannot be used: {exc}") from None
    return {"Authorization": f"Bearer {token}"} if token else {}


def parse_models(body: bytes, content_type: str, url: URL) -> list:
    """The model list of a `/v1/models` reply: a JSON list, or an object with `models` or `data`."""
    if len(body) > MAX_BODY:
        raise CheckError(f"GET {url} sent more than {MAX_BODY} bytes; that is not a model list")
    try:
        data = json.loads(body.decode("utf-8"))
    except ValueError:
        raise CheckError(f"GET {url} did not answer JSON{_snippet(body, content_type)}") from None
    if isinstance(data, dict):
        data = data.get("models", data.get("data"))
    if not isinstance(data, list):
        raise CheckError(f"GET {url} answered JSON without a model list (expected a list, or 'models')")
    return data


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _snippet(body: bytes, content_type: str) -> str:
    text = body[:200].decode("utf-8", "replace").strip()
    if not text:
        return ""
    kind = f" ({content_type.split(';')[0]})" if content_type else ""
    return f"{kind}: {text!r}"


# --------------------------------------------------------------------------- presets and routes


def preset_descriptions() -> dict:
    """Every preset's `describe()`, in table order, for the node's preset line."""
    from ..remote.presets import PRESETS  # torch comes with it: load it when asked, not at start-up

    return {"presets": [preset.describe() for preset in PRESETS.values()]}


async def health_route(request: web.Request) -> web.Response:
    return web.json_response(await check_endpoint(request.query.get("endpoint", "")))


async def presets_route(request: web.Request) -> web.Response:
    return web.json_response(preset_descriptions())


# --------------------------------------------------------------------------- server tokens


def tokens_path() -> Path:
    path = comfy_runtime.tokens_file()
    if path is None:
        raise web.HTTPServiceUnavailable(text="no ComfyUI user directory to keep tokens in")
    return path


async def list_tokens_route(request: web.Request) -> web.Response:
    """The origins bound in the settings file and in REMOTE_VAE_TOKENS, with their flags; never a token."""
    try:
        saved = [
            {"origin": b.origin, "allow_http": b.allow_http} for b in tokens.read_settings(tokens_path())
        ]
        environment = sorted(tokens.parse_pairs(os.environ.get(tokens.TOKENS_ENV, "")))
    except tokens.TokenError as exc:
        return web.json_response({"servers": [], "environment": [], "error": str(exc)})
    return web.json_response({"servers": saved, "environment": environment})


async def bind_token_route(request: web.Request) -> web.Response:
    """Bind `{"endpoint", "token", "allow_http"}` (or unbind with `"token": null`); answers the origin only."""
    try:
        data = json.loads(await request.content.read(MAX_TOKEN_REQUEST + 1))
        if not isinstance(data, dict) or len(json.dumps(data)) > MAX_TOKEN_REQUEST:
            raise ValueError("expected a small JSON object")
        token = data.get("token")
        if token is not None and not isinstance(token, str):
            raise ValueError("token must be a string, or null to unbind")
        origin = tokens.write_binding(
            tokens_path(), str(data.get("endpoint", "")), token, allow_http=bool(data.get("allow_http"))
        )
    except (ValueError, tokens.TokenError) as exc:  # neither kind of message holds the token
        return web.json_response({"ok": False, "error": str(exc)}, status=400)
    return web.json_response({"ok": True, "origin": origin, "bound": token is not None})


async def conflicts_route(request: web.Request) -> web.Response:
    """Node ids of ours that another pack registered before us (nodes/conflicts.py)."""
    from .conflicts import FOUND

    return web.json_response({"messages": FOUND})


def register(routes: web.RouteTableDef) -> None:
    routes.get("/remote_vae/conflicts")(conflicts_route)
    routes.get("/remote_vae/health")(health_route)
    routes.get("/remote_vae/presets")(presets_route)
    routes.get("/remote_vae/tokens")(list_tokens_route)
    routes.post("/remote_vae/tokens")(bind_token_route)


def _register_with_comfyui() -> bool:
    """Register on ComfyUI's server when running inside ComfyUI; a no-op anywhere else."""
    try:
        import server  # ComfyUI's top-level module
    except ImportError:
        return False
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return False
    register(instance.routes)
    return True


REGISTERED = _register_with_comfyui()
