"""/ready: 503 naming the models that cannot serve (failed, unloadable, waiting for preload); /health stays
a liveness check."""

from __future__ import annotations

import threading

import requests

from remote_vae.local_server.app import Settings, create_app
from remote_vae.local_server.backends.diffusers import DiffusersLoader
from remote_vae.local_server.errors import ModelLoadError
from remote_vae.local_server.registry import ModelRegistry
from remote_vae.remote.presets import PRESETS
from remote_vae.testing import random_vae
from support.serving import serve


def test_ready_once_every_model_is_loaded_or_loadable(tmp_path):
    folder = tmp_path / "vae"
    random_vae("sd15").save_pretrained(folder)
    registry = ModelRegistry()
    registry.add("built", PRESETS["sd15"], model=random_vae("sd15"), device="cpu")
    registry.add("lazy", PRESETS["sd15"], source=str(folder), device="cpu")  # loads on first use
    registry.add("hub", PRESETS["flux"], device="cpu")  # the preset's hub checkpoint: a sound source
    try:
        with serve(create_app(registry)) as url:
            answer = requests.get(url + "/ready", timeout=10)
            assert (answer.status_code, answer.json()) == (200, {"ready": True, "not_ready": []})
            assert registry.get("lazy").state == "not loaded"  # checking readiness loaded nothing
    finally:
        registry.close()


def test_a_model_that_cannot_load_makes_the_server_not_ready(tmp_path):
    missing = tmp_path / "missing.safetensors"
    registry = ModelRegistry()
    registry.add("sd15", PRESETS["sd15"], model=random_vae("sd15"), device="cpu")
    registry.add("broken", PRESETS["flux"], source=str(missing), device="cpu")
    try:
        with serve(create_app(registry, Settings(token="probe-token"))) as url:
            open_answer = requests.get(url + "/ready", timeout=10)
            assert open_answer.status_code == 503
            assert open_answer.json() == {
                "ready": False,
                "not_ready": ["broken"],
            }  # no paths without the token
            detailed = requests.get(
                url + "/ready", headers={"Authorization": "Bearer probe-token"}, timeout=10
            )
            reason = detailed.json()["reasons"]["broken"]
            assert (
                reason.startswith("model 'broken' cannot be loaded: no such file or folder")
                and str(missing) in reason
            )
            assert requests.get(url + "/health", timeout=10).status_code == 200
    finally:
        registry.close()


def test_not_ready_while_preloading_then_ready():
    release = threading.Event()

    def slow_read(preset, source, *, device, dtype):
        release.wait(30)
        return random_vae(preset.name)

    registry = ModelRegistry(loader=DiffusersLoader(slow_read))
    registry.add("sd15", PRESETS["sd15"], device="cpu")
    try:
        with serve(create_app(registry)) as url:
            preload = threading.Thread(target=registry.preload)
            preload.start()
            waiting = requests.get(url + "/ready", timeout=10)
            assert waiting.status_code == 503 and waiting.json()["not_ready"] == ["sd15"]
            release.set()
            preload.join(30)
            assert requests.get(url + "/ready", timeout=10).json() == {"ready": True, "not_ready": []}
    finally:
        release.set()
        registry.close()


def test_a_failed_load_is_not_ready_with_the_loaders_reason():
    def failing(preset, source, *, device, dtype):
        raise ModelLoadError("the weights are corrupt")

    registry = ModelRegistry(loader=DiffusersLoader(failing))
    registry.add("sd15", PRESETS["sd15"], device="cpu")
    try:
        registry.preload()
        reasons = registry.not_ready()
        assert list(reasons) == ["sd15"] and "the weights are corrupt" in reasons["sd15"]
    finally:
        registry.close()
