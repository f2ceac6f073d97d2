"""Single-file VAE checkpoints as ComfyUI's `models/vae` holds them: which key layout a file is in, its
tensors in diffusers' names, and the architecture its shapes describe.

SD/SDXL/SD3/Flux VAE files keep the original LDM names (`encoder.down.0.block.0.norm1.weight`,
`decoder.mid.attn_1.q.weight` as 1x1 convs), and so does ComfyUI's HunyuanVideo VAE, whose causal 3-D
convs add a `.conv` level (`decoder.conv_in.conv.weight`). diffusers' AutoencoderKL and
AutoencoderKLHunyuanVideo name the same tensors `encoder.down_blocks.0.resnets.0.norm1.weight`,
`decoder.mid_block.attentions.0.to_q.weight` (linear) and so on; one table serves both directions. Wan 2.1
files are converted by diffusers' own converter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..remote.presets import PRESETS, Preset
from .errors import ModelLoadError, first_line

# Full checkpoints (model + VAE in one file) keep the VAE under one of these prefixes.
VAE_PREFIXES = ("first_stage_model.", "vae.")


@dataclass(frozen=True)
class Layout:
    """A key layout a VAE file can come in, recognised by a key that only it has."""

    name: str
    label: str
    classes: tuple[str, ...]  # diffusers classes that can hold it
    marker: str


# ComfyUI loads Qwen-Image's VAE as a Wan 2.1 VAE: one layout, two diffusers classes.
WAN_CLASSES = ("AutoencoderKLWan", "AutoencoderKLQwenImage")
LAYOUTS = (
    Layout("wan22", "a Wan 2.2 VAE in the original layout", ("AutoencoderKLWan",),
           "decoder.upsamples.0.upsamples.0.residual.2.weight"),
    Layout("wan21", "a Wan 2.1 VAE in the original layout", WAN_CLASSES, "decoder.middle.0.residual.0.gamma"),
    Layout("diffusers_wan", "a Wan-style VAE in diffusers' layout", WAN_CLASSES,
           "decoder.mid_block.resnets.0.norm1.gamma"),
    Layout("ldm_hunyuan", "a HunyuanVideo VAE in ComfyUI's layout", ("AutoencoderKLHunyuanVideo",),
           "decoder.up.0.block.0.conv1.conv.weight"),
    Layout("diffusers_hunyuan", "a HunyuanVideo VAE in diffusers' layout", ("AutoencoderKLHunyuanVideo",),
           "decoder.up_blocks.0.resnets.0.conv1.conv.weight"),
    Layout("ldm_kl", "an SD-family KL VAE in the original LDM layout", ("AutoencoderKL",),
           "decoder.up.0.block.0.conv1.weight"),
    Layout("diffusers_kl", "an SD-family KL VAE in diffusers' layout", ("AutoencoderKL",),
           "decoder.up_blocks.0.resnets.0.conv1.weight"),
)  # fmt: skip
# Layouts diffusers' own `from_single_file` converts, for the class that converter is written for.
DIFFUSERS_CONVERTS = {"ldm_kl": "AutoencoderKL", "wan21": "AutoencoderKLWan"}


# --------------------------------------------------------------------------- reading a file


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A .safetensors file's tensors, with a full checkpoint's VAE prefix removed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        state_dict = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path.name} is not a readable safetensors file: {first_line(exc)}") from exc
    for prefix in VAE_PREFIXES:
        inner = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if inner and detect_layout(inner) is not None:
            return inner
    return state_dict


def detect_layout(state_dict: dict[str, torch.Tensor]) -> Layout | None:
    return next((layout for layout in LAYOUTS if layout.marker in state_dict), None)


def layout_for(preset: Preset, state_dict: dict, name: str) -> Layout:
    layout = detect_layout(state_dict)
    if layout is None:
        sample = ", ".join(list(state_dict)[:3]) or "no tensors"
        raise ModelLoadError(
            f"{name} has an unknown key layout ({len(state_dict)} tensors: {sample}, ...); expected a VAE as "
            f"ComfyUI's models/vae files hold them (SD/SDXL/SD3/Flux, HunyuanVideo, Wan 2.1) or in diffusers' "
            f"layout"
        )
    if layout.name == "wan22":
        raise ModelLoadError(
            f"{name} is {layout.label}; diffusers {_diffusers_version()} cannot convert Wan 2.2 single files. "
            f"Use the diffusers folder of Wan-AI/Wan2.2-TI2V-5B-Diffusers (its vae/ subfolder), or leave the "
            f"source empty to download it"
        )
    if preset.diffusers_class not in layout.classes:
        fits = [p.name for p in PRESETS.values() if p.diffusers_class in layout.classes]
        raise ModelLoadError(
            f"{name} holds {layout.label} but preset {preset.name} uses {preset.diffusers_class}; "
            f"pick the {' or '.join(fits)} preset"
        )
    return layout


def to_diffusers(layout: Layout, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict in diffusers' names (tensors shared, attention 1x1 convs viewed as linear weights)."""
    if layout.name in ("ldm_kl", "ldm_hunyuan"):
        return ldm_to_diffusers(state_dict)
    if layout.name == "wan21":
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

        return convert_wan_vae_to_diffusers(state_dict)
    return dict(state_dict)


