"""remote-vae's client library: the wire codec, the preset table and the HTTP client."""

from .client import (
    RemoteVAECancelled,
    RemoteVAEError,
    RemoteVAETimeout,
    Reply,
    Transfer,
    TransportOptions,
    remote_decode,
    remote_encode,
    send,
)
from .presets import PRESETS, Preset, PresetError, detect_preset, get_preset
from .protocol import ProtocolError

__all__ = [
    "PRESETS",
    "Preset",
    "PresetError",
    "ProtocolError",
    "RemoteVAECancelled",
    "RemoteVAEError",
    "RemoteVAETimeout",
    "Reply",
    "Transfer",
    "TransportOptions",
    "detect_preset",
    "get_preset",
    "remote_decode",
    "remote_encode",
    "send",
]
