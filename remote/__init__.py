"""remote-vae's client library: the wire codec, the preset table and the HTTP client."""

from . import client
from .client import *  # noqa: F403 - the public API: remote_decode, remote_encode, send, errors, Reply
from .presets import PRESETS, Preset, PresetError, detect_preset, get_preset
from .protocol import ProtocolError

__all__ = [
    *client.__all__,
    "PRESETS",
    "Preset",
    "PresetError",
    "ProtocolError",
    "detect_preset",
    "get_preset",
]
