"""One comparison for "we return what diffusers returns": the same types and the same values, exactly."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def assert_same(a, b) -> None:
    """`a` and `b` are the same result: lists item by item, PIL images pixel for pixel (same format, size
    and mode), tensors bit for bit (same dtype), anything else equal and of the same type."""
    if isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, Image.Image):
        assert isinstance(b, Image.Image) and (a.format, a.size, a.mode) == (b.format, b.size, b.mode)
        assert np.array_equal(np.asarray(a), np.asarray(b))
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert type(a) is type(b) and a == b
