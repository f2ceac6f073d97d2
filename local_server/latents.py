"""Latent tensors: checking them against the hosted model, unpacking Flux-style packed latents and
moving between diffusion and VAE space.

Pure functions on tensors (docs/protocol.md, "Scaling"); the model's own factors come from its backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..remote.presets import Preset, PresetError, check_latent
from ..remote.protocol import ProtocolError, Scaling


class Factors(NamedTuple):
    """A model's own scaling and shift factors (its config's, else its preset's)."""

    scale: float
    shift: float | None


def unpack_latents(latent: torch.Tensor, height: int, width: int, spatial: int) -> torch.Tensor:
    """Flux-style packed [B, N, C*4] -> [B, C, h, w], exactly as diffusers' `_unpack_latents`."""
    batch, tokens, features = latent.shape
    h, w = 2 * (height // (spatial * 2)), 2 * (width // (spatial * 2))
    if features % 4 or h == 0 or w == 0 or tokens != (h // 2) * (w // 2):
        raise PresetError(
            f"packed latent of shape {list(latent.shape)} does not fit height={height} width={width}: "
            f"that size packs into {(h // 2) * (w // 2)} tokens of 4*C features"
        )
    channels = features // 4
    x = latent.view(batch, h // 2, w // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(batch, channels, h, w)


def prepare_latent(
    preset: Preset, latent: torch.Tensor, height: int | None, width: int | None
) -> torch.Tensor:
    """Validate a latent against the hosted model's `preset`: a 3-D latent is packed for an image model
    (unpacked here, from `height` and `width`) and [B,C,L] for an audio model (which takes no size)."""
    if latent.ndim == 3 and preset.dims == 2:
        if height is None or width is None:
            raise ProtocolError("packed (3-D) latents need both `height` and `width` parameters")
        latent = unpack_latents(latent, height, width, preset.spatial_compression)
    if preset.is_audio and (height is not None or width is not None):
        raise ProtocolError(
            f"model {preset.name} decodes audio: its latents [B,{preset.latent_channels},L] take no `height` or "
            "`width` (those size packed image latents); drop them"
        )
    check_latent(preset, latent.shape)
    return latent


def latent_fits(preset: Preset, shape: Sequence[int]) -> bool:
    """Whether a latent of `shape` is one of `preset`'s (packed ones once unpacked)."""
    try:
        check_latent(preset, shape)
    except PresetError:
        return False
    return True


def to_vae_space(latent: torch.Tensor, scaling: Scaling, factors: Factors, preset: Preset) -> torch.Tensor:
    """Undo the diffusion-space scaling before decoding; float32 for accuracy.

    Factor parameters win; `do_scaling=True` alone uses the model's `factors` (per-channel mean/std for
    Wan-style presets); nothing sent means the latent is already raw.
    """
    z = latent.float()
    if scaling.use_model_defaults:
        if preset.uses_mean_std:
            return preset.to_raw(z)
        shift = scaling.shift_factor if scaling.shift_factor is not None else factors.shift
        return z / factors.scale + (shift or 0.0)
    if scaling.scaling_factor is not None:
        z = z / scaling.scaling_factor
    if scaling.shift_factor is not None:
        z = z + scaling.shift_factor
    return z


def from_vae_space(z: torch.Tensor, scaling: Scaling, factors: Factors, preset: Preset) -> torch.Tensor:
    """The inverse of `to_vae_space`, for encode: `(z - shift) * scale` when asked for."""
    z = z.float()
    if scaling.use_model_defaults:
        if preset.uses_mean_std:
            return preset.from_raw(z)
        shift = scaling.shift_factor if scaling.shift_factor is not None else factors.shift
        return (z - (shift or 0.0)) * factors.scale
    if scaling.shift_factor is not None:
        z = z - scaling.shift_factor
    if scaling.scaling_factor is not None:
        z = z * scaling.scaling_factor
    return z


def preset_factors(preset: Preset) -> Factors:
    """The preset's factors: the model's own until it is loaded (its config may differ slightly)."""
    return Factors(preset.scaling_factor, preset.shift_factor)


def check_scaling(latent: torch.Tensor, scaling: Scaling, factors: Factors, preset: Preset) -> None:
    """Refuse factors that would make a (finite) latent non-finite in `to_vae_space` (1e-320 -> inf).

    Scaling is monotone per channel, so each channel's extremes decide it exactly: two values per
    channel are scaled instead of the whole latent.
    """
    if scaling.is_identity:
        return
    others = [dim for dim in range(latent.ndim) if dim != 1]
    extremes = torch.cat([latent.amin(others, keepdim=True), latent.amax(others, keepdim=True)])
    if not bool(torch.isfinite(to_vae_space(extremes, scaling, factors, preset)).all()):
        raise ProtocolError(_not_finite(scaling, "z = x / scaling_factor + shift_factor", preset))


def to_diffusion_space(z: torch.Tensor, scaling: Scaling, factors: Factors, preset: Preset) -> torch.Tensor:
    """`from_vae_space`, refusing factors that turn the encoder's finite latents non-finite."""
    x = from_vae_space(z, scaling, factors, preset)
    if not scaling.is_identity and not bool(torch.isfinite(x).all()) and bool(torch.isfinite(z).all()):
        raise ProtocolError(_not_finite(scaling, "x = (z - shift_factor) * scaling_factor", preset))
    return x


def _not_finite(scaling: Scaling, formula: str, preset: Preset) -> str:
    sent = (("scaling_factor", scaling.scaling_factor), ("shift_factor", scaling.shift_factor))
    named = (
        " and ".join(f"{name}={value!r}" for name, value in sent if value is not None) or "do_scaling=True"
    )
    own = "" if preset.uses_mean_std else f" or scaling_factor={preset.scaling_factor}"
    return f"{named} makes the latents infinite or NaN in float32 ({formula}); send do_scaling=True{own}"


def as_is(x: torch.Tensor, scaling: Scaling, factors: Factors, preset: Preset) -> torch.Tensor:
    """The pixel side of a job: no scaling."""
    return x
