"""Session fixtures: one server hosting a tiny random VAE per preset the compat tests cover."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from support.serving import hosting
from support.tiny import tiny_models


@pytest.fixture(scope="session")
def models() -> dict[str, torch.nn.Module]:
    return tiny_models()


@pytest.fixture(scope="session")
def server(models) -> Iterator[str]:
    """One server hosting every tiny model under its preset name (sd15 first, so also at POST /)."""
    with hosting({name: (name, model) for name, model in models.items()}) as (url, _host):
        yield url
