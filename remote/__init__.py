"""remote-vae's client library: the wire codec, the preset table and the HTTP client."""

from .presets import PRESETS, Preset, PresetError, detect_preset, get_preset
from .protocol import ProtocolError

__all__ = ["PRESETS", "Preset", "PresetError", "ProtocolError", "detect_preset", "get_preset"]
