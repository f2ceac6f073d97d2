"""diffusers' own, unmodified `remote_decode` / `remote_encode` against our server.

Every output form diffusers supports, for image (sd15, sdxl, flux unpacked and packed) and video
(hunyuan_video, wan21) models, each compared with running the same tiny model in-process.
"""

from __future__ import annotations

import io
import math
import warnings

import av
import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.remote_utils import remote_decode, remote_encode
from diffusers.video_processor import VideoProcessor
from PIL import Image

from remote_vae.remote.presets import PRESETS

pytestmark = pytest.mark.timeout(300)

IMAGE_MODELS = ["sd15", "sdxl", "flux"]
VIDEO_MODELS = ["hunyuan_video", "wan21"]


def hf_factors(name: str) -> dict[str, float]:
    return PRESETS[name].hf_scaling()


def latent_for(name: str, seed: int = 13) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    preset = PRESETS[name]
    shape = (1, preset.latent_channels, 3, 4, 4) if preset.is_video else (1, preset.latent_channels, 8, 8)
    return torch.randn(shape, generator=generator)


def reference_decode(model, name: str, latent: torch.Tensor, *, scaled: bool) -> torch.Tensor:
    """In-process decode of diffusion-space latents (scaled=True) or raw latents, float32."""
    z = latent.float()
    if scaled:
        z = PRESETS[name].to_raw(z)
    with torch.no_grad():
        return model.decode(z).sample


