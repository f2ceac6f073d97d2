"""Decode over HTTP: every MUST of hf-protocol.md section 6 and our documented extensions."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import requests
import torch
from PIL import Image

from remote_vae.remote.presets import PRESETS
from support.serving import error_of, post_decode, tensor_of

pytestmark = pytest.mark.timeout(120)


def raw_decode(model, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.decode(z.float()).sample


def latent(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


F32 = [("output_dtype", "float32")]


def test_health_routes(server):
    for path in ("/", "/health"):
        response = requests.get(server + path, timeout=10)
        assert response.status_code == 200 and response.text == "Ok"


def test_models_list(server):
    listing = requests.get(server + "/v1/models", timeout=10).json()
    assert listing["default"] == "sd15"
    by_name = {m["name"]: m for m in listing["models"]}
    assert list(by_name) == ["sd15", "sdxl", "flux", "hunyuan_video", "wan21"]
    flux = by_name["flux"]
    assert flux["preset"] == PRESETS["flux"].describe()
    assert (flux["device"], flux["dtype"], flux["state"], flux["error"]) == ("cpu", "float32", "loaded", None)


@pytest.mark.parametrize("path", ["/", "/predict", "/sd15", "/sd15/predict", "/sd15/decode"])
def test_every_decode_route_answers_the_same(server, models, path):
    z = latent(1, 4, 8, 8)
    out = tensor_of(post_decode(server + path, z, output_type="pt", do_scaling=False, extra_params=F32))
    torch.testing.assert_close(out, raw_decode(models["sd15"], z), atol=1e-5, rtol=1e-5)


def test_explicit_decode_route_needs_no_content_type(server, models):
    z = latent(1, 4, 8, 8)
    out = tensor_of(
        post_decode(
            server + "/sd15/decode", z, output_type="pt", do_scaling=False, headers={"Content-Type": ""}
        )
    )
    assert list(out.shape) == [1, 3, 64, 64]


def test_tensor_response_headers(server):
    response = post_decode(server + "/sd15", latent(1, 4, 8, 8), output_type="pt", do_scaling=False)
    assert response.headers["content-type"] == "tensor/binary"
    assert response.headers["shape"] == "[1,3,64,64]"
    assert response.headers["dtype"] == "float16"
    assert len(response.content) == 1 * 3 * 64 * 64 * 2


@pytest.mark.parametrize("spelling", ["True", "true", "TRUE"])
def test_booleans_are_case_insensitive(server, spelling):
    z = latent(1, 4, 8, 8)
    response = requests.post(
        server + "/sd15",
        params=[("output_type", "pt"), ("partial_postprocess", spelling)]
        + [("shape", str(d)) for d in z.shape]
        + [("dtype", "float32")],
        headers={"Content-Type": "tensor/binary", "Accept": "tensor/binary"},
        data=z.numpy().tobytes(),
        timeout=60,
    )
    assert tensor_of(response).dtype == torch.uint8


# --------------------------------------------------------------------------- scaling


def test_scaling_factor_params_win_over_do_scaling(server, models):
    z = latent(1, 4, 8, 8)
    sent = post_decode(
        server + "/sd15",
        z,
        output_type="pt",
        do_scaling=False,
        extra_params=[("scaling_factor", "0.5"), ("shift_factor", "0.25"), ("do_scaling", "True")] + F32,
    )
    torch.testing.assert_close(
        tensor_of(sent), raw_decode(models["sd15"], z / 0.5 + 0.25), atol=1e-5, rtol=1e-5
    )


def test_do_scaling_true_uses_the_model_config(server, models):
    z = latent(1, 16, 8, 8)
    out = tensor_of(post_decode(server + "/flux", z, output_type="pt", do_scaling=True, extra_params=F32))
    torch.testing.assert_close(out, raw_decode(models["flux"], z / 0.3611 + 0.1159), atol=1e-5, rtol=1e-5)


def test_do_scaling_with_only_a_shift_takes_the_config_scale_and_the_sent_shift(server, models):
    z = latent(1, 16, 8, 8)
    out = tensor_of(
        post_decode(
            server + "/flux", z, output_type="pt", do_scaling=True, shift_factor=0.5, extra_params=F32
        )
    )
    torch.testing.assert_close(out, raw_decode(models["flux"], z / 0.3611 + 0.5), atol=1e-5, rtol=1e-5)


def test_do_scaling_true_on_mean_std_models_uses_the_preset_statistics(server, models):
    z = latent(1, 16, 2, 4, 4)
    out = tensor_of(post_decode(server + "/wan21", z, output_type="pt", do_scaling=True, extra_params=F32))
    torch.testing.assert_close(
        out, raw_decode(models["wan21"], PRESETS["wan21"].to_raw(z)), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("do_scaling", ["False", "false"])
def test_do_scaling_false_and_no_params_mean_raw_latents(server, models, do_scaling):
    z = latent(1, 4, 8, 8)
    explicit = tensor_of(
        post_decode(
            server + "/sd15",
            z,
            output_type="pt",
            do_scaling=False,
            extra_params=[("do_scaling", do_scaling)] + F32,
        )
    )
    silent = tensor_of(post_decode(server + "/sd15", z, output_type="pt", do_scaling=False, extra_params=F32))
    want = raw_decode(models["sd15"], z)
    torch.testing.assert_close(explicit, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(silent, want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- layouts


def test_packed_flux_latents_are_unpacked_with_height_and_width(server, models):
    z = latent(1, 16, 6, 8)  # 48 x 64 pixels
    packed = (
        z.view(1, 16, 3, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 12, 64)
    )  # FluxPipeline._pack_latents
    out = tensor_of(
        post_decode(
            server + "/flux",
            packed,
            output_type="pt",
            do_scaling=False,
            height=48,
            width=64,
            extra_params=F32,
        )
    )
    torch.testing.assert_close(out, raw_decode(models["flux"], z), atol=1e-5, rtol=1e-5)


def test_height_and_width_are_ignored_for_4d_and_5d_latents(server, models):
    z = latent(1, 4, 8, 8)
    out = tensor_of(
        post_decode(
            server + "/sd15", z, output_type="pt", do_scaling=False, height=512, width=512, extra_params=F32
        )
    )
    assert list(out.shape) == [1, 3, 64, 64]
    v = latent(1, 16, 2, 4, 4)
    out = tensor_of(
        post_decode(server + "/hunyuan_video", v, output_type="pt", do_scaling=False, height=16, width=32)
    )
    assert list(out.shape) == [1, 3, 5, 32, 32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_latent_dtypes_are_accepted(server, models, dtype):
    z = latent(1, 4, 8, 8).to(dtype)
    out = tensor_of(post_decode(server + "/sd15", z, output_type="pt", do_scaling=False, extra_params=F32))
    torch.testing.assert_close(out, raw_decode(models["sd15"], z.float()), atol=1e-5, rtol=1e-5)


def test_batches_keep_their_layouts(server):
    z = latent(2, 4, 8, 8)
    assert list(tensor_of(post_decode(server + "/sd15", z, output_type="pt", do_scaling=False)).shape) == [
        2,
        3,
        64,
        64,
    ]
    pixels = tensor_of(
        post_decode(server + "/sd15", z, output_type="pt", partial_postprocess=True, do_scaling=False)
    )
    assert list(pixels.shape) == [2, 64, 64, 3] and pixels.dtype == torch.uint8
    v = latent(2, 16, 2, 4, 4)
    frames = tensor_of(
        post_decode(
            server + "/hunyuan_video", v, output_type="pt", partial_postprocess=True, do_scaling=False
        )
    )
    assert list(frames.shape) == [10, 32, 32, 3]
    unit = tensor_of(
        post_decode(server + "/hunyuan_video", v, output_type="pil", processor_flag=True, do_scaling=False)
    )
    assert list(unit.shape) == [10, 3, 32, 32] and unit.dtype == torch.float16


def test_partial_postprocess_is_the_float16_arithmetic_of_the_raw_output(server):
    z = latent(1, 4, 8, 8)
    raw = tensor_of(post_decode(server + "/sd15", z, output_type="pt", do_scaling=False))
    pixels = tensor_of(
        post_decode(server + "/sd15", z, output_type="pt", partial_postprocess=True, do_scaling=False)
    )
    want = ((raw * 0.5 + 0.5).clamp(0, 1).float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(pixels, want)


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
def test_output_dtype_extension(server, models, name):
    z = latent(1, 4, 8, 8)
    response = post_decode(
        server + "/sd15", z, output_type="pt", do_scaling=False, extra_params=[("output_dtype", name)]
    )
    out = tensor_of(response)
    assert response.headers["dtype"] == name and str(out.dtype) == f"torch.{name}"
    want = raw_decode(models["sd15"], z)
    assert torch.equal(out, want.to(out.dtype))


# --------------------------------------------------------------------------- image and video files


def test_accept_picks_the_image_format_and_image_format_is_the_fallback(server):
    z = latent(1, 4, 8, 8)
    png = post_decode(
        server + "/sd15",
        z,
        output_type="pil",
        image_format="jpg",
        do_scaling=False,
        headers={"Accept": "image/png"},
    )
    assert png.headers["content-type"] == "image/png" and png.content.startswith(b"\x89PNG")
    anything = post_decode(
        server + "/sd15",
        z,
        output_type="pil",
        image_format="png",
        do_scaling=False,
        headers={"Accept": "*/*"},
    )
    assert anything.headers["content-type"] == "image/png" and anything.content == png.content
    jpeg = post_decode(server + "/sd15", z, output_type="pil", image_format="jpg", do_scaling=False)
    assert jpeg.headers["content-type"] == "image/jpeg" and jpeg.content.startswith(b"\xff\xd8")


def test_png_holds_the_partial_postprocess_pixels(server):
    z = latent(1, 4, 8, 8)
    pixels = tensor_of(
        post_decode(server + "/sd15", z, output_type="pt", partial_postprocess=True, do_scaling=False)
    )
    png = post_decode(server + "/sd15", z, output_type="pil", image_format="png", do_scaling=False)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png.content))), pixels[0].numpy())


def test_jpeg_quality_extension(server):
    z = latent(1, 4, 8, 8)
    sizes = {}
    for quality in ("30", "95"):
        response = post_decode(
            server + "/sd15", z, output_type="pil", do_scaling=False, extra_params=[("jpeg_quality", quality)]
        )
        assert response.status_code == 200
        sizes[quality] = len(response.content)
    default = post_decode(server + "/sd15", z, output_type="pil", do_scaling=False)
    assert sizes["30"] < sizes["95"] == len(default.content)


def test_one_frame_video_can_be_a_png(server):
    out = post_decode(
        server + "/hunyuan_video",
        latent(1, 16, 1, 4, 4),
        output_type="pil",
        image_format="png",
        do_scaling=False,
    )
    assert Image.open(io.BytesIO(out.content)).size == (32, 32)


def test_mp4_fps_extension_and_default(server):
    v = latent(1, 16, 2, 4, 4)
    for params, fps in (([("fps", "8")], 8), ([], PRESETS["wan21"].fps)):
        response = post_decode(server + "/wan21", v, output_type="mp4", do_scaling=False, extra_params=params)
        assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
        with av.open(io.BytesIO(response.content)) as container:
            assert container.streams.video[0].average_rate == fps
            assert sum(1 for _ in container.decode(video=0)) == 5


def test_unknown_parameters_are_ignored(server, models):
    z = latent(1, 4, 8, 8)
    extra = [
        ("input_tensor_type", "binary"),
        ("output_tensor_type", "binary"),
        ("foo", "bar"),
        ("tiles", "maybe"),
    ] + F32
    out = tensor_of(post_decode(server + "/sd15", z, output_type="pt", do_scaling=False, extra_params=extra))
    torch.testing.assert_close(out, raw_decode(models["sd15"], z), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- refusals specific to decode outputs


def test_bad_extension_values_are_refused(server):
    z = latent(1, 4, 8, 8)
    cases = [
        ("pt", [("output_dtype", "uint8")], "output_dtype='uint8' is not one of float16, bfloat16, float32"),
        ("pil", [("jpeg_quality", "101")], "jpeg_quality=101 must be between 1 and 100"),
        ("pil", [("jpeg_quality", "0")], "jpeg_quality=0 must be at least 1"),
        ("pil", [("jpeg_quality", "high")], "jpeg_quality='high' is not an integer"),
        ("pt", [("tile", "maybe")], "tile='maybe' is not one of auto, on, off"),
        ("pt", [("tile", "on"), ("tile_size", "big")], "tile_size='big' is not an integer"),
        ("pt", [("tile", "on"), ("tile_size", "4")], "tile_size=4 must be between 16 and 1024 latent pixels"),
    ]
    for output_type, params, message in cases:
        assert message in error_of(
            post_decode(server + "/sd15", z, output_type=output_type, do_scaling=False, extra_params=params),
            400,
        )
    v = latent(1, 16, 2, 4, 4)
    message = error_of(
        post_decode(
            server + "/wan21", v, output_type="mp4", do_scaling=False, extra_params=[("fps", "1000")]
        ),
        400,
    )
    assert "fps=1000 is above the maximum of 240" in message
