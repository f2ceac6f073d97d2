"""Concurrent same-shape requests that arrive while the device is busy run as one batch; a lone request
on an idle device starts at once."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from remote_vae.local_server.registry import Tuning
from support.hooked import Wrapped
from support.one_model import hosting, pt, reference, z
from support.serving import tensor_of


def test_batching_groups_concurrent_same_shape_requests(vae):
    started, release = threading.Event(), threading.Event()

    def hold_the_first(_z):
        if not started.is_set():
            started.set()
            assert release.wait(30)

    model = Wrapped(vae, before=hold_the_first)
    first, *latents = [z(1, 4, 8, 8, seed=i) for i in range(4)]
    options = Tuning(batching=True, batch_window=5.0)
    with hosting(model, options=options) as url, ThreadPoolExecutor(4) as pool:
        busy = pool.submit(lambda: tensor_of(pt(url, first)))
        assert started.wait(30)  # the first request runs at once and holds the device
        outs = pool.map(lambda t: tensor_of(pt(url, t)), latents)
        time.sleep(1.0)  # the others arrive while it is busy
        release.set()
        outs = [busy.result(), *outs]
    assert model.batches == [1, 3]
    for latent, out in zip([first, *latents], outs, strict=True):
        torch.testing.assert_close(out, reference(vae, latent), rtol=1e-4, atol=1e-4)


def test_a_lone_request_does_not_wait_for_the_batch_window(vae):
    model = Wrapped(vae)
    with hosting(model, options=Tuning(batching=True, batch_window=5.0)) as url:
        tensor_of(pt(url, z(1, 4, 8, 8)))  # warm up
        started = time.perf_counter()
        out = tensor_of(pt(url, z(1, 4, 8, 8, seed=1)))
        elapsed = time.perf_counter() - started
    assert elapsed < 2.5 and model.batches == [1, 1]
    torch.testing.assert_close(out, reference(vae, z(1, 4, 8, 8, seed=1)), rtol=1e-4, atol=1e-4)