def reference_uint8(x: torch.Tensor) -> torch.Tensor:
    """NHWC uint8 frames as diffusers' processors make them (float16 denormalise, see hf-protocol 8.3)."""
    if x.ndim == 5:
        x = x.permute(0, 2, 1, 3, 4).flatten(0, 1)
    unit = (x.half() * 0.5 + 0.5).clamp(0, 1)
    return (unit.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def assert_within_one(got: torch.Tensor | np.ndarray, want: torch.Tensor) -> None:
    got = (got if isinstance(got, torch.Tensor) else torch.from_numpy(np.array(got))).to(torch.int16)
    assert got.shape == want.shape
    assert (got - want.to(torch.int16)).abs().max().item() <= 1


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def decode(url: str, name: str, latent: torch.Tensor, **kwargs):
    """remote_decode with the preset's factors (diffusers' recommended, non-deprecated path)."""
    return remote_decode(f"{url}/{name}", latent, **hf_factors(name), **kwargs)


# --------------------------------------------------------------------------- image decode


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_pt_raw_equals_in_process_decode(server, models, name):
    latent = latent_for(name)
    out = decode(server, name, latent, output_type="pt", return_type="pt")
    want = reference_decode(models[name], name, latent, scaled=True)
    assert out.dtype == torch.float16 and list(out.shape) == [1, 3, 64, 64]
    torch.testing.assert_close(out.float(), want, atol=2e-3, rtol=1e-3)


def test_flux_packed_latents_decode_like_the_unpacked_ones(server, models):
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    packed = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    out = decode(server, "flux", packed, output_type="pt", return_type="pt", height=64, width=64)
    unpacked = FluxPipeline._unpack_latents(packed, 64, 64, 8)
    want = reference_decode(models["flux"], "flux", unpacked, scaled=True)
    assert list(out.shape) == [1, 3, 64, 64]
    torch.testing.assert_close(out.float(), want, atol=2e-3, rtol=1e-3)
    image = decode(server, "flux", packed, output_type="pil", image_format="png", height=64, width=64)
    assert_within_one(np.asarray(image)[None], reference_uint8(want))


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_partial_postprocess_uint8_nhwc(server, models, name):
    latent = latent_for(name)
    want = reference_uint8(reference_decode(models[name], name, latent, scaled=True))
    out = decode(server, name, latent, output_type="pt", partial_postprocess=True, return_type="pt")
    assert out.dtype == torch.uint8 and list(out.shape) == [1, 64, 64, 3]
    assert_within_one(out, want)
    image = decode(server, name, latent, output_type="pt", partial_postprocess=True, return_type="pil")
    assert isinstance(image, Image.Image) and image.size == (64, 64)
    assert_within_one(np.asarray(image)[None], want)


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_pt_with_client_processor(server, models, name):
    latent = latent_for(name)
    image = decode(server, name, latent, output_type="pt", processor=VaeImageProcessor(), return_type="pil")
    want = reference_uint8(reference_decode(models[name], name, latent, scaled=True))
    assert_within_one(np.asarray(image)[None], want)


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_pil_png_is_exact(server, models, name):
    latent = latent_for(name)
    image = decode(server, name, latent, output_type="pil", image_format="png")
    assert image.format == "png" and image.size == (64, 64)
    want = reference_uint8(reference_decode(models[name], name, latent, scaled=True))
    assert torch.equal(torch.from_numpy(np.asarray(image).copy())[None], want)


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_pil_jpeg_is_close(server, models, name):
    latent = latent_for(name)
    image = decode(server, name, latent, output_type="pil", image_format="jpg")
    assert image.format == "jpeg" and image.size == (64, 64)
    want = reference_uint8(reference_decode(models[name], name, latent, scaled=True))[0].numpy()
    assert psnr(np.asarray(image), want) > 30


def test_no_scaling_sends_raw_latents(server, models):
    latent = latent_for("sd15")
    out = remote_decode(f"{server}/sd15", latent, do_scaling=False, output_type="pt", return_type="pt")
    want = reference_decode(models["sd15"], "sd15", latent, scaled=False)
    torch.testing.assert_close(out.float(), want, atol=2e-3, rtol=1e-3)


def test_deprecated_do_scaling_uses_the_model_config(server, models):
    latent = latent_for("flux")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers' own deprecation notice
        out = remote_decode(f"{server}/flux", latent, do_scaling=True, output_type="pt", return_type="pt")
    want = reference_decode(models["flux"], "flux", latent, scaled=True)  # config holds 0.3611 / 0.1159
    torch.testing.assert_close(out.float(), want, atol=2e-3, rtol=1e-3)


# --------------------------------------------------------------------------- video decode


def video_decode(url: str, name: str, latent: torch.Tensor, **kwargs):
    if PRESETS[name].uses_mean_std:  # Wan has no scaling_factor: the deprecated do_scaling path
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return remote_decode(f"{url}/{name}", latent, do_scaling=True, **kwargs)
    return decode(url, name, latent, **kwargs)


@pytest.mark.parametrize("name", VIDEO_MODELS)
def test_video_pt_raw(server, models, name):
    latent = latent_for(name)
    out = video_decode(server, name, latent, output_type="pt", return_type="pt")
    want = reference_decode(models[name], name, latent, scaled=True)
    assert out.dtype == torch.float16 and list(out.shape) == [1, 3, 9, 32, 32]
    torch.testing.assert_close(out.float(), want, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("name", VIDEO_MODELS)
def test_video_partial_postprocess_frames(server, models, name):
    latent = latent_for(name)
    want = reference_uint8(reference_decode(models[name], name, latent, scaled=True))
    out = video_decode(server, name, latent, output_type="pt", partial_postprocess=True, return_type="pt")
    assert list(out.shape) == [9, 32, 32, 3]
    assert_within_one(out, want)
    frames = video_decode(server, name, latent, output_type="pt", partial_postprocess=True, return_type="pil")
    assert len(frames) == 9
    assert_within_one(np.stack([np.asarray(f) for f in frames]), want)


@pytest.mark.parametrize("name", VIDEO_MODELS)
def test_video_pil_with_processor_flag(server, models, name):
    latent = latent_for(name)
    want = reference_uint8(reference_decode(models[name], name, latent, scaled=True))
    frames = video_decode(
        server, name, latent, output_type="pil", processor=VideoProcessor(), return_type="pil"
    )
    assert len(frames) == 9 and frames[0].size == (32, 32)
    assert_within_one(np.stack([np.asarray(f) for f in frames]), want)
    unit = video_decode(server, name, latent, output_type="pil", processor=VideoProcessor(), return_type="pt")
    assert unit.dtype == torch.float16 and list(unit.shape) == [9, 3, 32, 32]
    assert 0 <= unit.min().item() and unit.max().item() <= 1


@pytest.mark.parametrize("name", VIDEO_MODELS)
def test_video_pt_with_client_video_processor(server, models, name):
    latent = latent_for(name)
    frames = video_decode(
        server, name, latent, output_type="pt", processor=VideoProcessor(), return_type="pil"
    )
    want = reference_uint8(reference_decode(models[name], name, latent, scaled=True))
    assert_within_one(np.stack([np.asarray(f) for f in frames]), want)


@pytest.mark.parametrize("name", VIDEO_MODELS)
def test_video_mp4(server, models, name):
    latent = latent_for(name)
    data = video_decode(server, name, latent, output_type="mp4", return_type="mp4")
    assert isinstance(data, bytes) and data[4:8] == b"ftyp"
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == PRESETS[name].fps
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (32, 32, 3)
    want = reference_uint8(reference_decode(models[name], name, latent, scaled=True)).numpy()
    assert psnr(np.stack(frames), want) > 20  # lossy yuv420p of noise-like frames: a sanity bound


# --------------------------------------------------------------------------- encode


def reference_encode(model, x: torch.Tensor, name: str | None = None) -> torch.Tensor:
    with torch.no_grad():
        z = model.encode(x.float()).latent_dist.mode()
    return PRESETS[name].from_raw(z) if name else z


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_encode_pil_image(server, models, name):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8))
    out = remote_encode(f"{server}/{name}", image)
    want = reference_encode(models[name], VaeImageProcessor().preprocess(image))
    assert out.dtype == torch.float32 and list(out.shape) == [1, PRESETS[name].latent_channels, 8, 6]
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_encode_tensor_with_scaling(server, models, name):
    x = torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = remote_encode(f"{server}/{name}", x, **hf_factors(name))
    want = reference_encode(models[name], x, name)
    assert list(out.shape) == [2, PRESETS[name].latent_channels, 4, 5]
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


def test_encode_float16_tensor(server, models):
    x = (torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1).half()
    out = remote_encode(f"{server}/sd15", x)
    torch.testing.assert_close(out, reference_encode(models["sd15"], x), atol=1e-4, rtol=1e-4)


def test_encode_then_decode_round_trip_shapes(server):
    image = Image.new("RGB", (64, 64), (200, 30, 90))
    latent = remote_encode(f"{server}/sdxl", image, scaling_factor=0.13025)
    decoded = remote_decode(f"{server}/sdxl", latent, scaling_factor=0.13025, image_format="png")
    assert decoded.size == (64, 64)


@pytest.mark.parametrize("name", VIDEO_MODELS)
def test_encode_video_tensor(server, models, name):
    x = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    out = remote_encode(f"{server}/{name}", x)
    assert list(out.shape) == [1, 16, 3, 4, 4]
    torch.testing.assert_close(out, reference_encode(models[name], x), atol=1e-4, rtol=1e-4)
