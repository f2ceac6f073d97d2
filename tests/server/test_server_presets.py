"""Presets beyond diffusers' own endpoints: SD3 (16-channel, no quant convs) and Qwen-Image (a Wan-style
VAE whose image latents carry one latent frame, [B,16,1,H,W])."""

from __future__ import annotations

import io

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from remote_vae.remote.presets import PRESETS
from remote_vae.testing import random_vae
from support.serving import error_of, hosting, post_decode, post_encode, tensor_of

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def more():
    torch.manual_seed(7)
    models = {
        "sd3": random_vae("sd3", 7),
        "qwen_image": diffusers.AutoencoderKLQwenImage(
            base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1
        ).eval(),
    }
    with hosting({name: (name, model) for name, model in models.items()}) as (url, _host):
        yield url, models


def test_sd3_scaled_latents(more):
    url, models = more
    z = torch.randn(1, 16, 8, 8)
    out = tensor_of(
        post_decode(
            url + "/sd3", z, output_type="pt", do_scaling=True, extra_params=[("output_dtype", "float32")]
        )
    )
    with torch.no_grad():
        want = models["sd3"].decode(PRESETS["sd3"].to_raw(z)).sample
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_qwen_image_latents_decode_to_one_image(more):
    url, models = more
    z = torch.randn(1, 16, 1, 8, 8)
    raw = tensor_of(
        post_decode(
            url + "/qwen_image",
            z,
            output_type="pt",
            do_scaling=True,
            extra_params=[("output_dtype", "float32")],
        )
    )
    with torch.no_grad():
        want = models["qwen_image"].decode(PRESETS["qwen_image"].to_raw(z)).sample
    assert list(raw.shape) == [1, 3, 1, 64, 64]
    torch.testing.assert_close(raw, want, atol=1e-5, rtol=1e-5)
    png = post_decode(url + "/qwen_image", z, output_type="pil", image_format="png", do_scaling=True)
    pixels = tensor_of(
        post_decode(url + "/qwen_image", z, output_type="pt", partial_postprocess=True, do_scaling=True)
    )
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png.content))), pixels[0].numpy())
    assert "output_type=mp4 returns one video but the latent holds 2" in error_of(
        post_decode(url + "/qwen_image", torch.randn(2, 16, 1, 8, 8), output_type="mp4", do_scaling=False),
        400,
    )


def test_qwen_image_encodes_an_image_to_one_latent_frame(more):
    url, models = more
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    out = tensor_of(post_encode(url + "/qwen_image", x))
    with torch.no_grad():
        want = models["qwen_image"].encode(x[:, :, None]).latent_dist.mode()
    assert list(out.shape) == [1, 16, 1, 4, 4]
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
