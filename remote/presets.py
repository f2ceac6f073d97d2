"""The model preset table: one row per VAE family. Data, not code paths.

Values follow ComfyUI's `comfy/latent_formats.py` (scale/shift, per-channel mean/std) and the
Hugging Face hybrid-inference endpoints (docs/protocol.md).
Adding a model is adding a row here plus a test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

HF = "https://{}.us-east-1.aws.endpoints.huggingface.cloud/"

WAN21_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
WAN22_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
WAN22_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip

# Architecture of the published SD-family VAE (SD1.5, SDXL, SD3, Flux share it; only channels differ).
_KL_ARCH = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "norm_num_groups": 32,
}


@dataclass(frozen=True)
class Preset:
    """What a client and a server need to know about one VAE family."""

    name: str
    label: str
    latent_channels: int
    dims: int  # 2: image latents [B,C,H,W]; 3: video latents [B,C,T,H,W]
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


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="sd15",
            label="Stable Diffusion 1.x / 2.x",
            latent_channels=4,
            dims=2,
            spatial_compression=8,
            scaling_factor=0.18215,
            hf_decode_endpoint=HF.format("q1bj3bpq6kzilnsu"),
            hf_encode_endpoint=HF.format("qc6479g0aac6qwy9"),
            checkpoint="stabilityai/sd-vae-ft-mse",
            config={**_KL_ARCH, "latent_channels": 4, "sample_size": 512, "scaling_factor": 0.18215},
            safe_dtypes=("float16", "bfloat16", "float32"),
        ),
        Preset(
            name="sdxl",
            label="Stable Diffusion XL",
            latent_channels=4,
            dims=2,
            spatial_compression=8,
            scaling_factor=0.13025,
            hf_decode_endpoint=HF.format("x2dmsqunjd6k9prw"),
            hf_encode_endpoint=HF.format("xjqqhmyn62rog84g"),
            checkpoint="stabilityai/sdxl-vae",
            config={**_KL_ARCH, "latent_channels": 4, "sample_size": 1024, "scaling_factor": 0.13025},
            # The original SDXL VAE overflows in float16 (NaNs); madebyollin/sdxl-vae-fp16-fix does not.
            safe_dtypes=("bfloat16", "float32"),
            note="The original SDXL VAE is not fp16-safe; the HF endpoint serves madebyollin/sdxl-vae-fp16-fix.",
        ),
        Preset(
            name="sd3",
            label="Stable Diffusion 3 / 3.5",
            latent_channels=16,
            dims=2,
            spatial_compression=8,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            checkpoint="stabilityai/stable-diffusion-3.5-large",
            subfolder="vae",
            config={
                **_KL_ARCH,
                "latent_channels": 16,
                "sample_size": 1024,
                "scaling_factor": 1.5305,
                "shift_factor": 0.0609,
                "use_quant_conv": False,
                "use_post_quant_conv": False,
            },
            safe_dtypes=("bfloat16", "float16", "float32"),
        ),
        Preset(
            name="flux",
            label="Flux.1 (also Chroma, HiDream, Lumina 2)",
            latent_channels=16,
            dims=2,
            spatial_compression=8,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            hf_decode_endpoint=HF.format("whhx50ex1aryqvw6"),
            hf_encode_endpoint=HF.format("ptccx55jz97f9zgo"),
            checkpoint="black-forest-labs/FLUX.1-schnell",
            subfolder="vae",
            config={
                **_KL_ARCH,
                "latent_channels": 16,
                "sample_size": 1024,
                "scaling_factor": 0.3611,
                "shift_factor": 0.1159,
                "use_quant_conv": False,
                "use_post_quant_conv": False,
            },
            safe_dtypes=("bfloat16", "float16", "float32"),
            packed=True,
        ),
        Preset(
            name="hunyuan_video",
            label="HunyuanVideo 1.0",
            latent_channels=16,
            dims=3,
            spatial_compression=8,
            temporal_compression=4,
            scaling_factor=0.476986,
            hf_decode_endpoint=HF.format("o7ywnmrahorts457"),
            checkpoint="hunyuanvideo-community/HunyuanVideo",
            subfolder="vae",
            diffusers_class="AutoencoderKLHunyuanVideo",
            config={"latent_channels": 16, "scaling_factor": 0.476986},
            decode_memory=1500 * 4 * 8 * 8,
            decode_memory_per_frame=True,
            encode_memory=1767 * 2,
            safe_dtypes=("float16", "bfloat16", "float32"),
            fps=24,
        ),
        Preset(
            name="wan21",
            label="Wan 2.1 (and Wan 2.2 14B)",
            latent_channels=16,
            dims=3,
            spatial_compression=8,
            temporal_compression=4,
            latents_mean=WAN21_MEAN,
            latents_std=WAN21_STD,
            hf_decode_endpoint=None,  # HF's Wan endpoint (PR #11031) was never shipped
            checkpoint="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
            subfolder="vae",
            diffusers_class="AutoencoderKLWan",
            config={"z_dim": 16},
            safe_dtypes=("bfloat16", "float32"),
            fps=16,
            decode_memory=7000 * 64,  # causal, chunked decode: independent of the frame count
            encode_memory=1767 * 2,
        ),
        Preset(
            name="wan22",
            label="Wan 2.2 5B (48-channel VAE)",
            latent_channels=48,
            dims=3,
            spatial_compression=16,
            temporal_compression=4,
            latents_mean=WAN22_MEAN,
            latents_std=WAN22_STD,
            checkpoint="Wan-AI/Wan2.2-TI2V-5B-Diffusers",
            subfolder="vae",
            diffusers_class="AutoencoderKLWan",
            config={
                "base_dim": 160,
                "decoder_base_dim": 256,
                "z_dim": 48,
                "is_residual": True,
                "in_channels": 12,
                "out_channels": 12,
                "patch_size": 2,
                "scale_factor_spatial": 16,
                "scale_factor_temporal": 4,
                "temperal_downsample": [False, True, True],
                "latents_mean": list(WAN22_MEAN),
                "latents_std": list(WAN22_STD),
            },
            safe_dtypes=("bfloat16", "float32"),
            fps=24,
            decode_memory=8000 * 256,
            encode_memory=1767 * 4,
        ),
        Preset(
            name="qwen_image",
            label="Qwen-Image",
            latent_channels=16,
            dims=3,
            spatial_compression=8,
            temporal_compression=4,
            latents_mean=WAN21_MEAN,
            latents_std=WAN21_STD,
            checkpoint="Qwen/Qwen-Image",
            subfolder="vae",
            diffusers_class="AutoencoderKLQwenImage",
            config={"z_dim": 16},
            decode_memory=2200 * 64,
            encode_memory=1767 * 2,
            safe_dtypes=("bfloat16", "float32"),
            still_image=True,
            note="Image model with a Wan-style VAE: latents are [B,16,1,H/8,W/8].",
        ),
    )
}

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
    return f"[B,{p.latent_channels},T,H,W]" if p.is_video else f"[B,{p.latent_channels},H,W]"


def check_latent(preset: Preset, shape: Sequence[int]) -> None:
    """Raise a clear error when `shape` is not a latent of `preset`."""
    shape = list(shape)
    if len(shape) == 3 and preset.packed:
        if shape[2] != preset.latent_channels * 4:
            raise PresetError(
                f"packed latent has {shape[2]} features but preset {preset.name} packs "
                f"{preset.latent_channels}x4={preset.latent_channels * 4}"
            )
        return
    want_ndim = 5 if preset.is_video else 4
    if len(shape) != want_ndim:
        raise PresetError(
            f"latent of shape {shape} has {len(shape)} dimensions but preset {preset.name} expects "
            f"{_layout(preset)}; {_suggest(shape)}"
        )
    if shape[1] != preset.latent_channels:
        raise PresetError(
            f"latent has {shape[1]} channels but preset {preset.name} expects {preset.latent_channels}; "
            f"{_suggest(shape)}"
        )


def _suggest(shape: list[int]) -> str:
    fits = candidates_for(shape)
    if fits:
        return "pick the " + " or ".join(p.name for p in fits) + " preset"
    return "no preset fits this latent"
