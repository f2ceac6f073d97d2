"""The server as a process: graceful shutdown, a server killed mid-request, failover between two
servers, the token from the environment, and the warning for an open bind without a token."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from remote_vae.remote import protocol
from remote_vae.remote.client import RemoteVAEError, send
from remote_vae.remote.tokens import TokenStore
from remote_vae.testing import random_vae
from support.processes import running_server

pytestmark = pytest.mark.timeout(600)

SLOW_LATENT = (1, 4, 96, 96)  # a few seconds of CPU decode: long enough to act while it runs


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("process") / "sd15"
    random_vae("sd15", 11).save_pretrained(path)
    return str(path)


def wire(shape=SLOW_LATENT) -> protocol.WireRequest:
    latent = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    return protocol.build_decode_request(latent, output_type="pt", partial_postprocess=True, do_scaling=False)


def wait_until_running(url: str, headers: dict | None = None) -> None:
    """Until the server has admitted a request (its queue depth gauge reads 1)."""
    deadline = time.monotonic() + 120
    while "remote_vae_queue_depth 1" not in requests.get(url + "/metrics", headers=headers, timeout=10).text:
        assert time.monotonic() < deadline, "the request never reached the server"
        time.sleep(0.05)


def test_sigterm_lets_the_running_request_finish(folder):
    with running_server(["--model", f"sd15={folder}"]) as (url, process), ThreadPoolExecutor(1) as pool:
        pending = pool.submit(send, url + "/sd15", wire(), timeout=(10, 300), retries=0)
        wait_until_running(url)
        process.send_signal(signal.SIGTERM)
        reply = pending.result(300)
        assert reply.tensor().shape == (1, 768, 768, 3)
        # uvicorn re-raises the signal once it has shut down, so the exit status is that of SIGTERM.
        assert process.wait(120) in (0, -signal.SIGTERM)


def test_killed_server_gives_a_clear_error_and_a_second_server_takes_over(folder):
    with (
        running_server(["--model", f"sd15={folder}"]) as (a, process_a),
        running_server(["--model", f"sd15={folder}"]) as (b, _),
    ):
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(send, a + "/sd15", wire(), timeout=(10, 300), retries=0)
            wait_until_running(a)
            process_a.kill()
            with pytest.raises(RemoteVAEError, match="could not be reached|refused the connection") as info:
                pending.result(300)
        assert info.value.status is None and info.value.endpoint == a + "/sd15"
        reply = send([a + "/sd15", b + "/sd15"], wire((1, 4, 8, 8)), timeout=(10, 120))
        assert reply.transfer.endpoint == b + "/sd15" and reply.tensor().shape == (1, 64, 64, 3)


def test_token_from_the_environment(folder):
    env = {"REMOTE_VAE_SERVER_TOKEN": "process-secret"}
    with running_server(["--model", f"sd15={folder}"], env=env) as (url, _):
        with pytest.raises(RemoteVAEError, match="answered 401") as info:
            send(url + "/sd15", wire((1, 4, 8, 8)), retries=0, tokens=TokenStore())
        assert "process-secret" not in str(info.value)
        assert send(url + "/sd15", wire((1, 4, 8, 8)), token="process-secret").tensor().shape == (
            1,
            64,
            64,
            3,
        )


def test_open_bind_without_a_token_warns(folder):
    with running_server(["--host", "0.0.0.0", "--model", f"sd15={folder}"]) as (url, process):
        assert requests.get(url + "/health", timeout=10).status_code == 200
        process.terminate()
        output = process.communicate(timeout=60)[0]
    assert "WARNING: listening on 0.0.0.0 without a token" in output
