"""Tiny random-weight diffusers VAEs with the real architectures' compression factors."""

from __future__ import annotations

import diffusers
import torch

from remote_vae.remote.presets import PRESETS


def tiny_kl(latent_channels: int, seed: int = 0, **config) -> diffusers.AutoencoderKL:
    """An AutoencoderKL with the real architecture's 4 levels (8x spatial compression), tiny widths."""
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        block_out_channels=(16, 16, 32, 32),
        down_block_types=4 * ["DownEncoderBlock2D"],
        up_block_types=4 * ["UpDecoderBlock2D"],
        norm_num_groups=8,
        layers_per_block=1,
        latent_channels=latent_channels,
        **config,
    ).eval()


def tiny_hunyuan(seed: int = 0) -> diffusers.AutoencoderKLHunyuanVideo:
    torch.manual_seed(seed)
    return diffusers.AutoencoderKLHunyuanVideo(
        block_out_channels=(8, 8, 16, 16), norm_num_groups=4, layers_per_block=1, latent_channels=16
    ).eval()


def tiny_wan(seed: int = 0) -> diffusers.AutoencoderKLWan:
    torch.manual_seed(seed)
    return diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1).eval()


def tiny_models() -> dict[str, torch.nn.Module]:
    """One tiny model per preset the compat tests cover, with each preset's scaling in its config."""
    return {
        "sd15": tiny_kl(4, seed=1, scaling_factor=PRESETS["sd15"].scaling_factor),
        "sdxl": tiny_kl(4, seed=2, scaling_factor=PRESETS["sdxl"].scaling_factor),
        "flux": tiny_kl(
            16, seed=3, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False
        ),
        "hunyuan_video": tiny_hunyuan(seed=4),
        "wan21": tiny_wan(seed=5),
    }
