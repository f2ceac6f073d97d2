"""The micro SD VAE most server tests serve."""

import pytest

from remote_vae.testing import random_vae


@pytest.fixture(scope="module")
def vae():
    return random_vae("sd15", 7, size="micro", init="default")
