"""Shared fixtures: tiny random diffusers VAEs and a real uvicorn server on a free 127.0.0.1 port."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import diffusers
import pytest
import requests
import torch
import uvicorn

from remote_vae.local_server.app import create_app
from remote_vae.local_server.engine import ModelHost
from remote_vae.remote import protocol
from remote_vae.remote.presets import PRESETS


def tiny_kl(latent_channels: int, seed: int = 0, **config) -> diffusers.AutoencoderKL:
    """An AutoencoderKL with the real architecture's 4 levels (8x spatial compression), tiny widths."""
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        block_out_channels=(16, 16, 32, 32),
        down_block_types=4 * ["DownEncoderBlock2D"],
        up_block_types=4 * ["UpDecoderBlock2D"],
        norm_num_groups=8,
        layers_per_block=1,
        latent_channels=latent_channels,
        **config,
    ).eval()


def tiny_hunyuan(seed: int = 0) -> diffusers.AutoencoderKLHunyuanVideo:
    torch.manual_seed(seed)
    return diffusers.AutoencoderKLHunyuanVideo(
        block_out_channels=(8, 8, 16, 16), norm_num_groups=4, layers_per_block=1, latent_channels=16
    ).eval()


def tiny_wan(seed: int = 0) -> diffusers.AutoencoderKLWan:
    torch.manual_seed(seed)
    return diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1).eval()


def tiny_models() -> dict[str, torch.nn.Module]:
    """One tiny model per preset the compat tests cover, with each preset's scaling in its config."""
    return {
        "sd15": tiny_kl(4, seed=1, scaling_factor=PRESETS["sd15"].scaling_factor),
        "sdxl": tiny_kl(4, seed=2, scaling_factor=PRESETS["sdxl"].scaling_factor),
        "flux": tiny_kl(
            16, seed=3, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False
        ),
        "hunyuan_video": tiny_hunyuan(seed=4),
        "wan21": tiny_wan(seed=5),
    }


@contextlib.contextmanager
def serve(app) -> Iterator[str]:
    """Run `app` under uvicorn in a background thread; yields its base URL (no trailing slash)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
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
def hosting(models: dict[str, tuple[str, torch.nn.Module]], **host_options) -> Iterator[tuple[str, ModelHost]]:
    """A ModelHost with `models` ({name: (preset, module)}) served on a free port."""
    host = ModelHost(**host_options)
    for name, (preset, model) in models.items():
        host.add(name, PRESETS[preset], model=model, device="cpu", dtype="float32")
    try:
        with serve(create_app(host)) as url:
            yield url, host
    finally:
        host.close()


@pytest.fixture(scope="session")
def models() -> dict[str, torch.nn.Module]:
    return tiny_models()


@pytest.fixture(scope="session")
def server(models) -> Iterator[str]:
    """One server hosting every tiny model under its preset name (sd15 first, so also at POST /)."""
    with hosting({name: (name, model) for name, model in models.items()}) as (url, _host):
        yield url


# --------------------------------------------------------------------------- raw protocol requests


def post_decode(url: str, tensor: torch.Tensor, *, extra_params=(), headers=None, **options) -> requests.Response:
    """A decode request built by our codec (byte-identical to diffusers'), plus raw extra params."""
    wire = protocol.build_decode_request(tensor, **options)
    return requests.post(
        url, params=wire.params + list(extra_params), headers={**wire.headers, **(headers or {})}, data=wire.body, timeout=60
    )


def post_encode(url: str, image: torch.Tensor | bytes, *, extra_params=(), headers=None, **options) -> requests.Response:
    wire = protocol.build_encode_request(image, **options)
    return requests.post(
        url, params=wire.params + list(extra_params), headers={**wire.headers, **(headers or {})}, data=wire.body, timeout=60
    )


def tensor_of(response: requests.Response) -> torch.Tensor:
    assert response.status_code == 200, response.text
    return protocol.parse_tensor_response(response.content, response.headers)


def error_of(response: requests.Response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"] == "application/json"
    return response.json()["error"]
