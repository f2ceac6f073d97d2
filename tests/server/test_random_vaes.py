"""remote_vae.testing: the seeded random VAEs and the ComfyUI reference the other tests and the benches use."""

from __future__ import annotations

import pytest
import torch

from remote_vae.remote.presets import PRESETS
from remote_vae.testing import comfy_decode, comfy_encode, random_vae


@pytest.mark.parametrize("preset_name", list(PRESETS))
def test_every_preset_decodes_and_encodes_with_its_compression(preset_name):
    preset = PRESETS[preset_name]
    model = random_vae(preset_name, size="micro")
    s, t = preset.spatial_compression, preset.temporal_compression
    if preset.is_video:
        latent = torch.randn(1, preset.latent_channels, 2, 2, 3, generator=torch.Generator().manual_seed(0))
        frames = comfy_decode(model, latent)
        assert frames.shape == (t + 1, 2 * s, 3 * s, 3)
        assert comfy_decode(model, latent, frames_as_batch=False).shape == (1, t + 1, 2 * s, 3 * s, 3)
        assert comfy_encode(model, frames, video=True).shape == latent.shape
    else:
        latent = torch.randn(2, preset.latent_channels, 2, 3, generator=torch.Generator().manual_seed(0))
        frames = comfy_decode(model, latent)
        assert frames.shape == (2, 2 * s, 3 * s, 3)
        assert comfy_encode(model, frames).shape == latent.shape
    assert frames.dtype == torch.float32 and 0 <= frames.min() and frames.max() <= 1


@pytest.mark.parametrize("init", ["varied", "default"])
def test_weights_follow_the_seed_and_leave_the_global_random_state_alone(init):
    state = torch.random.get_rng_state()
    a, b, c = (random_vae("sd15", seed, size="micro", init=init) for seed in (1, 1, 2))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.decoder.conv_in.weight, c.decoder.conv_in.weight)
    assert not a.training and not any(p.requires_grad for p in a.parameters())


def test_config_overrides_the_size():
    model = random_vae("sd15", size="micro", mid_block_add_attention=False)
    assert (
        list(model.config.block_out_channels) == [16, 16, 32, 32] and not model.config.mid_block_add_attention
    )


def test_unknown_preset_or_size_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown preset 'sd9': pick one of sd15, sdxl, "):
        random_vae("sd9")
    with pytest.raises(ValueError, match="size 'huge' is not one of micro, tiny, comfy, full"):
        random_vae("sd15", size="huge")
