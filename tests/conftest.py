"""Session fixtures: one server hosting a tiny random VAE per preset the compat tests cover."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from remote_vae.testing import random_vae
from support.serving import hosting


@pytest.fixture(scope="session")
def models() -> dict[str, torch.nn.Module]:
    """One tiny model per preset, each with its own seed and the preset's scaling in its config."""
    presets = ("sd15", "sdxl", "flux", "hunyuan_video", "wan21")
    return {name: random_vae(name, seed) for seed, name in enumerate(presets, start=1)}


@pytest.fixture(scope="session")
def server(models) -> Iterator[str]:
    """One server hosting every tiny model under its preset name (sd15 first, so also at POST /)."""
    with hosting({name: (name, model) for name, model in models.items()}) as (url, _host):
        yield url
