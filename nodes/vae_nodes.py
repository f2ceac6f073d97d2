"""The ComfyUI nodes (classic V1 contract). Thin: the work is in `operations` and `remote_vae_object`."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .choices import (
    CATEGORY,
    DEFAULT_TIMEOUT,
    MAX_TIMEOUT,
    MIN_TIMEOUT,
    TRANSFER_DECODE,
    TRANSFER_ENCODE,
    TRANSFER_LOADER,
    TRANSFER_VIDEO,
    preset_choices,
)

ENDPOINT_TIP = (
    "URL of the VAE server, such as http://127.0.0.1:8190/sd15. Empty: the preset's Hugging Face endpoint. "
    "A server's token is bound to its address in Settings > Remote VAE, never saved in the workflow."
)
PRESET_TIP = "The VAE family. auto: detected from the latent's shape (pick one when several fit)."
TIMEOUT_TIP = "Seconds the whole remote call may take, retries included (a cold endpoint may need minutes)."
VAE_TIP = "Optional local VAE: used, with a warning, when the remote server fails."


def _timeout_input() -> tuple:
    return (
        "INT",
        {
            "default": DEFAULT_TIMEOUT,
            "min": MIN_TIMEOUT,
            "max": MAX_TIMEOUT,
            "step": 1,
            "tooltip": TIMEOUT_TIP,
        },
    )


def _connection_inputs(transfers: tuple[str, ...], presets: list[str], transfer_tip: str) -> dict:
    return {
        "preset": (presets, {"default": presets[0], "tooltip": PRESET_TIP}),
        "endpoint": ("STRING", {"default": "", "tooltip": ENDPOINT_TIP}),
        "transfer": (list(transfers), {"default": transfers[0], "tooltip": transfer_tip}),
        "timeout": _timeout_input(),
    }


def _optional_inputs() -> dict:
    return {
        "vae": ("VAE", {"tooltip": VAE_TIP}),
    }


HIDDEN = {"unique_id": "UNIQUE_ID"}
DECODE_TRANSFER_TIP = (
    "auto: the same 8-bit pixels as lossless, compressed losslessly (JPEG XL) when the measured link to that "
    "server makes it faster; lossless: 8-bit pixels (what a saved PNG holds), raw; exact: the float32 decoder "
    "output, no 8-bit rounding; compact: JPEG, smallest, lossy."
)
VIDEO_TRANSFER_TIP = (
    "auto: the same 8-bit frames as lossless, compressed losslessly (JPEG XL) when the measured link to that "
    "server makes it faster; lossless: 8-bit frames, raw; near-lossless: H.264 RGB, each value within 8/255, "
    "far fewer bytes (a server that offers it); exact: the float32 decoder output."
)
ENCODE_TRANSFER_TIP = "lossless: 8-bit pixels; exact: float32 pixels (for images that are not 8-bit)."


@dataclass(frozen=True)
class NodeSpec:
    """What one node declares to ComfyUI besides the shared widgets."""

    description: str
    output: tuple[str, str]  # ComfyUI type, tooltip
    tensor_input: tuple[str, str, str]  # name, ComfyUI type, tooltip
    transfers: tuple[str, ...]
    transfer_tip: str
    video_only: bool = False


class _RemoteNode:
    """What the three nodes share: category, widgets and inputs; each subclass gives its NodeSpec."""

    CATEGORY = CATEGORY
    SPEC: NodeSpec

    def __init_subclass__(cls, spec: NodeSpec, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.SPEC, cls.DESCRIPTION = spec, spec.description
        cls.RETURN_TYPES, cls.OUTPUT_TOOLTIPS = (spec.output[0],), (spec.output[1],)

    @classmethod
    def INPUT_TYPES(cls):
        spec = cls.SPEC
        name, kind, tip = spec.tensor_input
        required = {name: (kind, {"tooltip": tip})}
        required.update(
            _connection_inputs(spec.transfers, preset_choices(spec.video_only), spec.transfer_tip)
        )
        return {"required": required, "optional": _optional_inputs(), "hidden": HIDDEN}

    def _request(self, preset, endpoint, transfer, timeout):
        from .operations import NodeRequest

        return NodeRequest(preset, endpoint, transfer, timeout, video_only=self.SPEC.video_only)


DECODE = NodeSpec(
    "Decodes latents on a remote VAE server (self-hosted or Hugging Face) instead of this GPU.",
    ("IMAGE", "The decoded images (video latents: their frames)."), ("samples", "LATENT", "The latent to decode."),
    TRANSFER_DECODE, DECODE_TRANSFER_TIP,
)  # fmt: skip
VIDEO_DECODE = replace(
    DECODE, description="Decodes video latents on a remote VAE server; returns every video's frames in order.",
    output=("IMAGE", "The frames of every video in the batch, in order."), transfers=TRANSFER_VIDEO,
    transfer_tip=VIDEO_TRANSFER_TIP, video_only=True,
)  # fmt: skip
ENCODE = NodeSpec(
    "Encodes images on a remote VAE server (self-hosted or Hugging Face) instead of this GPU.",
    ("LATENT", "The raw latents (posterior mode), as VAEEncode gives them."),
    ("pixels", "IMAGE", "The images to encode (a video VAE: the frames of one video)."), TRANSFER_ENCODE, ENCODE_TRANSFER_TIP,
)  # fmt: skip


class RemoteVAEDecode(_RemoteNode, spec=DECODE):
    """LATENT -> IMAGE on a remote VAE server; the same pixels as VAEDecode with the same weights."""

    FUNCTION = "decode"

    def decode(self, samples, preset, endpoint, transfer, timeout, vae=None, unique_id=None):  # fmt: skip
        from .operations import decode_node

        return (decode_node(unique_id, samples, vae, self._request(preset, endpoint, transfer, timeout)),)


class RemoteVideoDecode(RemoteVAEDecode, spec=VIDEO_DECODE):
    """Video LATENT [B,C,T,H,W] -> IMAGE frames [B*F,H,W,3], one request per video."""


class RemoteVAEEncode(_RemoteNode, spec=ENCODE):
    """IMAGE -> LATENT on a remote VAE server; the same latents as VAEEncode with the same weights."""

    FUNCTION = "encode"

    def encode(self, pixels, preset, endpoint, transfer, timeout, vae=None, unique_id=None):  # fmt: skip
        from .operations import encode_node

        return (encode_node(unique_id, pixels, vae, self._request(preset, endpoint, transfer, timeout)),)


LOADER_ENDPOINT_TIP = (
    "URL of one model on your remote-vae server, such as http://127.0.0.1:8190/sd15 (several servers hosting "
    "it: separate them with commas). A server's token is bound to its address in Settings > Remote VAE."
)
LOADER_TRANSFER_TIP = (
    "exact: float32 both ways, the same result as loading the file here; lossless: 8-bit pixels (decode "
    "answers a quarter of the size, encode inputs rounded to 8 bits)."
)


class RemoteVAELoader:
    """A VAE that lives on the server: the node asks it for the model's shapes once and loads nothing."""

    CATEGORY = CATEGORY
    DESCRIPTION = (
        "A VAE that runs on a remote-vae server: connect it to any node that takes a VAE (VAE Decode, VAE Encode, "
        "the tiled and inpainting ones, WanImageToVideo, ...). Loads no weights here."
    )
    RETURN_TYPES = ("VAE",)
    OUTPUT_TOOLTIPS = ("The server's VAE: decode and encode run there.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "endpoint": ("STRING", {"default": "", "tooltip": LOADER_ENDPOINT_TIP}),
                "transfer": (
                    list(TRANSFER_LOADER),
                    {"default": TRANSFER_LOADER[0], "tooltip": LOADER_TRANSFER_TIP},
                ),
                "timeout": _timeout_input(),
            }
        }

    def load(self, endpoint, transfer, timeout):
        from .remote_vae_object import load_remote_vae

        return (load_remote_vae(endpoint, transfer, timeout),)


NODE_CLASS_MAPPINGS = {
    "RemoteVAEDecode": RemoteVAEDecode,
    "RemoteVAEEncode": RemoteVAEEncode,
    "RemoteVideoDecode": RemoteVideoDecode,
    "RemoteVAELoader": RemoteVAELoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "RemoteVAEDecode": "Remote VAE Decode",
    "RemoteVAEEncode": "Remote VAE Encode",
    "RemoteVideoDecode": "Remote Video Decode",
    "RemoteVAELoader": "Remote VAE Loader",
}
