"""Serve bench models with the real server app: `python -m bench.serve --port P --threads N --model NAME=PRESET:MODEL`.

The same `create_app` + `ModelRegistry` + uvicorn the `remote-vae-server` CLI runs; the only difference is that
the models are built here from `bench.models` (seeded random weights, or stand-ins) and handed to the host,
and that the torch thread count is set, so the server and the in-process baseline compute alike.
"""

from __future__ import annotations

import argparse
import os


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True, help="torch intra-op threads")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PRESET:MODEL")
    parser.add_argument(
        "--batching",
        default="auto",
        choices=("auto", "on", "off"),
        help="the server's dynamic batching (auto: the server's default for the device)",
    )
    args = parser.parse_args()

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # threads the device worker starts inherit this
    import torch
    import uvicorn

    from remote_vae.local_server.app import create_app
    from remote_vae.local_server.registry import ModelRegistry
    from remote_vae.remote.presets import get_preset

    from .models import build

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    host = ModelRegistry(**registry_options(args.batching))
    for spec in args.model:
        name, _, rest = spec.partition("=")
        preset, _, model_name = rest.partition(":")
        model = build(model_name, args.seed, dtype).to(args.device)
        host.add(name, get_preset(preset), model=model, device=args.device, dtype=dtype)
    try:
        uvicorn.run(create_app(host), host=args.host, port=args.port, log_level="warning")
    finally:
        host.close()


def registry_options(batching: str) -> dict:
    """ModelRegistry keyword arguments for `--batching` (the server's defaults for `auto`)."""
    if batching == "auto":
        return {}
    from remote_vae.local_server.registry import Tuning

    return {"options": Tuning(batching=batching == "on")}


if __name__ == "__main__":
    main()