# --------------------------------------------------------------------------- the architecture it holds


def infer_config(preset: Preset, state_dict: dict[str, torch.Tensor], layout: Layout | None = None) -> dict:
    """The preset's config with the architecture read from the tensor shapes where the layout allows it."""
    layout = layout or detect_layout(state_dict)
    if layout is None:
        raise ModelLoadError(
            f"cannot infer an architecture: unknown key layout ({', '.join(list(state_dict)[:3])})"
        )
    weights = to_diffusers(layout, state_dict)
    try:
        if layout.classes == WAN_CLASSES:
            arch = _infer_wan(weights)
        elif "AutoencoderKLHunyuanVideo" in layout.classes:
            arch = _infer_kl(weights, ".conv", ("HunyuanVideoDownBlock3D", "HunyuanVideoUpBlock3D"))
        else:
            arch = _infer_kl(weights, "", ("DownEncoderBlock2D", "UpDecoderBlock2D"))
            arch["use_quant_conv"] = "quant_conv.weight" in weights
            arch["use_post_quant_conv"] = "post_quant_conv.weight" in weights
    except (KeyError, IndexError, ZeroDivisionError):
        return dict(preset.config)  # a layout variant the reader does not know: the published architecture
    config = {**preset.config, **arch}
    if "block_out_channels" in arch:
        # GroupNorm's group count leaves no trace in the weights: every published model uses 32.
        config.setdefault("norm_num_groups", 32)
    return config


def _infer_kl(w: dict[str, torch.Tensor], conv: str, blocks: tuple[str, str]) -> dict:
    """AutoencoderKL / AutoencoderKLHunyuanVideo: `conv` is the causal-conv wrapper level ('.conv') if any."""
    levels = count_levels(w)
    layers = {m[1] for k in w if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))}
    return {
        "in_channels": w[f"encoder.conv_in{conv}.weight"].shape[1],
        "out_channels": w[f"decoder.conv_out{conv}.weight"].shape[0],
        "latent_channels": w[f"decoder.conv_in{conv}.weight"].shape[1],
        "block_out_channels": [
            w[f"encoder.down_blocks.{i}.resnets.0.conv1{conv}.weight"].shape[0] for i in range(levels)
        ],
        "layers_per_block": len(layers),
        "down_block_types": [blocks[0]] * levels,
        "up_block_types": [blocks[1]] * levels,
        "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in w,
    }


