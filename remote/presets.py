"""The model presets: one row per VAE family in `presets.toml` (data, not code paths), and the checks
that match a latent to them.

Values follow ComfyUI's latent formats (scale/shift, per-channel mean/std) and the Hugging Face
hybrid-inference endpoints (docs/protocol.md). Adding a model is adding a row to the table plus a test.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

HF = "https://{}.us-east-1.aws.endpoints.huggingface.cloud/"
TABLE = Path(__file__).with_name("presets.toml")


@dataclass(frozen=True)
class Preset:
    """What a client and a server need to know about one VAE family."""

    name: str
    label: str
    latent_channels: int
    dims: int  # 2: image latents [B,C,H,W]; 3: video latents [B,C,T,H,W]; 1: audio latents [B,C,L] (comfy backend)
    spatial_compression: int
    temporal_compression: int = 1
    scaling_factor: float = 1.0
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    hf_decode_endpoint: str | None = None
    hf_encode_endpoint: str | None = None
    checkpoint: str = ""
    subfolder: str | None = None
    diffusers_class: str = "AutoencoderKL"
    config: dict = field(default_factory=dict)  # architecture for single-file loading without the hub
    safe_dtypes: tuple[str, ...] = ("bfloat16", "float32")  # first: default on GPU
    fps: int = 24
    packed: bool = False  # accepts Flux-style 2x2 packed 3-D latents
    # An image model with a video VAE: [B,C,1,H,W] latents of one latent frame, each one image.
    still_image: bool = False
    # Peak activation memory, in elements (x dtype size = bytes), after ComfyUI's `comfy/sd.py` estimates:
    # decode per latent pixel (per latent frame when `decode_memory_per_frame`), encode per input pixel.
    decode_memory: float = 2178 * 64
    decode_memory_per_frame: bool = False
    encode_memory: float = 1767
    note: str = ""

    @property
    def is_video(self) -> bool:
        return self.dims == 3

    @property
    def is_audio(self) -> bool:
        return self.dims == 1

    @property
    def is_video_model(self) -> bool:
        """A model of videos: an IMAGE batch is the frames of one video (not so for `still_image`)."""
        return self.is_video and not self.still_image

    @property
    def uses_mean_std(self) -> bool:
        return self.latents_mean is not None

    def frames_for(self, latent_frames: int) -> int:
        """Pixel frames decoded from `latent_frames` latent frames (HunyuanVideo/Wan: 4*(T-1)+1)."""
        return (latent_frames - 1) * self.temporal_compression + 1

    def latent_frames_for(self, frames: int) -> int:
        return (frames - 1) // self.temporal_compression + 1

    def hf_scaling(self) -> dict[str, float]:
        """`scaling_factor`/`shift_factor` as diffusers-style clients send them (none for mean/std models)."""
        if self.uses_mean_std:
            return {}
        out = {"scaling_factor": self.scaling_factor}
        if self.shift_factor is not None:
            out["shift_factor"] = self.shift_factor
        return out

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        view = [1, -1] + [1] * (like.ndim - 2)
        mean = torch.tensor(self.latents_mean, dtype=like.dtype, device=like.device).view(view)
        std = torch.tensor(self.latents_std, dtype=like.dtype, device=like.device).view(view)
        return mean, std

    def to_raw(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion-model latent space -> raw VAE space (ComfyUI's `process_out`)."""
        if self.uses_mean_std:
            mean, std = self._stats(latents)
            return latents * std / self.scaling_factor + mean
        return latents / self.scaling_factor + (self.shift_factor or 0.0)

    def from_raw(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE space -> diffusion-model latent space (ComfyUI's `process_in`)."""
        if self.uses_mean_std:
            mean, std = self._stats(latents)
            return (latents - mean) * self.scaling_factor / std
        return (latents - (self.shift_factor or 0.0)) * self.scaling_factor

    def describe(self) -> dict:
        """A JSON-ready summary (for /v1/models and the web extension)."""
        return {
            "name": self.name,
            "label": self.label,
            "latent_channels": self.latent_channels,
            "dims": self.dims,
            "spatial_compression": self.spatial_compression,
            "temporal_compression": self.temporal_compression,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "per_channel_mean_std": self.uses_mean_std,
            "hf_decode_endpoint": self.hf_decode_endpoint,
            "hf_encode_endpoint": self.hf_encode_endpoint,
            "checkpoint": self.checkpoint,
            "subfolder": self.subfolder,
            "diffusers_class": self.diffusers_class,
            "safe_dtypes": list(self.safe_dtypes),
        }


def load_table(path: Path = TABLE) -> dict[str, Preset]:
    """The presets of the table file, in its order; shared architectures and stats are resolved here."""
    with path.open("rb") as table_file:
        table = tomllib.load(table_file)
    architectures, stats = table.get("architectures", {}), table.get("stats", {})
    presets = {}
    for row in table["preset"]:
        row = dict(row)
        config = {**architectures.get(row.pop("architecture", ""), {}), **row.pop("config", {})}
        if "stats" in row:
            mean, std = (tuple(stats[row["stats"]][key]) for key in ("mean", "std"))
            row.update(latents_mean=mean, latents_std=std)
            if row.pop("config_stats", False):
                config.update(latents_mean=list(mean), latents_std=list(std))
            del row["stats"]
        for key in ("hf_decode", "hf_encode"):
            if key in row:
                row[f"{key}_endpoint"] = HF.format(row.pop(key))
        if "safe_dtypes" in row:
            row["safe_dtypes"] = tuple(row["safe_dtypes"])
        presets[row["name"]] = Preset(**row, config=config)
    return presets


PRESETS: dict[str, Preset] = load_table()

AUTO = "auto"


class PresetError(ValueError):
    """A preset name or a latent that does not fit; the message says what to pick instead."""


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise PresetError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None


def candidates_for(shape: Sequence[int]) -> list[Preset]:
    """Presets whose latent layout fits `shape` (packed Flux latents are [B, N, 64])."""
    if len(shape) == 3:
        return [p for p in PRESETS.values() if p.packed and shape[2] == p.latent_channels * 4]
    dims = {4: 2, 5: 3}.get(len(shape))
    return [p for p in PRESETS.values() if p.dims == dims and p.latent_channels == shape[1]]


def detect_preset(shape: Sequence[int]) -> Preset:
    """The preset implied by a latent's shape, or an error that lists the choices."""
    shape = list(shape)
    found = candidates_for(shape)
    if len(found) == 1:
        return found[0]
    if not found:
        raise PresetError(
            f"no preset fits a latent of shape {shape}; "
            + "; ".join(f"{p.name}: {_layout(p)}" for p in PRESETS.values())
        )
    # Still-image latents carry a single latent frame; video models more than one.
    if len(shape) == 5 and shape[2] > 1:
        video = [p for p in found if not p.still_image]
        if len(video) == 1:
            return video[0]
        found = video
    raise PresetError(
        f"a latent of shape {shape} fits several presets ({', '.join(p.name for p in found)}); "
        f"pick one explicitly: " + "; ".join(f"{p.name} = {p.label}" for p in found)
    )


def _layout(p: Preset) -> str:
    return f"[B,{p.latent_channels},{'L' if p.dims == 1 else 'T,H,W' if p.is_video else 'H,W'}]"


def check_latent(preset: Preset, shape: Sequence[int]) -> None:
    """Raise a clear error when `shape` is not a latent of `preset`."""
    shape = list(shape)
    if len(shape) == 3 and preset.packed:
        if shape[2] != preset.latent_channels * 4:
            raise PresetError(
                f"packed latent has {shape[2]} features but {_owner(preset)} packs "
                f"{preset.latent_channels}x4={preset.latent_channels * 4}"
            )
        return
    want_ndim = preset.dims + 2
    if len(shape) != want_ndim:
        raise PresetError(
            f"latent of shape {shape} has {len(shape)} dimensions but {_owner(preset)} expects "
            f"{_layout(preset)}; {_suggest(shape, preset)}"
        )
    if shape[1] != preset.latent_channels:
        raise PresetError(
            f"latent has {shape[1]} channels but {_owner(preset)} expects {preset.latent_channels}; "
            f"{_suggest(shape, preset)}"
        )


def _owner(preset: Preset) -> str:
    """A table row is a preset; any other Preset describes one model (the server's comfy backend)."""
    return f"preset {preset.name}" if PRESETS.get(preset.name) is preset else f"model {preset.name}"


def _suggest(shape: list[int], preset: Preset) -> str:
    if PRESETS.get(preset.name) is not preset:
        return f"model {preset.name} serves {preset.label}"
    fits = candidates_for(shape)
    if fits:
        return "pick the " + " or ".join(p.name for p in fits) + " preset"
    return "no preset fits this latent"
