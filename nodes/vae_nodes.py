"""The three ComfyUI nodes (classic V1 contract). Thin: the work is in `operations`."""

from __future__ import annotations

from .choices import (
    CATEGORY,
    DEFAULT_TIMEOUT,
    MAX_TIMEOUT,
    MIN_TIMEOUT,
    TRANSFER_DECODE,
    TRANSFER_ENCODE,
    TRANSFER_VIDEO,
    preset_choices,
)

ENDPOINT_TIP = (
    "URL of the VAE server, such as http://127.0.0.1:8190/sd15. Empty: the preset's Hugging Face endpoint. "
    "A server's token is bound to its address in Settings > Remote VAE, never saved in the workflow."
)
PRESET_TIP = "The VAE family. auto: detected from the latent's shape (pick one when several fit)."
TIMEOUT_TIP = "Seconds to wait for each answer (a cold endpoint may need minutes)."
VAE_TIP = "Optional local VAE: used, with a warning, when the remote server fails."


def _connection_inputs(transfers: tuple[str, ...], presets: list[str], transfer_tip: str) -> dict:
    return {
        "preset": (presets, {"default": presets[0], "tooltip": PRESET_TIP}),
        "endpoint": ("STRING", {"default": "", "tooltip": ENDPOINT_TIP}),
        "transfer": (list(transfers), {"default": transfers[0], "tooltip": transfer_tip}),
        "timeout": (
            "INT",
            {
                "default": DEFAULT_TIMEOUT,
                "min": MIN_TIMEOUT,
                "max": MAX_TIMEOUT,
                "step": 1,
                "tooltip": TIMEOUT_TIP,
            },
        ),
    }


def _optional_inputs() -> dict:
    return {
        "vae": ("VAE", {"tooltip": VAE_TIP}),
    }


HIDDEN = {"unique_id": "UNIQUE_ID"}
DECODE_TRANSFER_TIP = (
    "lossless: 8-bit pixels (what a saved PNG holds); exact: the float32 decoder output, no 8-bit rounding; "
    "compact: JPEG, smallest, lossy."
)
ENCODE_TRANSFER_TIP = "lossless: 8-bit pixels; exact: float32 pixels (for images that are not 8-bit)."


class _RemoteNode:
    """What the three nodes share: category, widgets and inputs; each names its tensor input."""

    CATEGORY = CATEGORY
    TENSOR_INPUT: tuple[str, str, str]  # name, ComfyUI type, tooltip
    TRANSFERS: tuple[str, ...]
    TRANSFER_TIP: str
    VIDEO_ONLY = False

    @classmethod
    def INPUT_TYPES(cls):
        name, kind, tip = cls.TENSOR_INPUT
        required = {name: (kind, {"tooltip": tip})}
        required.update(_connection_inputs(cls.TRANSFERS, preset_choices(cls.VIDEO_ONLY), cls.TRANSFER_TIP))
        return {"required": required, "optional": _optional_inputs(), "hidden": HIDDEN}

    def _request(self, preset, endpoint, transfer, timeout):
        from .operations import NodeRequest

        return NodeRequest(preset, endpoint, transfer, timeout, video_only=self.VIDEO_ONLY)


class RemoteVAEDecode(_RemoteNode):
    """LATENT -> IMAGE on a remote VAE server; the same pixels as VAEDecode with the same weights."""

    DESCRIPTION = "Decodes latents on a remote VAE server (self-hosted or Hugging Face) instead of this GPU."
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded images (video latents: their frames).",)
    FUNCTION = "decode"
    TENSOR_INPUT = ("samples", "LATENT", "The latent to decode.")
    TRANSFERS = TRANSFER_DECODE
    TRANSFER_TIP = DECODE_TRANSFER_TIP

    def decode(self, samples, preset, endpoint, transfer, timeout, vae=None, unique_id=None):  # fmt: skip
        from .operations import decode_node

        request = self._request(preset, endpoint, transfer, timeout)
        return (decode_node(unique_id, samples, vae, request),)


class RemoteVideoDecode(RemoteVAEDecode):
    """Video LATENT [B,C,T,H,W] -> IMAGE frames [B*F,H,W,3], one request per video."""

    DESCRIPTION = "Decodes video latents on a remote VAE server; returns every video's frames in order."
    OUTPUT_TOOLTIPS = ("The frames of every video in the batch, in order.",)
    VIDEO_ONLY = True
    TRANSFERS = TRANSFER_VIDEO


class RemoteVAEEncode(_RemoteNode):
    """IMAGE -> LATENT on a remote VAE server; the same latents as VAEEncode with the same weights."""

    DESCRIPTION = "Encodes images on a remote VAE server (self-hosted or Hugging Face) instead of this GPU."
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The raw latents (posterior mode), as VAEEncode gives them.",)
    FUNCTION = "encode"
    TENSOR_INPUT = ("pixels", "IMAGE", "The images to encode (a video VAE: the frames of one video).")
    TRANSFERS = TRANSFER_ENCODE
    TRANSFER_TIP = ENCODE_TRANSFER_TIP

    def encode(self, pixels, preset, endpoint, transfer, timeout, vae=None, unique_id=None):  # fmt: skip
        from .operations import encode_node

        request = self._request(preset, endpoint, transfer, timeout)
        return (encode_node(unique_id, pixels, vae, request),)


NODE_CLASS_MAPPINGS = {
    "RemoteVAEDecode": RemoteVAEDecode,
    "RemoteVAEEncode": RemoteVAEEncode,
    "RemoteVideoDecode": RemoteVideoDecode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "RemoteVAEDecode": "Remote VAE Decode",
    "RemoteVAEEncode": "Remote VAE Encode",
    "RemoteVideoDecode": "Remote Video Decode",
}
