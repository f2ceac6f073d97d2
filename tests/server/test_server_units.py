"""The server's plain functions, without HTTP: pixel arithmetic, unpacking, scaling, dtype choice."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from remote_vae.local_server import postprocess
from remote_vae.local_server.backends.diffusers import model_factors
from remote_vae.local_server.devices import resolve_device, resolve_dtype
from remote_vae.local_server.latents import from_vae_space, to_vae_space, unpack_latents
from remote_vae.remote.presets import PRESETS, PresetError
from remote_vae.remote.protocol import Scaling

# hf-protocol.md 8.2: raw `pt` slices and the partial_postprocess slices the HF endpoints returned.
REFERENCE_VECTORS = {
    "sd15": (
        [-0.2177, 0.0217, -0.2258, 0.0412, -0.1687, -0.1232, -0.2416, -0.2130, -0.0543],
        [100, 130, 99, 133, 106, 112, 97, 100, 121],
    ),
    "sdxl": (
        [-0.3945, -0.3289, -0.2993, -0.6177, -0.5259, -0.4119, -0.5898, -0.4863, -0.3845],
        [77, 86, 89, 49, 60, 75, 52, 65, 78],
    ),
    "flux": (
        [0.5820, 0.5962, 0.5898, 0.5439, 0.5327, 0.5112, 0.4797, 0.4773, 0.3984],
        [202, 203, 203, 197, 195, 193, 189, 188, 178],
    ),
    "flux_packed": (
        [0.3198, 0.6631, 0.5864, 0.2131, 0.4944, 0.4482, 0.1776, 0.4153, 0.3176],
        [168, 212, 202, 155, 191, 185, 150, 180, 168],
    ),
    "hunyuan_video": (
        [0.1656, 0.2661, 0.3157, 0.0693, 0.1755, 0.2252, 0.0127, 0.1221, 0.1708],
        [149, 161, 168, 136, 150, 156, 129, 143, 149],
    ),
    "wan21": (
        [0.6196, 0.6382, 0.7310, 0.5869, 0.5625, 0.7373, 0.6240, 0.6465, 0.7002],
        [206, 209, 221, 202, 199, 222, 207, 210, 217],
    ),
}


@pytest.mark.parametrize("name", list(REFERENCE_VECTORS))
def test_uint8_conversion_reproduces_the_hf_reference_vectors(name):
    raw, want = REFERENCE_VECTORS[name]
    x = torch.tensor(raw, dtype=torch.float16).view(1, 1, 3, 3)  # one channel is enough: it is per element
    assert postprocess.to_uint8(x).flatten().tolist() == want


def test_uint8_conversion_of_video_puts_frames_first():
    x = torch.linspace(-1, 1, 2 * 3 * 5 * 4 * 6).view(2, 3, 5, 4, 6)
    out = postprocess.to_uint8(x)
    assert list(out.shape) == [10, 4, 6, 3]
    assert torch.equal(out[7], postprocess.to_uint8(x[1, :, 2][None])[0])  # batch 1, frame 2
    unit = postprocess.to_unit(x)
    assert list(unit.shape) == [10, 3, 4, 6] and unit.dtype == torch.float16
    assert unit.min() == 0 and unit.max() == 1


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 2),
    half_h=st.integers(1, 4),
    half_w=st.integers(1, 4),
    channels=st.sampled_from([4, 16]),
)
def test_unpack_matches_diffusers(batch, half_h, half_w, channels):
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    height, width = half_h * 16, half_w * 16
    packed = torch.randn(batch, half_h * half_w, channels * 4)
    want = FluxPipeline._unpack_latents(packed, height, width, 8)
    assert torch.equal(unpack_latents(packed, height, width, 8), want)
    # sizes that are not multiples of 16 round down, as in diffusers
    assert torch.equal(unpack_latents(packed, height + 15, width + 9, 8), want)


def test_unpack_refuses_latents_that_do_not_fit():
    with pytest.raises(PresetError, match=r"does not fit height=64 width=64: that size packs into 16 tokens"):
        unpack_latents(torch.zeros(1, 15, 64), 64, 64, 8)
    with pytest.raises(PresetError, match="does not fit height=8 width=64"):
        unpack_latents(torch.zeros(1, 4, 64), 8, 64, 8)
    with pytest.raises(PresetError, match="does not fit"):
        unpack_latents(torch.zeros(1, 16, 63), 64, 64, 8)


class _Configured(torch.nn.Module):
    def __init__(self, **config) -> None:
        super().__init__()
        self.config = config


def test_scaling_precedence_and_inverse():
    flux = PRESETS["flux"]
    model = _Configured(scaling_factor=2.0, shift_factor=0.5)  # differs from the preset: the config wins
    z = torch.randn(2, 16, 3, 3)
    torch.testing.assert_close(
        to_vae_space(z, Scaling(use_model_defaults=True), model_factors(model, flux), flux), z / 2.0 + 0.5
    )
    torch.testing.assert_close(to_vae_space(z, Scaling(4.0, None), model_factors(model, flux), flux), z / 4.0)
    torch.testing.assert_close(to_vae_space(z, Scaling(None, 1.0), model_factors(model, flux), flux), z + 1.0)
    assert torch.equal(to_vae_space(z, Scaling(), model_factors(model, flux), flux), z)
    # a model without a config falls back to the preset's factors
    torch.testing.assert_close(
        to_vae_space(z, Scaling(use_model_defaults=True), model_factors(_Configured(), flux), flux),
        z / 0.3611 + 0.1159,
    )
    for scaling in (Scaling(use_model_defaults=True), Scaling(4.0, -0.25), Scaling(), Scaling(None, 1.0)):
        torch.testing.assert_close(
            from_vae_space(
                to_vae_space(z, scaling, model_factors(model, flux), flux),
                scaling,
                model_factors(model, flux),
                flux,
            ),
            z,
        )
    wan = PRESETS["wan21"]
    v = torch.randn(1, 16, 2, 2, 2)
    torch.testing.assert_close(
        to_vae_space(v, Scaling(use_model_defaults=True), model_factors(_Configured(), wan), wan),
        wan.to_raw(v),
    )
    torch.testing.assert_close(
        from_vae_space(v, Scaling(use_model_defaults=True), model_factors(_Configured(), wan), wan),
        wan.from_raw(v),
    )


def test_scaling_is_done_in_float32():
    z = torch.full((1, 4, 1, 1), 1000.0, dtype=torch.float16)
    out = to_vae_space(z, Scaling(0.18215), model_factors(_Configured(), PRESETS["sd15"]), PRESETS["sd15"])
    assert out.dtype == torch.float32 and out[0, 0, 0, 0].item() == pytest.approx(1000 / 0.18215)


def test_dtype_and_device_choice():
    cpu = torch.device("cpu")
    assert resolve_dtype(None, PRESETS["sdxl"], cpu) == torch.float32
    assert resolve_dtype("auto", PRESETS["sdxl"], torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", PRESETS["sd15"], torch.device("cuda")) == torch.float16
    assert resolve_dtype("bfloat16", PRESETS["sd15"], cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype 'float64' is not one of auto, float16, bfloat16, float32"):
        resolve_dtype("float64", PRESETS["sd15"], cpu)
    assert resolve_device("cpu") == cpu
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_mp4_pads_odd_sizes_to_even():
    frames = np.random.default_rng(0).integers(0, 256, (3, 17, 21, 3), dtype=np.uint8)
    data = postprocess.encode_mp4(frames, fps=12)
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height) == (22, 18)
        assert stream.average_rate == 12 and stream.codec_context.name == "h264"
        assert sum(1 for _ in container.decode(video=0)) == 3


def test_png_is_lossless_and_jpeg_quality_switches_chroma_subsampling():
    from PIL import Image, JpegImagePlugin

    pixels = np.random.default_rng(1).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    png = postprocess.encode_image(pixels, "png")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), pixels)
    high = Image.open(io.BytesIO(postprocess.encode_image(pixels, "jpeg", 95)))
    low = Image.open(io.BytesIO(postprocess.encode_image(pixels, "jpeg", 50)))
    assert JpegImagePlugin.get_sampling(high) == 0 and JpegImagePlugin.get_sampling(low) == 2
