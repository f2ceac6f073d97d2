"""The web extension's routes: endpoint health check and preset table, against real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import types

import aiohttp
import pytest
from aiohttp import web

from remote_vae.nodes import routes
from remote_vae.nodes.routes import CheckError, auth_headers, candidate_bases, check_endpoint, parse_endpoint
from remote_vae.remote import tokens
from remote_vae.remote.presets import PRESETS
from support.net import free_port

pytestmark = pytest.mark.timeout(60)

MODELS = [{"name": "sd15", "preset": PRESETS["sd15"].describe(), "state": "loaded"}]


@contextlib.asynccontextmanager
async def serve(handlers: dict, seen: list | None = None):
    """A real aiohttp server on 127.0.0.1 answering `handlers` ({path: handler}); yields its base URL.

    Every request's path and Authorization header is appended to `seen`.
    """

    @web.middleware
    async def record(request, handler):
        if seen is not None:
            seen.append((request.path, request.headers.get("Authorization")))
        return await handler(request)

    app = web.Application(middlewares=[record])
    for path, handler in handlers.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def json_reply(data, status=200):
    async def handler(request):
        return web.json_response(data, status=status)

    return handler


def text_reply(text, status=200, content_type="text/plain"):
    async def handler(request):
        return web.Response(text=text, status=status, content_type=content_type)

    return handler


OK_HEALTH = {"/health": json_reply({"status": "ok"})}


def run_check(handlers, endpoint_path="/", bind=None, timeout=routes.DEFAULT_TIMEOUT):
    """Serve `handlers`, check `<base><endpoint_path>` (with the token `bind` bound to the server's origin),
    return (result, requests seen, base URL)."""

    async def scenario():
        seen: list = []
        async with serve(handlers, seen) as base:
            store = tokens.TokenStore({base: bind}) if bind else None
            result = await check_endpoint(base + endpoint_path, store, timeout=timeout)
        return result, seen, base

    return asyncio.run(scenario())


# --------------------------------------------------------------------------- healthy servers


def test_our_server_reports_health_and_models():
    result, seen, base = run_check({**OK_HEALTH, "/v1/models": json_reply({"models": MODELS})})
    assert result == {
        "ok": True, "endpoint": base + "/", "status": 200, "models": MODELS, "ready": None, "not_ready": [], "error": "",
    }  # fmt: skip
    assert [path for path, _ in seen] == ["/v1/models", "/health", "/ready"]


@pytest.mark.parametrize(
    ("status", "answer", "ready", "not_ready"),
    [(200, {"ready": True, "not_ready": []}, True, []), (503, {"ready": False, "not_ready": ["flux"]}, False, ["flux"]),
     (503, {"no": "json we know"}, None, []), (500, {"ready": True}, None, [])],
)  # fmt: skip
def test_readiness_is_reported(status, answer, ready, not_ready):
    handlers = {
        **OK_HEALTH,
        "/v1/models": json_reply({"models": MODELS}),
        "/ready": json_reply(answer, status=status),
    }
    result, _, _ = run_check(handlers)
    assert result["ok"] is True and (result["ready"], result["not_ready"]) == (ready, not_ready)


def test_model_path_in_endpoint_is_stripped_to_find_the_server():
    result, seen, _ = run_check({**OK_HEALTH, "/v1/models": json_reply(MODELS)}, "/models/sd15?x=1")
    assert result["ok"] and result["models"] == MODELS
    assert [path for path, _ in seen] == [
        "/models/sd15/v1/models",
        "/models/v1/models",
        "/v1/models",
        "/health",
        "/ready",
    ]


def test_paths_that_answer_405_are_skipped_like_404():
    handlers = {
        **OK_HEALTH,
        "/m/v1/models": text_reply("POST only", status=405),
        "/v1/models": json_reply(MODELS),
    }
    result, seen, _ = run_check(handlers, "/m")
    assert result["ok"] and result["models"] == MODELS
    assert [path for path, _ in seen] == ["/m/v1/models", "/v1/models", "/health", "/ready"]


def test_model_list_under_openai_style_data_key():
    result, _, _ = run_check({**OK_HEALTH, "/v1/models": json_reply({"object": "list", "data": MODELS})})
    assert result["ok"] and result["models"] == MODELS


def test_hf_style_endpoint_reports_health_only():
    result, seen, _ = run_check(OK_HEALTH)
    assert result["ok"] is True
    assert result["status"] == 200 and result["models"] == [] and result["error"] == ""
    assert [path for path, _ in seen] == ["/v1/models", "/health"]


def test_health_is_asked_at_the_endpoint_path_when_no_server_base_is_found():
    result, seen, _ = run_check({"/ep/health": json_reply({})}, "/ep")
    assert result["ok"] is True
    assert [path for path, _ in seen] == ["/ep/v1/models", "/v1/models", "/ep/health"]


# --------------------------------------------------------------------------- tokens


def test_the_token_bound_to_the_servers_origin_is_sent(monkeypatch):
    monkeypatch.setenv("REMOTE_VAE_TOKEN", "never-sent")  # an unbound variable is not read

    async def models(request):
        if request.headers.get("Authorization") != "Bearer s3cret":
            return web.json_response({"error": "unauthorized"}, status=401)
        return web.json_response(MODELS)

    result, seen, _ = run_check({**OK_HEALTH, "/v1/models": models}, bind="s3cret")
    assert result["ok"] and result["models"] == MODELS
    assert seen == [
        ("/v1/models", "Bearer s3cret"),
        ("/health", "Bearer s3cret"),
        ("/ready", "Bearer s3cret"),
    ]
    assert "s3cret" not in json.dumps(result)


def test_missing_token_is_reported_as_needing_one(monkeypatch):
    monkeypatch.delenv(tokens.TOKENS_ENV, raising=False)
    handlers = {**OK_HEALTH, "/v1/models": json_reply({"error": "unauthorized"}, status=401)}
    result, seen, base = run_check(handlers)
    assert result["ok"] is False and result["status"] == 200
    assert result["error"] == (
        f"server is up but GET {base}/v1/models answered 401: it wants a token; "
        f"bind one to {base} in Settings > Remote VAE"
    )
    assert all(auth is None for _, auth in seen)


def test_a_broken_token_configuration_is_reported_before_any_request(monkeypatch):
    monkeypatch.setenv(tokens.TOKENS_ENV, "AWS_SECRET_VALUE_PASTED")
    result, seen, _ = run_check(OK_HEALTH)
    assert result["ok"] is False and result["status"] is None
    assert result["error"].startswith(
        "the server token configuration cannot be used: REMOTE_VAE_TOKENS holds"
    )
    assert "AWS_SECRET" not in result["error"] and seen == []


def test_auth_headers_only_for_the_bound_origin():
    store = tokens.TokenStore({"http://127.0.0.1:8190": "abc"})
    assert auth_headers("http://127.0.0.1:8190/sd15", store) == {"Authorization": "Bearer abc"}
    assert auth_headers("http://127.0.0.1:8191/sd15", store) == {}
    assert auth_headers("https://elsewhere.example/", store) == {}


# --------------------------------------------------------------------------- errors as data


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ("", "no endpoint given: type the URL of a VAE server or a Hugging Face endpoint"),
        ("   ", "no endpoint given: type the URL of a VAE server or a Hugging Face endpoint"),
        ("ftp://127.0.0.1/", "endpoint 'ftp://127.0.0.1/' must start with http:// or https://"),
        ("file:///etc/passwd", "endpoint 'file:///etc/passwd' must start with http:// or https://"),
        ("127.0.0.1:8000", "endpoint '127.0.0.1:8000' must start with http:// or https://"),
        ("http://", "endpoint 'http://' has no host name"),
    ],
)
def test_bad_endpoints_are_refused_without_a_request(endpoint, message):
    result = asyncio.run(check_endpoint(endpoint))
    assert result == {
        "ok": False, "endpoint": endpoint, "status": None, "models": [], "ready": None, "not_ready": [], "error": message,
    }  # fmt: skip


def test_refused_connection():
    port = free_port()
    result = asyncio.run(check_endpoint(f"http://127.0.0.1:{port}/"))
    assert result["ok"] is False and result["status"] is None
    assert result["error"].startswith(f"cannot connect to 127.0.0.1:{port}: ")


def test_timeout():
    async def slow(request):
        await asyncio.sleep(5)
        return web.json_response(MODELS)

    result, seen, base = run_check({**OK_HEALTH, "/v1/models": slow}, timeout=0.3)
    assert result["ok"] is False and result["status"] is None
    assert result["error"] == f"no complete answer from {base}/ within 0.3 s"
    assert [path for path, _ in seen] == ["/v1/models"]


def test_non_json_model_list():
    handlers = {**OK_HEALTH, "/v1/models": text_reply("<html>hi</html>", content_type="text/html")}
    result, _, base = run_check(handlers)
    assert result["ok"] is False and result["models"] == []
    assert result["error"] == f"GET {base}/v1/models did not answer JSON (text/html): '<html>hi</html>'"


def test_json_without_a_model_list():
    result, _, base = run_check({**OK_HEALTH, "/v1/models": json_reply({"hello": 1})})
    assert result["ok"] is False
    assert (
        result["error"]
        == f"GET {base}/v1/models answered JSON without a model list (expected a list, or 'models')"
    )


def test_oversized_model_list():
    big = "x" * (routes.MAX_BODY + 10)
    result, _, base = run_check({**OK_HEALTH, "/v1/models": text_reply(big)})
    assert result["ok"] is False
    assert (
        result["error"]
        == f"GET {base}/v1/models sent more than {routes.MAX_BODY} bytes; that is not a model list"
    )


def test_nothing_there_is_a_404():
    result, seen, base = run_check({})
    assert result["ok"] is False and result["status"] == 404
    assert result["error"].startswith(f"GET {base}/health answered 404 Not Found (text/plain): ")
    assert [path for path, _ in seen] == ["/v1/models", "/health"]


def test_server_error_on_model_list():
    result, _, base = run_check({**OK_HEALTH, "/v1/models": text_reply("boom", status=500)})
    assert result["ok"] is False and result["status"] == 200
    assert result["error"] == f"server is up but GET {base}/v1/models answered 500 Internal Server Error"


def test_unhealthy_server_reports_its_status_and_body():
    handlers = {"/health": text_reply("loading", status=503), "/v1/models": json_reply(MODELS)}
    result, _, base = run_check(handlers)
    assert result["ok"] is False and result["status"] == 503
    assert result["error"] == f"GET {base}/health answered 503 Service Unavailable (text/plain): 'loading'"


def test_redirects_to_other_hosts_are_not_followed():
    async def scenario():
        elsewhere: list = []
        async with serve(OK_HEALTH, elsewhere) as other:

            async def away(request):
                raise web.HTTPFound(other + "/health")

            seen: list = []
            async with serve({"/health": away}, seen) as base:
                result = await check_endpoint(base + "/")
        return result, seen, elsewhere

    result, seen, elsewhere = asyncio.run(scenario())
    assert result["ok"] is False and result["status"] == 302
    assert elsewhere == []
    assert [path for path, _ in seen] == ["/v1/models", "/health"]


def test_parse_endpoint_and_candidate_bases():
    url = parse_endpoint(" https://h.example:8443/a/b/c/d?q=1#x ")
    assert str(url) == "https://h.example:8443/a/b/c/d"
    assert [str(u) for u in candidate_bases(url)] == [
        "https://h.example:8443/a/b/c/d",
        "https://h.example:8443/a/b/c",
        "https://h.example:8443/a/b",
        "https://h.example:8443/",
    ]
    with pytest.raises(CheckError, match="is not a URL"):
        parse_endpoint("http://[::1")


# --------------------------------------------------------------------------- the routes themselves


@contextlib.asynccontextmanager
async def our_routes():
    """Our routes on an aiohttp app on a free 127.0.0.1 port; yields its base URL."""
    table = web.RouteTableDef()
    routes.register(table)
    app = web.Application()
    app.add_routes(table)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    finally:
        await runner.cleanup()


def test_routes_answer_over_http():
    async def scenario():
        async with our_routes() as ours:
            async with (
                serve({**OK_HEALTH, "/v1/models": json_reply(MODELS)}) as vae,
                aiohttp.ClientSession() as s,
            ):
                async with s.get(f"{ours}/remote_vae/presets") as r:
                    presets = (r.status, await r.json())
                async with s.get(f"{ours}/remote_vae/health", params={"endpoint": vae}) as r:
                    good = (r.status, await r.json())
                async with s.get(f"{ours}/remote_vae/health?endpoint=ftp://x") as r:
                    bad = (r.status, await r.json())
                return presets, good, bad, vae

    presets, good, bad, vae = asyncio.run(scenario())
    assert presets == (200, {"presets": json.loads(json.dumps([p.describe() for p in PRESETS.values()]))})
    assert good == (
        200, {"ok": True, "endpoint": vae, "status": 200, "models": MODELS, "ready": None, "not_ready": [], "error": ""}
    )  # fmt: skip
    assert bad[0] == 200 and bad[1]["ok"] is False
    assert bad[1]["error"] == "endpoint 'ftp://x' must start with http:// or https://"


def test_registers_on_comfyui_prompt_server_only_when_there_is_one(monkeypatch):
    fake = types.ModuleType("server")
    monkeypatch.setitem(sys.modules, "server", fake)
    assert routes._register_with_comfyui() is False  # a module named server that is not ComfyUI's

    table = web.RouteTableDef()
    fake.PromptServer = types.SimpleNamespace(instance=types.SimpleNamespace(routes=table))
    assert routes._register_with_comfyui() is True
    assert sorted(f"{route.method} {route.path}" for route in table) == [
        "GET /remote_vae/conflicts", "GET /remote_vae/health", "GET /remote_vae/presets", "GET /remote_vae/tokens",
        "POST /remote_vae/tokens",
    ]  # fmt: skip


def test_token_routes_bind_and_list_origins_and_never_answer_a_token(monkeypatch, tmp_path):
    settings = tmp_path / "user" / "remote_vae" / "tokens.json"
    monkeypatch.setattr(routes.comfy_runtime, "tokens_file", lambda: settings)
    monkeypatch.setenv(tokens.TOKENS_ENV, "https://from-env.example=env-secret")
    secret = "s3cret-bound-token"

    async def models(request):
        ok = request.headers.get("Authorization") == f"Bearer {secret}"
        return web.json_response(MODELS if ok else {"error": "unauthorized"}, status=200 if ok else 401)

    async def scenario():
        answers = []
        async with our_routes() as ours, serve({**OK_HEALTH, "/v1/models": models}) as vae:
            async with aiohttp.ClientSession() as s:
                for body in (
                    {"endpoint": vae + "/sd15", "token": secret},
                    {"endpoint": "http://10.0.0.9:8190/x", "token": "lan-token", "allow_http": True},
                    {"endpoint": vae, "token": secret + "\u20ac"},
                    {"endpoint": "ftp://nowhere", "token": secret},
                    [secret],
                ):
                    async with s.post(f"{ours}/remote_vae/tokens", json=body) as r:
                        answers.append((r.status, await r.text()))
                async with s.get(f"{ours}/remote_vae/tokens") as r:
                    listed = (r.status, await r.text())
                async with s.get(f"{ours}/remote_vae/health", params={"endpoint": vae}) as r:
                    health = await r.json()
                async with s.post(f"{ours}/remote_vae/tokens", json={"endpoint": vae, "token": None}) as r:
                    answers.append((r.status, await r.text()))
        return answers, listed, health, vae

    answers, listed, health, vae = asyncio.run(scenario())
    assert [status for status, _ in answers] == [200, 200, 400, 400, 400, 200]
    assert json.loads(answers[0][1]) == {"ok": True, "origin": vae, "bound": True}
    assert "cannot travel in an HTTP header" in answers[2][1] and "is not an http(s) URL" in answers[3][1]
    assert json.loads(listed[1]) == {
        "servers": [
            {"origin": vae, "allow_http": False},
            {"origin": "http://10.0.0.9:8190", "allow_http": True},
        ],
        "environment": ["https://from-env.example"],
    }
    assert all(secret not in text and "env-secret" not in text for _, text in [*answers, listed])
    assert health["ok"] and health["models"] == MODELS  # the check sends the token bound in the file
    assert json.loads(answers[-1][1])["bound"] is False
    assert [b.origin for b in tokens.read_settings(settings)] == ["http://10.0.0.9:8190"]


def test_token_routes_need_a_user_directory(monkeypatch):
    monkeypatch.setattr(routes.comfy_runtime, "tokens_file", lambda: None)

    async def scenario():
        async with our_routes() as ours, aiohttp.ClientSession() as s:
            async with s.get(f"{ours}/remote_vae/tokens") as r:
                return r.status, await r.text()

    assert asyncio.run(scenario()) == (503, "no ComfyUI user directory to keep tokens in")
