"""A real uvicorn server on a free 127.0.0.1 port (configured as the CLI configures it), and raw protocol
requests against it."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import requests
import torch
import uvicorn

from remote_vae.local_server.app import Settings, create_app
from remote_vae.local_server.connections import ConnectionLimits
from remote_vae.local_server.http_server import uvicorn_config
from remote_vae.local_server.registry import ModelRegistry
from remote_vae.remote import protocol
from remote_vae.remote.presets import PRESETS


@contextlib.contextmanager
def serve(app, limits: ConnectionLimits | None = None) -> Iterator[str]:
    """Run `app` under uvicorn in a background thread, with the CLI's connection limits (`limits`, else
    the defaults); yields its base URL (no trailing slash)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, limits, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(500):
            if server.started or not thread.is_alive():
                break
            threading.Event().wait(0.01)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextlib.contextmanager
def hosting(
    models: dict[str, tuple[str, torch.nn.Module]],
    settings: Settings | None = None,
    limits: ConnectionLimits | None = None,
    **host_options,
) -> Iterator[tuple[str, ModelRegistry]]:
    """A ModelRegistry with `models` ({name: (preset, module)}) served on a free port."""
    host = ModelRegistry(**host_options)
    for name, (preset, model) in models.items():
        host.add(name, PRESETS[preset], model=model, device="cpu", dtype="float32")
    try:
        with serve(create_app(host, settings), limits) as url:
            yield url, host
    finally:
        host.close()


# --------------------------------------------------------------------------- raw protocol requests


def post_decode(
    url: str, tensor: torch.Tensor, *, extra_params=(), headers=None, **options
) -> requests.Response:
    """A decode request built by our codec (byte-identical to diffusers'), plus raw extra params."""
    return post(url, protocol.build_decode_request(tensor, **options), extra_params, headers)


def post_encode(
    url: str, image: torch.Tensor | bytes, *, extra_params=(), headers=None, **options
) -> requests.Response:
    return post(url, protocol.build_encode_request(image, **options), extra_params, headers)


def post(url: str, wire: protocol.WireRequest, extra_params=(), headers=None) -> requests.Response:
    """`wire` POSTed as built, with raw extra query parameters and headers after it."""
    return requests.post(
        url,
        params=wire.params + list(extra_params),
        headers={**wire.headers, **(headers or {})},
        data=wire.body,
        timeout=60,
    )


def tensor_of(response: requests.Response) -> torch.Tensor:
    assert response.status_code == 200, response.text
    return protocol.parse_tensor_response(response.content, response.headers)


def error_of(response: requests.Response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"] == "application/json"
    return response.json()["error"]
