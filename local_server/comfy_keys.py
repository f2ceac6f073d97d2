"""Key layouts of ComfyUI's `models/vae` files vs diffusers, for the KL-style VAEs.

SD/SDXL/SD3/Flux VAE files keep the original LDM names (`encoder.down.0.block.0.norm1.weight`,
`decoder.mid.attn_1.q.weight` as 1x1 convs), and so does ComfyUI's HunyuanVideo VAE, whose causal 3-D
convs add a `.conv` level (`decoder.conv_in.conv.weight`). diffusers' AutoencoderKL and
AutoencoderKLHunyuanVideo name the same tensors `encoder.down_blocks.0.resnets.0.norm1.weight`,
`decoder.mid_block.attentions.0.to_q.weight` (linear) and so on. One table serves both directions.
"""

from __future__ import annotations

import re

import torch

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


def is_ldm_layout(state_dict: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("encoder.down.") or k.startswith("decoder.up.") for k in state_dict)


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
