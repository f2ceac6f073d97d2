"""One model served on a free 127.0.0.1 port, and raw float32 decodes against it (the server tests' helpers)."""

import contextlib

import torch

from remote_vae.local_server.app import create_app
from remote_vae.local_server.registry import ModelRegistry
from remote_vae.remote.presets import PRESETS
from support.serving import post_decode, serve


def z(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def hosting(model, settings=None, options=None, dtype="float32", preset="sd15"):
    host = ModelRegistry(options=options)
    host.add(preset, PRESETS[preset], model=model, device="cpu", dtype=dtype)
    try:
        with serve(create_app(host, settings)) as url:
            yield url
    finally:
        host.close()


def pt(url, latent, extra_params=(), model="sd15", **kw):
    params = [("output_dtype", "float32"), *extra_params]
    return post_decode(
        f"{url}/{model}", latent, output_type="pt", do_scaling=False, extra_params=params, **kw
    )


def reference(vae, latent):
    with torch.inference_mode():
        return vae.decode(latent).sample
