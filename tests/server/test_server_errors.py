"""Every way a request can go wrong: 4xx JSON naming the bad value for client mistakes, 503 for a
model that cannot load, 500 for the server's own faults, and the server keeps serving after each."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import requests
import torch

from remote_vae.local_server.app import create_app
from remote_vae.local_server.backends.diffusers import DiffusersLoader
from remote_vae.local_server.errors import ModelLoadError
from remote_vae.local_server.registry import ModelRegistry
from remote_vae.remote import protocol
from remote_vae.remote.presets import PRESETS
from remote_vae.testing import random_vae
from support.serving import error_of, hosting, post_decode, post_encode, serve, tensor_of

pytestmark = pytest.mark.timeout(120)

DECODE_HEADERS = {"Content-Type": "tensor/binary", "Accept": "tensor/binary"}


def raw_post(url: str, params, body: bytes, headers=None) -> requests.Response:
    return requests.post(
        url, params=params, data=body, headers=DECODE_HEADERS if headers is None else headers, timeout=60
    )


def shape_params(*shape: int) -> list[tuple[str, str]]:
    return [("shape", str(d)) for d in shape]


def z(*shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- the request itself


def test_unsupported_dtype(server):
    message = error_of(
        raw_post(server + "/sd15", shape_params(1, 4, 8, 8) + [("dtype", "float64")], b"\0" * 2048), 400
    )
    assert "unsupported dtype 'float64'" in message


def test_missing_dtype_and_shape(server):
    assert "expected `dtype`" in error_of(
        raw_post(server + "/sd15", shape_params(1, 4, 8, 8), b"\0" * 512), 400
    )
    assert "expected `shape`" in error_of(
        raw_post(server + "/sd15", [("dtype", "float16")], b"\0" * 512), 400
    )


def test_uint8_latents(server):
    message = error_of(
        raw_post(server + "/sd15", shape_params(1, 4, 8, 8) + [("dtype", "uint8")], b"\0" * 256), 400
    )
    assert "latents must be float16, bfloat16 or float32, not uint8" in message


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        (["1", "4", "x", "8"], "shape value 'x' is not an integer"),
        (["1", "4", "0", "8"], "invalid dimension 0"),
        (["1", "4", "-8", "8"], "invalid dimension -8"),
    ],
)
def test_bad_shape(server, shape, message):
    params = [("shape", s) for s in shape] + [("dtype", "float16")]
    assert message in error_of(raw_post(server + "/sd15", params, b"\0" * 512), 400)


def test_body_length_mismatch(server):
    message = error_of(
        raw_post(server + "/sd15", shape_params(1, 4, 8, 8) + [("dtype", "float16")], b"\0" * 500), 400
    )
    assert message == "body has 500 bytes but shape [1, 4, 8, 8] with dtype float16 needs 512 bytes"


def test_wrong_channel_count_names_model_and_the_hosted_models_that_fit(server):
    message = error_of(post_decode(server + "/sd15", z(1, 16, 8, 8), output_type="pt", do_scaling=False), 400)
    assert message.startswith("latent has 16 channels but preset sd15 expects 4")
    assert message.endswith("hosted models that fit: /flux")


def test_wrong_channel_count_on_an_alias_says_which_model(tmp_path):
    with hosting({"myflux": ("flux", random_vae("flux"))}) as (url, _host):
        message = error_of(
            post_decode(url + "/myflux", z(1, 4, 8, 8), output_type="pt", do_scaling=False), 400
        )
    assert message.startswith("model myflux (preset flux): latent has 4 channels but preset flux expects 16")


def test_wrong_number_of_dimensions(server):
    message = error_of(
        post_decode(server + "/sd15", z(1, 4, 2, 8, 8), output_type="pt", do_scaling=False), 400
    )
    assert "has 5 dimensions but preset sd15 expects [B,4,H,W]" in message
    message = error_of(
        post_decode(server + "/wan21", z(1, 16, 8, 8), output_type="pt", do_scaling=False), 400
    )
    assert "has 4 dimensions but preset wan21 expects [B,16,T,H,W]" in message
    params = shape_params(1, 1, 4, 8, 8, 1, 1) + [("dtype", "float16")]
    assert "at most 6 are allowed" in error_of(raw_post(server + "/sd15", params, b"\0" * 512), 400)


def test_packed_latents_without_height_and_width(server):
    params = shape_params(1, 16, 64) + [("dtype", "float16"), ("height", "64")]
    assert "packed (3-D) latents need both `height` and `width`" in error_of(
        raw_post(server + "/flux", params, b"\0" * 2048), 400
    )


def test_packed_latents_without_a_size_are_refused_by_the_image_model(server):
    """The codec lets a 3-D latent through (it may be audio [B,C,L]); an image model asks for the size."""
    params = shape_params(1, 16, 64) + [("dtype", "float16")]
    for model in ("flux", "sd15"):
        message = error_of(raw_post(f"{server}/{model}", params, b"\0" * 2048), 400)
        assert message == "packed (3-D) latents need both `height` and `width` parameters"
    wrong_length = raw_post(server + "/flux", params, b"\0" * 8)  # refused from the query, whatever the body
    assert error_of(wrong_length, 400) == "packed (3-D) latents need both `height` and `width` parameters"


def test_packed_latents_that_do_not_fit_the_size(server):
    message = error_of(
        post_decode(server + "/flux", z(1, 16, 64), output_type="pt", do_scaling=False, height=64, width=128),
        400,
    )
    assert "packed latent of shape [1, 16, 64] does not fit height=64 width=128" in message


def test_packed_latents_to_a_video_model(server):
    message = error_of(
        post_decode(server + "/wan21", z(1, 16, 64), output_type="pt", do_scaling=False, height=64, width=64),
        400,
    )
    assert "has 3 dimensions but preset wan21 expects [B,16,T,H,W]" in message


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ([("output_type", "latent")], "output_type='latent' is not one of pil, pt, mp4"),
        ([("image_format", "gif")], "image_format='gif' is not one of jpg, png"),
        ([("partial_postprocess", "maybe")], "partial_postprocess='maybe' is not a boolean"),
        ([("scaling_factor", "abc")], "scaling_factor='abc' is not a number"),
        ([("scaling_factor", "0")], "scaling_factor=0 would divide by zero"),
        ([("shift_factor", "nan")], "shift_factor='nan' must be a finite number"),
        ([("height", "-1")], "height=-1 must be at least 1"),
    ],
)
def test_bad_parameter_values(server, params, message):
    base = shape_params(1, 16, 64) + [("dtype", "float32"), ("height", "64"), ("width", "64")]
    body = z(1, 16, 64).numpy().tobytes()
    assert (
        tensor_of(raw_post(server + "/flux", base + [("output_type", "pt")], body)).shape[-1] == 64
    )  # valid as is
    assert message in error_of(raw_post(server + "/flux", base + params, body), 400)


def test_unsupported_content_type(server):
    message = error_of(
        raw_post(server + "/sd15", [], b"{}", headers={"Content-Type": "application/json"}), 400
    )
    assert "Content-Type 'application/json' is not supported" in message
    message = error_of(
        raw_post(
            server + "/sd15/decode",
            shape_params(1, 4, 8, 8) + [("dtype", "float16")],
            b"\0" * 512,
            headers={"Content-Type": "text/csv"},
        ),
        400,
    )
    assert "Content-Type 'text/csv' is not supported for decode" in message


# --------------------------------------------------------------------------- outputs that cannot hold the result


def test_pil_with_a_batch(server):
    message = error_of(post_decode(server + "/sd15", z(2, 4, 8, 8), do_scaling=False), 400)
    assert "output_type=pil returns one image file but this latent decodes to 2 images" in message
    message = error_of(post_decode(server + "/wan21", z(1, 16, 2, 4, 4), do_scaling=False), 400)
    assert "decodes to 5 frames" in message


def test_mp4_needs_one_video(server):
    message = error_of(post_decode(server + "/sd15", z(1, 4, 8, 8), output_type="mp4", do_scaling=False), 400)
    assert "output_type=mp4 needs a video model; sd15 decodes images" in message
    message = error_of(
        post_decode(server + "/wan21", z(2, 16, 2, 4, 4), output_type="mp4", do_scaling=False), 400
    )
    assert "returns one video but the latent holds 2" in message


# --------------------------------------------------------------------------- encode mistakes


def test_encode_body_that_is_not_an_image(server):
    message = error_of(requests.post(server + "/sd15", data=b"hello world", timeout=60), 400)
    assert "neither a PNG/JPEG/WebP image nor a raw tensor" in message
    assert "empty body" in error_of(requests.post(server + "/sd15/encode", data=b"", timeout=60), 400)


def test_encode_body_that_claims_to_be_a_png_but_is_broken(server):
    message = error_of(requests.post(server + "/sd15", data=protocol.PNG_MAGIC + b"garbage", timeout=60), 400)
    assert message.startswith("encode body could not be read as an image")


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (torch.zeros(1, 4, 16, 16), "has 4 colour channels; send RGB"),
        (
            torch.zeros(1, 16, 16, 2, dtype=torch.uint8),
            "uint8 encode input of shape [1, 16, 16, 2] is not [B,H,W,3] pixels",
        ),
        (torch.zeros(1, 3, 2, 16, 16), "float encode input of shape [1, 3, 2, 16, 16] is not [B,3,H,W]"),
        (
            torch.zeros(1, 3, 4, 16),
            "encode input of 16x4 pixels is smaller than the model's 8-pixel latent cell",
        ),
    ],
)
def test_encode_tensor_layouts_that_do_not_fit(server, tensor, message):
    assert message in error_of(post_encode(server + "/sd15", tensor), 400)


# --------------------------------------------------------------------------- routing


def test_unknown_model_lists_the_hosted_ones(server):
    message = error_of(post_decode(server + "/sd3", z(1, 16, 8, 8), output_type="pt", do_scaling=False), 404)
    assert (
        message
        == "model 'sd3' is not hosted here; hosted models: /sd15, /sdxl, /flux, /hunyuan_video, /wan21"
    )
    assert "not hosted" in error_of(post_encode(server + "/nope/encode", torch.zeros(1, 3, 8, 8)), 404)


def test_unknown_paths_and_methods_answer_json(server):
    assert (
        error_of(requests.get(server + "/sd15/v1/models", timeout=10), 404)
        == "GET /sd15/v1/models: Not Found"
    )
    assert error_of(requests.get(server + "/sd15", timeout=10), 405) == "GET /sd15: Method Not Allowed"


def test_model_names_that_would_shadow_routes_are_refused():
    host = ModelRegistry()
    host.add("health", PRESETS["sd15"], model=random_vae("sd15"), device="cpu")
    with pytest.raises(ValueError, match="model name 'health' cannot be a URL path"):
        create_app(host)
    with pytest.raises(ValueError, match="used twice"):
        host.add("health", PRESETS["sd15"], model=random_vae("sd15"), device="cpu")
    host.close()


# --------------------------------------------------------------------------- the server's own troubles


class BlockingVAE(torch.nn.Module):
    """A real VAE whose decode waits until the test lets it go."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.started, self.release = threading.Event(), threading.Event()

    @property
    def config(self):
        return self.inner.config

    def decode(self, z):
        self.started.set()
        assert self.release.wait(60), "the test never released the decode"
        return self.inner.decode(z)


