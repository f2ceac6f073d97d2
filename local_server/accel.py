"""Optional speed-ups on CUDA: channels_last memory layout, cuDNN autotuning and torch.compile.

Each is behind a flag (bench/gpu.py measures them). They are harmless on the CPU, where
channels_last still applies and compile works if a C++ compiler is present.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("remote_vae.server")


@dataclass(frozen=True)
class Accel:
    channels_last: bool = False
    cudnn_benchmark: bool = False
    compile: bool = False


def apply(model: torch.nn.Module, device: torch.device, accel: Accel, *, video: bool) -> torch.nn.Module:
    """Apply the chosen speed-ups to a loaded model (in place where torch allows it)."""
    if accel.cudnn_benchmark and device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # autotune conv algorithms per input shape
    if accel.channels_last:
        model = model.to(memory_format=torch.channels_last_3d if video else torch.channels_last)
    if accel.compile:
        # Compile the sub-networks, not `decode`/`encode`: diffusers' wrappers (slicing, tiling,
        # output dataclasses) stay eager and the graphs stay small.
        for part in ("decoder", "encoder"):
            if hasattr(model, part):
                setattr(model, part, torch.compile(getattr(model, part)))
        log.info("torch.compile enabled; the first decode of each shape compiles")
    return model


def input_layout(x: torch.Tensor, accel: Accel) -> torch.Tensor:
    """Match the model's memory layout so convolutions do not convert on every call."""
    if not accel.channels_last:
        return x
    return x.contiguous(memory_format=torch.channels_last_3d if x.ndim == 5 else torch.channels_last)
