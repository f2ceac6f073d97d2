"""From widget values to a preset and an endpoint URL, with errors that say what to do."""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from ..remote.presets import (
    PRESETS,
    Preset,
    PresetError,
    candidates_for,
    check_latent,
    detect_preset,
    get_preset,
)
from ..remote.sending import split_endpoints
from .choices import AUTO

SERVER_EXAMPLE = "http://127.0.0.1:8190/{}"
HF_HOST_SUFFIX = ".endpoints.huggingface.cloud"


class NodeInputError(ValueError):
    """A widget value that cannot work; the message names it and the fix."""


def check_layout(shape: Sequence[int], *, video_only: bool = False) -> None:
    """A LATENT the decode nodes can take: images [B,C,H,W] or videos [B,C,T,H,W] (videos only for Remote
    Video Decode)."""
    shape = list(shape)
    if len(shape) not in (4, 5):
        raise NodeInputError(
            f"LATENT samples of shape {shape} are neither images [B,C,H,W] nor videos [B,C,T,H,W]"
        )
    if video_only and len(shape) != 5:
        raise NodeInputError(
            f"Remote Video Decode takes video latents [B,C,T,H,W]; this one is {shape}: use Remote VAE Decode"
        )


def decode_preset(
    name: str,
    shape: Sequence[int],
    *,
    has_endpoint: bool,
    video_only: bool = False,
    described: Preset | None = None,
) -> Preset:
    """The preset a LATENT is decoded with.

    `described`: the server's own description of its model, which wins (the server checks the latent
    against it and says what does not fit). Else "auto" must be unambiguous only when the preset picks
    the endpoint: with a URL entered, any preset that fits the shape will do, as long as they agree on
    the output size.
    """
    shape = list(shape)
    check_layout(shape, video_only=video_only)
    if described is not None:
        return described
    if name != AUTO:
        preset = get_preset(name)
        check_latent(preset, shape)
        return preset
    found = candidates_for(shape)
    if has_endpoint and found and len({_geometry(p) for p in found}) == 1:
        return found[0]
    return detect_preset(shape)  # raises, listing the choices, when none or several fit


def _geometry(preset: Preset) -> tuple[int, int, int]:
    return preset.dims, preset.spatial_compression, preset.temporal_compression


def encode_preset(name: str, *, has_endpoint: bool) -> Preset | None:
    """The preset for an encode; None for "auto" with a URL (the server's model decides)."""
    if name != AUTO:
        return get_preset(name)
    if has_endpoint:
        return None
    raise PresetError(
        "preset 'auto' cannot tell from pixels which VAE to encode for: pick one of "
        + ", ".join(PRESETS)
        + " or enter your server's URL in `endpoint`"
    )


def endpoint_url(endpoint: str, preset: Preset | None, operation: str) -> str:
    """The URL to call: the one entered, else the preset's Hugging Face endpoint for `operation`."""
    url = (endpoint or "").strip()
    if not url:
        default = None
        if preset is not None:
            default = preset.hf_decode_endpoint if operation == "decode" else preset.hf_encode_endpoint
        if default is None:
            name = preset.name if preset else "sd15"
            raise NodeInputError(
                f"preset {name} has no public Hugging Face {operation} endpoint: enter your server's URL "
                f"in `endpoint`, such as {SERVER_EXAMPLE.format(name)}"
            )
        return default
    # Several servers hosting the same model may be listed (commas or spaces): the client spreads
    # requests over them and fails over when one is down.
    for one in split_endpoints(url):
        parts = urlsplit(one)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise NodeInputError(
                f"endpoint {one!r} is not an http(s) URL; enter one such as "
                f"{SERVER_EXAMPLE.format(preset.name if preset else 'sd15')} (several: separate them with commas)"
            )
    return url


def is_hugging_face(url: str) -> bool:
    """An HF Inference Endpoint (the published remote-VAE endpoints), rather than our own server."""
    host = urlsplit(url).hostname or ""
    return host.endswith(HF_HOST_SUFFIX)


def frames_are_time(preset: Preset | None) -> bool:
    """Whether an IMAGE batch is encoded as the frames of one video (video VAEs, like ComfyUI)."""
    return preset is not None and preset.is_video_model
