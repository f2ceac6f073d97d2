"""The `remote-vae-server` command, run for real as a subprocess on a free 127.0.0.1 port."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests
import torch

from remote_vae.local_server.cli import (
    base_url,
    build_parser,
    build_registry,
    connection_limits_from,
    parse_model_spec,
    settings_from,
)
from remote_vae.local_server.connections import ConnectionLimits
from remote_vae.local_server.uploads import UploadLimits
from remote_vae.remote.presets import PRESETS, PresetError
from remote_vae.testing import random_vae
from support.processes import running_server, server_env
from support.serving import error_of, post_decode, tensor_of

pytestmark = pytest.mark.timeout(300)


def test_model_specs():
    assert parse_model_spec("sd15") == ("sd15", PRESETS["sd15"], None)
    assert parse_model_spec("sdxl=madebyollin/sdxl-vae-fp16-fix") == (
        "sdxl",
        PRESETS["sdxl"],
        "madebyollin/sdxl-vae-fp16-fix",
    )
    assert parse_model_spec("myflux:flux=/models/ae.safetensors") == (
        "myflux",
        PRESETS["flux"],
        "/models/ae.safetensors",
    )
    with pytest.raises(PresetError, match="unknown preset 'sd99'"):
        parse_model_spec("sd99=/x")
    with pytest.raises(PresetError, match="unknown preset 'nope'"):
        parse_model_spec("a:nope")
    with pytest.raises(ValueError, match="cannot be a URL path"):
        parse_model_spec("my/flux:flux")


def test_no_model_means_every_preset_loaded_lazily():
    host = build_registry([], "cpu", "auto")
    try:
        assert host.names == list(PRESETS)
        assert all(m.state == "not loaded" and m.source is None for m in host.models())
    finally:
        host.close()
    assert base_url("::1", 8190) == "http://[::1]:8190"


def test_max_in_flight_and_the_old_pair_of_flags_it_replaces(monkeypatch):
    monkeypatch.delenv("REMOTE_VAE_SERVER_TOKEN", raising=False)

    def in_flight(*args: str) -> int:
        return settings_from(build_parser().parse_args(list(args))).limits.max_in_flight

    assert in_flight() == 18 and in_flight("--max-in-flight", "5") == 5
    assert in_flight("--max-concurrency", "1", "--max-queue", "0") == 1  # the server held their sum
    assert in_flight("--max-queue", "4") == 6 and in_flight("--max-concurrency", "4") == 20
    assert "--max-queue" not in build_parser().format_help()


def test_connection_flags_and_their_defaults(monkeypatch):
    monkeypatch.delenv("REMOTE_VAE_SERVER_TOKEN", raising=False)
    parser = build_parser()
    assert connection_limits_from(parser.parse_args([])) == ConnectionLimits()
    assert settings_from(parser.parse_args([])).uploads == UploadLimits()
    flags = [
        "--max-connections",
        "9",
        "--header-timeout",
        "2",
        "--send-timeout",
        "3",
        "--shutdown-timeout",
        "4",
    ]
    assert connection_limits_from(parser.parse_args(flags)) == ConnectionLimits(
        max_connections=9, header_timeout=2, send_timeout=3, shutdown_timeout=4
    )
    uploads = settings_from(parser.parse_args(["--upload-timeout", "5", "--min-upload-rate", "6"])).uploads
    assert uploads == UploadLimits(idle_timeout=5, min_rate=6)


def test_bad_arguments_exit_with_a_message():
    for args, message in (
        (["--model", "sd99"], "unknown preset 'sd99'"),
        (["--dtype", "float64"], "invalid choice: 'float64'"),
        (["--model", "sd15", "--model", "sd15"], "model name 'sd15' is used twice"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "remote_vae.local_server", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=server_env(),
        )
        assert result.returncode == 2 and message in result.stderr, result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_without_cuda_is_refused():
    result = subprocess.run(
        [sys.executable, "-m", "remote_vae.local_server", "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=120,
        env=server_env(),
    )
    assert result.returncode == 2 and "no CUDA device is available; use --device cpu" in result.stderr


def test_serves_a_diffusers_folder(tmp_path: Path):
    model = random_vae("sd15")
    model.save_pretrained(tmp_path / "vae")
    with running_server(
        ["--model", f"sd15={tmp_path / 'vae'}", "--model", "alias:sd15", "--device", "cpu"]
    ) as (url, process):
        listing = requests.get(url + "/v1/models", timeout=10).json()
        assert [m["name"] for m in listing["models"]] == ["sd15", "alias"]
        first = listing["models"][0]
        assert (first["source"], first["state"], first["device"], first["dtype"]) == (
            str(tmp_path / "vae"),
            "not loaded",
            "cpu",
            "float32",
        )
        z = torch.randn(1, 4, 8, 8)
        out = tensor_of(
            post_decode(
                url + "/sd15",
                z,
                output_type="pt",
                scaling_factor=0.18215,
                extra_params=[("output_dtype", "float32")],
            )
        )
        with torch.no_grad():
            want = model.decode(z / 0.18215).sample
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        assert requests.get(url + "/v1/models", timeout=10).json()["models"][0]["state"] == "loaded"
        process.terminate()
        banner = process.communicate(timeout=30)[0]
    assert f"sd15 [sd15, cpu, float32] at {url}/sd15  (also {url}/)" in banner
    assert f"alias [sd15, cpu, float32] at {url}/alias" in banner


def test_offline_default_start_answers_503_naming_the_download(tmp_path: Path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty cache: nothing can load
    with running_server(["--device", "cpu"], env=env) as (url, _process):
        names = [m["name"] for m in requests.get(url + "/v1/models", timeout=10).json()["models"]]
        assert names == list(PRESETS)
        message = error_of(
            post_decode(url + "/", torch.zeros(1, 4, 8, 8), output_type="pt", do_scaling=False), 503
        )
        assert message.startswith("model 'sd15' could not be loaded from stabilityai/sd-vae-ft-mse: ")
        assert "could not load 'stabilityai/sd-vae-ft-mse'" in message  # loading.py's words for the download
        assert "--model sd15=/path/to/vae.safetensors" in message  # and how to point at a local file
        assert requests.get(url + "/health", timeout=10).status_code == 200
        state = requests.get(url + "/v1/models", timeout=10).json()["models"][0]
        assert (state["state"], state["error"]) == ("failed", message)


def test_preload_loads_before_serving_and_survives_a_bad_source(tmp_path: Path):
    random_vae("sd15").save_pretrained(tmp_path / "vae")
    missing = tmp_path / "missing.safetensors"
    with running_server(
        ["--preload", "--model", f"sd15={tmp_path / 'vae'}", "--model", f"broken:flux={missing}"]
    ) as (url, _process):
        states = {m["name"]: m for m in requests.get(url + "/v1/models", timeout=10).json()["models"]}
        assert states["sd15"]["state"] == "loaded"  # before any request
        assert states["broken"]["state"] == "failed" and str(missing) in states["broken"]["error"]
        message = error_of(
            post_decode(url + "/broken", torch.zeros(1, 16, 8, 8), output_type="pt", do_scaling=False), 503
        )
        assert message.startswith(f"model 'broken' could not be loaded from {missing}: ")
        assert list(
            tensor_of(
                post_decode(url + "/sd15", torch.zeros(1, 4, 8, 8), output_type="pt", do_scaling=False)
            ).shape
        ) == [1, 3, 64, 64]
