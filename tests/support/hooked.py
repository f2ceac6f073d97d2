"""A real tiny VAE behind hooks, to block, fail or record what reaches the model."""

from __future__ import annotations

from collections.abc import Callable

import torch


class Wrapped(torch.nn.Module):
    """Calls `before(z)` before each decode and `before_encode(x)` before each encode; records each
    decode's batch size in `batches` and each encode's input in `encoded`."""

    def __init__(self, inner, before: Callable | None = None, before_encode: Callable | None = None):
        super().__init__()
        self.inner = inner
        self.before = before or (lambda z: None)
        self.before_encode = before_encode or (lambda x: None)
        self.batches: list[int] = []
        self.encoded: list[torch.Tensor] = []

    @property
    def config(self):
        return self.inner.config

    def decode(self, z):
        self.batches.append(z.shape[0])
        self.before(z)
        return self.inner.decode(z)

    def encode(self, x):
        self.encoded.append(x.detach().clone())
        self.before_encode(x)
        return self.inner.encode(x)
