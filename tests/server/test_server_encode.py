"""Encode over HTTP: body sniffing, input layouts, cropping, scaling and the tensor reply."""

from __future__ import annotations

import io

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from remote_vae.remote.presets import PRESETS
from support.serving import post_encode, tensor_of

pytestmark = pytest.mark.timeout(120)


def mode(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.encode(x.float()).latent_dist.mode()


def pixels(*shape: int, seed: int = 0) -> torch.Tensor:
    """uint8 pixels, NHWC."""
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def as_model_input(nhwc: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1,1], the VaeImageProcessor convention."""
    return (nhwc.float() / 255 * 2 - 1).permute(0, 3, 1, 2)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("path", ["/", "/predict", "/sd15", "/sd15/predict", "/sd15/encode"])
def test_png_body_without_content_type_is_an_encode(server, models, path):
    image = pixels(1, 32, 32, 3)
    response = post_encode(server + path, png_bytes(image[0].numpy()))
    assert response.headers["content-type"] == "tensor/binary"
    torch.testing.assert_close(
        tensor_of(response), mode(models["sd15"], as_model_input(image)), atol=1e-5, rtol=1e-5
    )


def test_reply_is_a_tensor_even_for_accept_anything(server):
    response = post_encode(
        server + "/sd15", png_bytes(pixels(1, 16, 16, 3)[0].numpy()), headers={"Accept": "*/*"}
    )
    assert response.headers["shape"] == "[1,4,2,2]" and response.headers["dtype"] == "float32"


def test_image_content_type_routes_to_encode(server):
    response = post_encode(
        server + "/", png_bytes(pixels(1, 16, 16, 3)[0].numpy()), headers={"Content-Type": "image/png"}
    )
    assert list(tensor_of(response).shape) == [1, 4, 2, 2]


def test_jpeg_body(server, models):
    buffer = io.BytesIO()
    Image.fromarray(pixels(1, 32, 32, 3)[0].numpy()).save(buffer, format="JPEG", quality=90)
    decoded = torch.from_numpy(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")).copy())[
        None
    ]
    out = tensor_of(post_encode(server + "/sd15", buffer.getvalue()))
    torch.testing.assert_close(out, mode(models["sd15"], as_model_input(decoded)), atol=1e-5, rtol=1e-5)


def test_alpha_and_grey_images_become_rgb(server):
    rgb = pixels(1, 32, 32, 3)[0].numpy()
    rgba = np.concatenate([rgb, np.full((32, 32, 1), 7, np.uint8)], axis=-1)
    want = tensor_of(post_encode(server + "/sd15", png_bytes(rgb)))
    assert torch.equal(tensor_of(post_encode(server + "/sd15", png_bytes(rgba))), want)
    grey = pixels(1, 32, 32)[0].numpy()
    grey_rgb = np.repeat(grey[..., None], 3, axis=-1)
    assert torch.equal(
        tensor_of(post_encode(server + "/sd15", png_bytes(grey))),
        tensor_of(post_encode(server + "/sd15", png_bytes(grey_rgb))),
    )


def test_uint8_tensors_are_nhwc_pixels_and_alpha_is_dropped(server, models):
    image = pixels(2, 32, 24, 3)
    want = mode(models["sd15"], as_model_input(image))
    torch.testing.assert_close(tensor_of(post_encode(server + "/sd15", image)), want, atol=1e-5, rtol=1e-5)
    with_alpha = torch.cat([image, pixels(2, 32, 24, 1, seed=9)], dim=-1)
    torch.testing.assert_close(
        tensor_of(post_encode(server + "/sd15", with_alpha)), want, atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        tensor_of(post_encode(server + "/sd15", image[0])), want[:1], atol=1e-5, rtol=1e-5
    )


def test_float_tensors_are_nchw_in_minus_one_to_one(server, models):
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(
        tensor_of(post_encode(server + "/sd15", x)), mode(models["sd15"], x), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        tensor_of(post_encode(server + "/sd15", x[0])), mode(models["sd15"], x), atol=1e-5, rtol=1e-5
    )


def test_sizes_are_centre_cropped_to_the_latent_grid_like_comfyui(server, models):
    x = torch.rand(1, 3, 21, 30) * 2 - 1  # 21 -> 16 from offset 2; 30 -> 24 from offset 3
    out = tensor_of(post_encode(server + "/sd15", x))
    assert list(out.shape) == [1, 4, 2, 3]
    torch.testing.assert_close(out, mode(models["sd15"], x[:, :, 2:18, 3:27]), atol=1e-5, rtol=1e-5)


def test_video_models_take_frames(server, models):
    frames = pixels(9, 32, 32, 3)  # a 4-D uint8 tensor is the frames of ONE video
    want = mode(models["hunyuan_video"], as_model_input(frames).permute(1, 0, 2, 3)[None])
    out = tensor_of(post_encode(server + "/hunyuan_video", frames))
    assert list(out.shape) == [1, 16, 3, 4, 4]
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    videos = torch.stack([frames, pixels(9, 32, 32, 3, seed=1)])  # 5-D uint8: [B,F,H,W,3]
    assert list(tensor_of(post_encode(server + "/hunyuan_video", videos)).shape) == [2, 16, 3, 4, 4]


def test_video_frames_are_cut_to_one_plus_a_multiple_of_four(server, models):
    x = torch.rand(1, 3, 11, 16, 16) * 2 - 1
    out = tensor_of(post_encode(server + "/wan21", x))
    torch.testing.assert_close(out, mode(models["wan21"], x[:, :, :9]), atol=1e-5, rtol=1e-5)


def test_images_to_video_models_are_one_frame_videos(server, models):
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = tensor_of(post_encode(server + "/wan21", x))
    assert list(out.shape) == [2, 16, 1, 2, 2]
    torch.testing.assert_close(out, mode(models["wan21"], x[:, :, None]), atol=1e-5, rtol=1e-5)
    image = tensor_of(post_encode(server + "/wan21", png_bytes(pixels(1, 16, 16, 3)[0].numpy())))
    assert list(image.shape) == [1, 16, 1, 2, 2]


def test_factors_are_applied_only_when_sent(server, models):
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    z = mode(models["flux"], x)
    raw = tensor_of(post_encode(server + "/flux", x))
    torch.testing.assert_close(raw, z, atol=1e-5, rtol=1e-5)
    scaled = tensor_of(post_encode(server + "/flux", x, scaling_factor=2.0, shift_factor=0.5))
    torch.testing.assert_close(scaled, (z - 0.5) * 2.0, atol=1e-5, rtol=1e-5)


def test_do_scaling_on_encode_uses_the_model_config(server, models):
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    out = tensor_of(post_encode(server + "/wan21", x, extra_params=[("do_scaling", "True")]))
    torch.testing.assert_close(
        out, PRESETS["wan21"].from_raw(mode(models["wan21"], x[:, :, None])), atol=1e-5, rtol=1e-5
    )


def test_output_dtype_extension(server, models):
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    response = post_encode(server + "/sd15", x, extra_params=[("output_dtype", "float16")])
    assert response.headers["dtype"] == "float16"
    assert torch.equal(tensor_of(response), mode(models["sd15"], x).half())


def test_unknown_parameters_are_ignored(server):
    response = requests.post(
        server + "/sd15",
        params={"foo": "1", "input_tensor_type": "binary"},
        data=png_bytes(pixels(1, 16, 16, 3)[0].numpy()),
        timeout=60,
    )
    assert list(tensor_of(response).shape) == [1, 4, 2, 2]
