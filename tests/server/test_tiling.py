"""Tiled runs: exact blending math, and the seam error of a real (tiny, random) VAE, bounded."""

import pytest
import torch
from diffusers import AutoencoderKL

from remote_vae.local_server.tiling import run_tiled, tile_starts
from remote_vae.testing import random_vae


def upsample(x: torch.Tensor) -> torch.Tensor:
    """A purely local 'decoder': every output pixel depends on one input pixel, so tiling is exact."""
    return torch.nn.functional.interpolate(x[:, :3] * 2 - 1, scale_factor=8, mode="nearest")


@pytest.mark.parametrize(("size", "tile", "overlap"), [(10, 4, 1), (48, 16, 4), (40, 40, 8), (33, 16, 7)])
def test_tile_starts_cover_everything_with_the_overlap(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] + min(tile, size) == size
    for a, b in zip(starts, starts[1:]):
        assert b > a and a + tile - b >= overlap  # neighbours overlap by at least `overlap`


def test_blending_of_a_local_function_is_exact():
    z = torch.randn(2, 4, 37, 29, generator=torch.Generator().manual_seed(0))
    whole = upsample(z)
    tiled = run_tiled(upsample, z, tile=12, overlap=3, scale=8)
    assert tiled.shape == whole.shape == (2, 3, 296, 232)
    torch.testing.assert_close(tiled, whole, rtol=1e-6, atol=1e-6)


def test_tiling_also_runs_downscaling_functions():
    x = torch.randn(1, 3, 64, 96)
    pool = lambda t: torch.nn.functional.avg_pool2d(t, 8)  # noqa: E731
    torch.testing.assert_close(
        run_tiled(pool, x, tile=32, overlap=8, scale=1 / 8), pool(x), rtol=0, atol=1e-6
    )


def test_overlap_must_be_less_than_half_a_tile():
    with pytest.raises(ValueError, match="overlap 8 must be less than half the tile size 16"):
        run_tiled(upsample, torch.zeros(1, 4, 40, 40), tile=16, overlap=8, scale=8)


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    return random_vae("sd15", size="micro", init="default")  # the seam bounds assume its GroupNorm statistics


def test_seam_error_of_tiled_decode_is_bounded(vae):
    """Per-tile GroupNorm statistics make tiles differ; blending keeps the difference small.

    Measured with this random model (outputs in [-1, 1], mean |x| 0.30): tile 32 / overlap 8 gives
    max 0.71, mean 0.030; a real VAE's seams are smaller (its activations are better conditioned).
    """
    z = torch.randn(1, 4, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        whole = vae.decode(z).sample
        tiled = run_tiled(lambda t: vae.decode(t).sample, z, tile=32, overlap=8, scale=8)
    error = (tiled - whole).abs()
    assert error.mean() < 0.04
    assert error.max() < 0.9


def test_seam_error_of_tiled_encode_is_bounded(vae):
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.inference_mode():
        whole = vae.encode(x).latent_dist.mode()
        tiled = run_tiled(lambda t: vae.encode(t).latent_dist.mode(), x, tile=128, overlap=32, scale=1 / 8)
    error = (tiled - whole).abs()
    assert tiled.shape == whole.shape == (1, 4, 32, 32)
    assert error.mean() < 0.04
    assert error.max() < 0.35
