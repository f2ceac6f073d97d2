"""Seeded random-weight VAEs of every preset, for tests and benchmarks where no weights can be downloaded.

Like `torch.testing`, it ships with the pack and the pack itself never imports it. It needs the server
extra (diffusers, accelerate):

- `random_vae(preset, seed, size=...)`: the preset's diffusers class, tiny, ComfyUI-compatible or at the
  published widths, with the same weights for the same arguments in every process;
- `save_diffusers_folder` / `save_comfy_single_file`: the model saved the two ways users have VAEs;
- `comfy_decode` / `comfy_encode`: what ComfyUI's VAEDecode / VAEEncode give on the same weights.
"""

from .checkpoints import PRESET_NAMES, save_comfy_single_file, save_diffusers_folder, wan_to_original
from .comfy_reference import comfy_decode, comfy_encode, encoder_input, image_of
from .random_vaes import COMFY_WIDTHS, TINY_WIDTHS, Init, Size, random_vae

__all__ = [
    "COMFY_WIDTHS",
    "Init",
    "PRESET_NAMES",
    "TINY_WIDTHS",
    "Size",
    "comfy_decode",
    "comfy_encode",
    "encoder_input",
    "image_of",
    "random_vae",
    "save_comfy_single_file",
    "save_diffusers_folder",
    "wan_to_original",
]
