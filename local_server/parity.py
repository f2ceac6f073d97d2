"""Where ComfyUI's VAE code differs from diffusers', a request can ask for ComfyUI's behaviour.

Our optional `reference=comfyui` request parameter (the nodes send it) makes a decode or encode
equal ComfyUI's VAEDecode/VAEEncode on the same weights; the default, `diffusers`, matches
diffusers and the Hugging Face endpoints. The one difference known today: HunyuanVideo's
mid-block attention is causal across frames in diffusers (as in the original code) and
unmasked in ComfyUI, which changes every multi-frame decode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

UNMASKED_ATTENTION = frozenset({"AutoencoderKLHunyuanVideo"})


class _Unmasked:
    """An attention processor that ignores the attention mask it is given."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, attn, hidden_states, *args, attention_mask=None, **kwargs):
        return self.inner(attn, hidden_states, *args, attention_mask=None, **kwargs)


@contextlib.contextmanager
def behaving_like(model: torch.nn.Module, reference: str) -> Iterator[None]:
    """Run the block with `model` behaving like `reference`'s implementation of its class."""
    if reference != "comfyui" or type(model).__name__ not in UNMASKED_ATTENTION:
        yield
        return
    attentions = [m for m in model.modules() if hasattr(m, "processor") and hasattr(m, "set_processor")]
    originals = [a.processor for a in attentions]
    for attention, processor in zip(attentions, originals):
        attention.processor = _Unmasked(processor)
    try:
        yield
    finally:
        for attention, processor in zip(attentions, originals):
            attention.processor = processor
