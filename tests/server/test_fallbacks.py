"""Tiling on request or by memory budget, and the out-of-memory and NaN fallbacks."""

import pytest
import requests
import torch

from remote_vae.local_server.jobs import _all_finite
from remote_vae.local_server.registry import Tuning
from remote_vae.testing import random_vae
from support.hooked import Wrapped
from support.one_model import hosting, pt, reference, z
from support.serving import error_of, post_encode, tensor_of


def test_tiling_on_request_and_by_memory_budget(vae):
    latent = z(1, 4, 48, 48, seed=3)
    whole = reference(vae, latent)
    # A 48x48 latent needs ~1.3 GB by the estimate; 600 MiB gives tiles of about 32 latent pixels.
    with hosting(vae, options=Tuning(memory_budget=600 << 20)) as url:
        auto = tensor_of(pt(url, latent))
        forced_off = tensor_of(pt(url, latent, extra_params=[("tile", "off")]))
        text = requests.get(url + "/metrics", timeout=10).text
    assert (auto - whole).abs().mean() < 0.04 and not torch.equal(auto, whole)
    torch.testing.assert_close(forced_off, whole, rtol=1e-4, atol=1e-4)
    assert 'remote_vae_tiled_total{model="sd15"} 1' in text
    with hosting(vae) as url:
        on = tensor_of(pt(url, latent, extra_params=[("tile", "on"), ("tile_size", "24")]))
    assert (on - whole).abs().mean() < 0.05


def test_tiled_encode(vae):
    pixels = (torch.rand(1, 256, 256, 3, generator=torch.Generator().manual_seed(5)) * 255).to(torch.uint8)
    with hosting(vae) as url:
        whole = tensor_of(post_encode(url + "/sd15/encode", pixels))
        tiled = tensor_of(
            post_encode(url + "/sd15/encode", pixels, extra_params=[("tile", "on"), ("tile_size", "16")])
        )
    assert tiled.shape == whole.shape == (1, 4, 32, 32)
    assert (tiled - whole).abs().mean() < 0.04


def test_out_of_memory_falls_back_to_smaller_plans(vae):
    def oom_when_big(latent):
        if latent.shape[0] > 1 or latent.shape[-1] > 24:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    model = Wrapped(vae, before=oom_when_big)
    latent = z(2, 4, 32, 32, seed=4)
    with hosting(model) as url:
        out = tensor_of(pt(url, latent))
        text = requests.get(url + "/metrics", timeout=10).text
    assert out.shape == (2, 3, 256, 256)
    assert (out - reference(vae, latent)).abs().mean() < 0.1  # 16-pixel tiles: seams of a random model
    assert model.batches[:2] == [2, 1] and 'remote_vae_fallback_total{model="sd15",kind="oom"}' in text


def test_out_of_memory_everywhere_is_a_507(vae):
    def always(_z):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with hosting(Wrapped(vae, before=always)) as url:
        assert "does not fit in device memory even tiled" in error_of(pt(url, z(1, 4, 16, 16)), 507)


def test_nan_in_half_precision_is_retried_in_float32(vae, caplog):
    class NaNInBF16(Wrapped):
        def decode(self, latent):
            out = self.inner.decode(latent)
            if latent.dtype == torch.bfloat16:
                out.sample.fill_(float("nan"))
            return out

    latent = z(1, 4, 8, 8)
    with hosting(NaNInBF16(random_vae("sd15", 7, size="micro", init="default")), dtype="bfloat16") as url:
        out = tensor_of(pt(url, latent))
        text = requests.get(url + "/metrics", timeout=10).text
    assert torch.isfinite(out).all()
    rounded = (
        random_vae("sd15", 7, size="micro", init="default").to(torch.bfloat16).float()
    )  # the retry runs the bf16-rounded weights in float32
    torch.testing.assert_close(out, reference(rounded, latent), rtol=1e-4, atol=1e-4)
    assert 'remote_vae_fallback_total{model="sd15",kind="nan"} 1' in text
    assert "produced NaN/Inf in torch.bfloat16; retrying in float32" in caplog.text
    assert "try --dtype float32" not in caplog.text  # the retry came out finite


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_float32_output_is_returned_with_a_warning(vae, caplog, bad):
    class OneBadValue(Wrapped):
        def decode(self, latent):
            out = self.inner.decode(latent)
            out.sample[0, 1, 2, 3] = bad
            return out

    with hosting(OneBadValue(vae)) as url:
        out = tensor_of(pt(url, z(1, 4, 8, 8)))
    assert out.isnan().sum() + out.isinf().sum() == 1
    assert "produced NaN/Inf values (dtype torch.float32); try --dtype float32" in caplog.text
    assert "retrying" not in caplog.text


def test_the_finite_check_is_exact():
    big = torch.full((2, 3, 4, 4), torch.finfo(torch.float32).max)
    big[0, 0, 0, 0] = -big[0, 0, 0, 0]  # finite, though any sum of these overflows
    assert _all_finite(big) and _all_finite(torch.empty(0, 3, 8, 8))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = torch.zeros(1, 3, 8, 8, dtype=dtype)
            x[0, 2, 7, 7] = bad
            assert not _all_finite(x), (bad, dtype)


def test_video_tiling_uses_the_models_own_tiles():
    model = random_vae("wan21", 5, size="micro", init="default")
    latent = z(1, 16, 2, 24, 24, seed=6)  # 192 pixels a side: several 128-pixel tiles
    with hosting(model, preset="wan21") as url:
        whole = tensor_of(pt(url, latent, model="wan21"))
        tiled = tensor_of(pt(url, latent, [("tile", "on"), ("tile_size", "16")], model="wan21"))
        metrics = requests.get(url + "/metrics", timeout=10).text
    assert tiled.shape == whole.shape == (1, 3, 5, 192, 192)
    assert not torch.equal(tiled, whole) and (tiled - whole).abs().mean() < 0.05
    assert 'remote_vae_tiled_total{model="wan21"} 1' in metrics
    assert not model.use_tiling  # switched off again after the tiled request