@contextlib.contextmanager
def decoding_in_background(url: str) -> Iterator[Future]:
    """A small sd15 decode of `url` running on another thread; yields its future."""
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(post_decode, url + "/sd15", z(1, 4, 8, 8), output_type="pt", do_scaling=False)


def test_health_answers_while_a_decode_runs():
    model = BlockingVAE(random_vae("sd15"))
    with hosting({"sd15": ("sd15", model)}) as (url, _host):
        with decoding_in_background(url) as pending:
            try:
                assert model.started.wait(30), "decode never started"
                assert requests.get(url + "/health", timeout=10).text == "Ok"
                listing = requests.get(url + "/v1/models", timeout=10).json()
                assert listing["models"][0]["state"] == "loaded"
                assert not pending.done()  # the decode is still held
            finally:
                model.release.set()
            assert list(tensor_of(pending.result(60)).shape) == [1, 3, 64, 64]


class FlakyLoader:
    """Fails until `fixed` is set, then builds a tiny model; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.fixed = False

    def __call__(self, preset, source, *, device, dtype):
        self.calls += 1
        if not self.fixed:
            raise ModelLoadError(f"cannot download {source or preset.checkpoint}: offline")
        return random_vae(preset.name)


def test_load_failure_is_a_503_and_the_server_stays_up():
    loader = FlakyLoader()
    host = ModelRegistry(loader=DiffusersLoader(loader))
    host.add("sd15", PRESETS["sd15"], device="cpu")
    host.add("good", PRESETS["sd15"], model=random_vae("sd15"), device="cpu")

    try:
        with serve(create_app(host)) as url:
            assert requests.get(url + "/v1/models", timeout=10).json()["models"][0]["state"] == "not loaded"
            message = error_of(
                post_decode(url + "/sd15", z(1, 4, 8, 8), output_type="pt", do_scaling=False), 503
            )
            assert message == (
                "model 'sd15' could not be loaded from stabilityai/sd-vae-ft-mse: "
                "cannot download stabilityai/sd-vae-ft-mse: offline"
            )
            state = requests.get(url + "/v1/models", timeout=10).json()["models"][0]
            assert (state["state"], state["error"]) == ("failed", message)
            assert requests.get(url + "/health", timeout=10).status_code == 200
            assert tensor_of(post_encode(url + "/good", torch.zeros(1, 3, 8, 8))).shape[1] == 4
            loader.fixed = True  # e.g. the file appeared: the next request tries again
            assert list(
                tensor_of(post_decode(url + "/sd15", z(1, 4, 8, 8), output_type="pt", do_scaling=False)).shape
            ) == [1, 3, 64, 64]
            tensor_of(post_decode(url + "/sd15", z(1, 4, 8, 8), output_type="pt", do_scaling=False))
            assert loader.calls == 2  # loaded once, then kept
            state = requests.get(url + "/v1/models", timeout=10).json()["models"][0]
            assert (state["state"], state["error"]) == ("loaded", None)
    finally:
        host.close()


def test_models_show_loading_while_they_load_and_health_still_answers():
    started, release = threading.Event(), threading.Event()

    def slow_loader(preset, source, *, device, dtype):
        started.set()
        assert release.wait(60), "the test never released the load"
        return random_vae(preset.name)

    host = ModelRegistry(loader=DiffusersLoader(slow_loader))
    host.add("sd15", PRESETS["sd15"], device="cpu")
    try:
        with serve(create_app(host)) as url:
            with decoding_in_background(url) as pending:
                try:
                    assert started.wait(30), "load never started"
                    assert requests.get(url + "/health", timeout=10).status_code == 200
                    assert (
                        requests.get(url + "/v1/models", timeout=10).json()["models"][0]["state"] == "loading"
                    )
                finally:
                    release.set()
                assert list(tensor_of(pending.result(60)).shape) == [1, 3, 64, 64]
            assert requests.get(url + "/v1/models", timeout=10).json()["models"][0]["state"] == "loaded"
    finally:
        host.close()


def test_preload_loads_eagerly_and_logs_failures(caplog):
    loader = FlakyLoader()
    host = ModelRegistry(loader=DiffusersLoader(loader))
    host.add("sd15", PRESETS["sd15"], device="cpu")
    with caplog.at_level(logging.ERROR, logger="remote_vae.server"):
        host.preload()
    assert host.get("sd15").state == "failed" and "offline" in caplog.text
    loader.fixed = True
    host.preload()
    assert host.get("sd15").state == "loaded" and loader.calls == 2
    host.close()


class BrokenVAE(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def decode(self, z):
        raise RuntimeError("kernel exploded")


def test_unexpected_exception_is_a_short_500_and_logged(caplog):
    with (
        hosting({"sd15": ("sd15", BrokenVAE())}) as (url, _host),
        caplog.at_level(logging.ERROR, logger="remote_vae.server"),
    ):
        message = error_of(post_decode(url + "/sd15", z(1, 4, 8, 8), output_type="pt", do_scaling=False), 500)
        assert message == "internal server error: RuntimeError: kernel exploded"
        assert requests.get(url + "/health", timeout=10).status_code == 200
    assert "Traceback" in caplog.text and "kernel exploded" in caplog.text


class NaNVAE(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def decode(self, z):
        out = self.inner.decode(z)
        out.sample[..., 0, 0] = float("nan")
        return out


def test_nan_output_is_logged(caplog):
    with (
        hosting({"sd15": ("sd15", NaNVAE(random_vae("sd15")))}) as (url, _host),
        caplog.at_level(logging.WARNING, logger="remote_vae.server"),
    ):
        response = post_decode(url + "/sd15", z(1, 4, 8, 8), output_type="pt", do_scaling=False)
        assert torch.isnan(tensor_of(response)).any()
    assert "sd15 decode produced NaN/Inf values" in caplog.text


def test_load_hint_is_added_unless_the_loaders_message_has_one(caplog):
    def failing(error):
        def loader(preset, source, *, device, dtype):
            raise error

        return loader

    hint = "start with --model {spec}=/path"
    cases = [
        (ModelLoadError("offline"), "offline; start with --model alias:sd15=/path", False),
        (
            ModelLoadError("offline; point at --model sd15=/x", has_hint=True),
            "offline; point at --model sd15=/x",
            False,
        ),
        (
            OSError("disk gone"),
            "disk gone; start with --model alias:sd15=/path",
            True,
        ),  # unexpected: with traceback
    ]
    for error, ending, traceback in cases:
        host = ModelRegistry(loader=DiffusersLoader(failing(error)), load_hint=hint)
        host.add("alias", PRESETS["sd15"], device="cpu")
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="remote_vae.server"):
            host.preload()
        hosted = host.get("alias")
        assert hosted.state == "failed" and hosted.error.endswith(ending), hosted.error
        assert ("Traceback" in caplog.text) is traceback
        host.close()
