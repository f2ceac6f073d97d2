"""Rendering decoder output to 8 bits: the CPU's table path gives exactly what the formula gives."""

from __future__ import annotations

import pytest
import torch

from remote_vae.local_server import postprocess


def formula(x: torch.Tensor) -> torch.Tensor:
    """diffusers' VaeImageProcessor with the denormalisation in float16, NCHW -> NHWC (written out here
    so that the table is checked against the arithmetic, not against itself)."""
    unit = (x.half() * 0.5 + 0.5).clamp(0, 1)
    return (unit.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def every_float16(channels: int = 3, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """[1,channels,256,256]: each channel holds all 65536 bit patterns of a 16-bit float (NaNs, infinities,
    subnormals and -0 included), in a different order per channel."""
    patterns = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16)
    planes = [patterns.roll(4099 * c).view(dtype) for c in range(channels)]
    return torch.stack(planes).view(1, channels, 256, 256)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_table_path_matches_the_formula_for_every_16_bit_pattern(dtype):
    """bfloat16 has its own table (its rounding to float16 built in): every pattern, NaN and values
    beyond float16's range included, gives what the formula gives."""
    x = every_float16(dtype=dtype)
    got = postprocess.to_uint8(x)
    assert got.dtype == torch.uint8 and got.is_contiguous() and list(got.shape) == [1, 256, 256, 3]
    assert torch.equal(got, formula(x))
    assert torch.equal(postprocess.uint8_reference(x), formula(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wider_outputs_are_rounded_to_float16_first(dtype):
    x = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(0)).mul(1.5).to(dtype)
    x[0, 0, 0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 65520.0])  # 65520 -> inf
    assert torch.equal(postprocess.to_uint8(x), formula(x))


def test_video_frames_come_first_in_the_same_gather():
    x = every_float16().view(1, 3, 4, 64, 256).repeat(2, 1, 1, 1, 1)
    x[1] = x[1].flip(-1)
    frames = postprocess.frames_first(x)
    got = postprocess.to_uint8(x)
    assert list(got.shape) == [8, 64, 256, 3] and got.is_contiguous()
    assert torch.equal(got, formula(frames))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_non_contiguous_and_other_channel_counts(dtype):
    x = every_float16(4, dtype)[:, :, ::2, 1::3]
    assert not x.is_contiguous()
    assert torch.equal(postprocess.to_uint8(x), formula(x))


@pytest.mark.parametrize("threads", [1, 3])
def test_large_outputs_are_gathered_in_bands_of_rows(monkeypatch, threads):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(postprocess, "_BAND_VALUES", 1 << 12)
    patterns = every_float16().flatten()
    x = patterns.repeat(2)[: 3 * 131 * 296].view(1, 3, 131, 296)  # odd height: uneven bands
    assert torch.equal(postprocess.to_uint8(x), formula(x))
    video = x[..., :130, :].reshape(1, 3, 2, 65, 296)
    assert torch.equal(postprocess.to_uint8(video), formula(postprocess.frames_first(video)))