def _infer_wan(w: dict[str, torch.Tensor]) -> dict:
    """AutoencoderKLWan (2.1 style): the encoder is a flat list of residual blocks and resamplers."""
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in w:
        raise KeyError("Wan 2.2 residual layout")  # nested blocks: left to the preset's config
    base = w["encoder.conv_in.weight"].shape[0]
    indices = sorted({int(m[1]) for k in w if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
    levels: list[list[int]] = [[]]
    temporal = []
    for n in indices:
        if f"encoder.down_blocks.{n}.resample.1.weight" in w:
            temporal.append(f"encoder.down_blocks.{n}.time_conv.weight" in w)
            levels.append([])
        else:
            levels[-1].append(w[f"encoder.down_blocks.{n}.conv2.weight"].shape[0])
    decoder_base = w["decoder.norm_out.gamma"].shape[0]
    return {
        "base_dim": base,
        "decoder_base_dim": None if decoder_base == base else decoder_base,
        "z_dim": w["post_quant_conv.weight"].shape[0],
        "dim_mult": [level[-1] // base for level in levels],
        "num_res_blocks": len(levels[0]),
        "temperal_downsample": temporal,
        "in_channels": w["encoder.conv_in.weight"].shape[1],
        "input_channels": w["encoder.conv_in.weight"].shape[1],  # AutoencoderKLQwenImage's name for it
        "out_channels": w["decoder.conv_out.weight"].shape[0],
    }


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


# --------------------------------------------------------------------------- KL-style keys: LDM <-> diffusers


# (LDM, diffusers) name parts. {i}: encoder level; {u}: decoder level, numbered from the top in LDM and
# from the bottom in diffusers; {j}: block within a level. Applied in order, each at most once per key.
_PARTS = (
    ("encoder.down.{i}.block.{j}.", "encoder.down_blocks.{i}.resnets.{j}."),
    ("encoder.down.{i}.downsample.", "encoder.down_blocks.{i}.downsamplers.0."),
    ("decoder.up.{u}.block.{j}.", "decoder.up_blocks.{u}.resnets.{j}."),
    ("decoder.up.{u}.upsample.", "decoder.up_blocks.{u}.upsamplers.0."),
    ("mid.block_1.", "mid_block.resnets.0."),
    ("mid.block_2.", "mid_block.resnets.1."),
    ("mid.attn_1.norm.", "mid_block.attentions.0.group_norm."),
    ("mid.attn_1.q.", "mid_block.attentions.0.to_q."),
    ("mid.attn_1.k.", "mid_block.attentions.0.to_k."),
    ("mid.attn_1.v.", "mid_block.attentions.0.to_v."),
    ("mid.attn_1.proj_out.", "mid_block.attentions.0.to_out.0."),
    ("nin_shortcut.", "conv_shortcut."),
    ("norm_out.", "conv_norm_out."),
)
# LDM keeps the attention projections as 1x1 convs; diffusers as linear layers.
_ATTN_LDM = re.compile(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$")
_ATTN_DIFFUSERS = re.compile(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def _pattern(template: str) -> re.Pattern:
    # A part starts the key or follows a dot: "norm_out." must not match inside "conv_norm_out.".
    body = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{u\}", r"(?P<u>\d+)")
    return re.compile(r"(?<![^.])" + body.replace(r"\{j\}", r"(?P<j>\d+)"))


_TO_DIFFUSERS = [(_pattern(ldm), diffusers) for ldm, diffusers in _PARTS]
_TO_LDM = [(_pattern(diffusers), ldm) for ldm, diffusers in _PARTS]


def _filler(template: str, levels: int):
    def fill(match: re.Match) -> str:
        groups = match.groupdict()
        if groups.get("u") is not None:
            groups["u"] = str(levels - 1 - int(groups["u"]))
        return template.format(**groups)

    return fill


def _rename(key: str, rules: list[tuple[re.Pattern, str]], levels: int) -> str:
    for pattern, template in rules:
        key = pattern.sub(_filler(template, levels), key, count=1)
    return key


def count_levels(state_dict: dict[str, torch.Tensor]) -> int:
    """Resolution levels of a KL-style VAE in either layout (4 for every published model)."""
    found = {int(m[1]) for k in state_dict if (m := re.match(r"encoder\.down(?:_blocks)?\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def ldm_to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ComfyUI/LDM-layout KL or HunyuanVideo VAE state dict in diffusers' names and shapes."""
    levels = count_levels(state_dict)
    out = {}
    for key, tensor in state_dict.items():
        if _ATTN_LDM.search(key) and tensor.ndim > 2:
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])
        out[_rename(key, _TO_DIFFUSERS, levels)] = tensor
    return out


def diffusers_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reverse: diffusers' AutoencoderKL / AutoencoderKLHunyuanVideo state dict in ComfyUI's layout."""
    levels = count_levels(state_dict)
    conv_in = state_dict.get("encoder.conv_in.weight", state_dict.get("encoder.conv_in.conv.weight"))
    spatial_dims = conv_in.ndim - 2 if conv_in is not None else 2  # 2: image VAE, 3: video VAE
    out = {}
    for key, tensor in state_dict.items():
        if _ATTN_DIFFUSERS.search(key) and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, *[1] * spatial_dims)
        out[_rename(key, _TO_LDM, levels)] = tensor
    return out
