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


def run_check(handlers, endpoint_path="/", token_env="", timeout=routes.DEFAULT_TIMEOUT):
    """Serve `handlers`, check `<base><endpoint_path>`, return (result, requests seen, base URL)."""

    async def scenario():
        seen: list = []
        async with serve(handlers, seen) as base:
            result = await check_endpoint(base + endpoint_path, token_env, timeout=timeout)
        return result, seen, base

    return asyncio.run(scenario())


# --------------------------------------------------------------------------- healthy servers


def test_our_server_reports_health_and_models():
    result, seen, base = run_check({**OK_HEALTH, "/v1/models": json_reply({"models": MODELS})})
    assert result == {"ok": True, "endpoint": base + "/", "status": 200, "models": MODELS, "error": ""}
    assert [path for path, _ in seen] == ["/v1/models", "/health"]


def test_model_path_in_endpoint_is_stripped_to_find_the_server():
    result, seen, _ = run_check({**OK_HEALTH, "/v1/models": json_reply(MODELS)}, "/models/sd15?x=1")
    assert result["ok"] and result["models"] == MODELS
    assert [path for path, _ in seen] == [
        "/models/sd15/v1/models",
        "/models/v1/models",
        "/v1/models",
        "/health",
    ]


def test_paths_that_answer_405_are_skipped_like_404():
    handlers = {**OK_HEALTH, "/m/v1/models": text_reply("POST only", status=405), "/v1/models": json_reply(MODELS)}
    result, seen, _ = run_check(handlers, "/m")
    assert result["ok"] and result["models"] == MODELS
    assert [path for path, _ in seen] == ["/m/v1/models", "/v1/models", "/health"]


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


def test_token_from_the_named_environment_variable_is_sent(monkeypatch):
    monkeypatch.setenv("REMOTE_VAE_TEST_TOKEN", "s3cret")

    async def models(request):
        if request.headers.get("Authorization") != "Bearer s3cret":
            return web.json_response({"error": "unauthorized"}, status=401)
        return web.json_response(MODELS)

    result, seen, _ = run_check({**OK_HEALTH, "/v1/models": models}, token_env="REMOTE_VAE_TEST_TOKEN")
    assert result["ok"] and result["models"] == MODELS
    assert seen == [("/v1/models", "Bearer s3cret"), ("/health", "Bearer s3cret")]
    assert "s3cret" not in json.dumps(result)


def test_missing_token_is_reported_as_needing_one(monkeypatch):
    monkeypatch.delenv("REMOTE_VAE_TEST_TOKEN", raising=False)
    handlers = {**OK_HEALTH, "/v1/models": json_reply({"error": "unauthorized"}, status=401)}
    result, seen, base = run_check(handlers, token_env="REMOTE_VAE_TEST_TOKEN")
    assert result["ok"] is False and result["status"] == 200
    assert result["error"] == (
        f"server is up but GET {base}/v1/models answered 401: it wants a token; "
        "set token_env to the name of an environment variable that holds it"
    )
    assert all(auth is None for _, auth in seen)


@pytest.mark.parametrize("name", ["AWS_SECRET_ACCESS_KEY", "PATH", "HF-TOKEN", "TOKEN;rm"])
def test_token_env_that_is_not_a_token_name_is_refused_before_any_request(name, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-send")
    result, seen, _ = run_check(OK_HEALTH, token_env=name)
    assert result["ok"] is False and result["status"] is None
    assert result["error"].startswith(f"token_env {name!r} is not allowed here")
    assert seen == []


def test_auth_headers_are_empty_for_no_name_or_an_unset_variable(monkeypatch):
    monkeypatch.delenv("REMOTE_VAE_TEST_TOKEN", raising=False)
    assert auth_headers("") == {}
    assert auth_headers("REMOTE_VAE_TEST_TOKEN") == {}
    monkeypatch.setenv("hf_token", " abc ")
    assert auth_headers("hf_token") == {"Authorization": "Bearer abc"}


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
    assert result == {"ok": False, "endpoint": endpoint, "status": None, "models": [], "error": message}


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
    assert result["error"] == f"GET {base}/v1/models answered JSON without a model list (expected a list, or 'models')"


def test_oversized_model_list():
    big = "x" * (routes.MAX_BODY + 10)
    result, _, base = run_check({**OK_HEALTH, "/v1/models": text_reply(big)})
    assert result["ok"] is False
    assert result["error"] == f"GET {base}/v1/models sent more than {routes.MAX_BODY} bytes; that is not a model list"


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


def test_routes_answer_over_http():
    async def scenario():
        table = web.RouteTableDef()
        routes.register(table)
        app = web.Application()
        app.add_routes(table)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            async with serve({**OK_HEALTH, "/v1/models": json_reply(MODELS)}) as vae, aiohttp.ClientSession() as s:
                async with s.get(f"http://127.0.0.1:{port}/remote_vae/presets") as r:
                    presets = (r.status, await r.json())
                async with s.get(f"http://127.0.0.1:{port}/remote_vae/health", params={"endpoint": vae}) as r:
                    good = (r.status, await r.json())
                async with s.get(f"http://127.0.0.1:{port}/remote_vae/health?endpoint=ftp://x") as r:
                    bad = (r.status, await r.json())
                return presets, good, bad, vae
        finally:
            await runner.cleanup()

    presets, good, bad, vae = asyncio.run(scenario())
    assert presets == (200, {"presets": json.loads(json.dumps([p.describe() for p in PRESETS.values()]))})
    assert good == (200, {"ok": True, "endpoint": vae, "status": 200, "models": MODELS, "error": ""})
    assert bad[0] == 200 and bad[1]["ok"] is False
    assert bad[1]["error"] == "endpoint 'ftp://x' must start with http:// or https://"


def test_registers_on_comfyui_prompt_server_only_when_there_is_one(monkeypatch):
    fake = types.ModuleType("server")
    monkeypatch.setitem(sys.modules, "server", fake)
    assert routes._register_with_comfyui() is False  # a module named server that is not ComfyUI's

    table = web.RouteTableDef()
    fake.PromptServer = types.SimpleNamespace(instance=types.SimpleNamespace(routes=table))
    assert routes._register_with_comfyui() is True
    assert sorted(route.path for route in table) == ["/remote_vae/health", "/remote_vae/presets"]
