"""Concurrent same-shape requests run as one batch."""

from concurrent.futures import ThreadPoolExecutor

import torch

from remote_vae.local_server.registry import Tuning
from support.hooked import Wrapped
from support.one_model import hosting, pt, reference, z
from support.serving import tensor_of


def test_batching_groups_concurrent_same_shape_requests(vae):
    model = Wrapped(vae)
    latents = [z(1, 4, 8, 8, seed=i) for i in range(3)]
    options = Tuning(batching=True, batch_window=0.5)
    with hosting(model, options=options) as url, ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda t: tensor_of(pt(url, t)), latents))
    assert model.batches == [3]
    for latent, out in zip(latents, outs, strict=True):
        torch.testing.assert_close(out, reference(vae, latent), rtol=1e-4, atol=1e-4)
