"""`remote-vae-server`: host VAEs over Hugging Face's remote-VAE protocol.

    remote-vae-server --model sd15 --model myflux:flux=/models/ae.safetensors --port 8190

With no `--model`, every preset's default checkpoint is hosted and loaded on first use.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import torch

from ..remote.presets import PRESETS, Preset, PresetError, get_preset
from .app import check_model_name, create_app
from .engine import ModelHost, resolve_device

DTYPE_CHOICES = ("auto", "float16", "bfloat16", "float32")
LOAD_HINT = "to serve a local copy, start the server with --model {spec}=/path/to/vae.safetensors (or a diffusers folder)"


def parse_model_spec(spec: str) -> tuple[str, Preset, str | None]:
    """`NAME[=SOURCE]` or `ALIAS:PRESET[=SOURCE]` -> (name, preset, source or None for the default)."""
    names, _, source = spec.partition("=")
    alias, colon, preset_name = names.partition(":")
    preset = get_preset(preset_name if colon else alias)
    check_model_name(alias)
    return alias, preset, source.strip() or None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="remote-vae-server",
        description="Serve VAE decode/encode over Hugging Face's remote-VAE protocol "
        "(diffusers' remote_decode/remote_encode work against it).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8190, help="port to listen on (default 8190)")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME[=SOURCE]",
        help="host a model; NAME is a preset (" + ", ".join(PRESETS) + ") or ALIAS:PRESET; SOURCE is a "
        "Hugging Face repo id, a diffusers folder or a .safetensors file (default: the preset's checkpoint). "
        "Repeat for several models; the first also answers POST /. Default: every preset.",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="auto: the preset's safe dtype on GPU, float32 on CPU")
    parser.add_argument("--preload", action="store_true", help="load every model before serving instead of on first use")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return parser


def build_host(specs: Sequence[str], device: str, dtype: str) -> ModelHost:
    host = ModelHost(load_hint=LOAD_HINT)
    models = [parse_model_spec(spec) for spec in specs] or [(p.name, p, None) for p in PRESETS.values()]
    for name, preset, source in models:
        host.add(name, preset, source=source, device=device, dtype=dtype)
    return host


def base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if resolve_device(args.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA device is available; use --device cpu")
        host = build_host(args.model, args.device, args.dtype)
    except (PresetError, ValueError, RuntimeError) as exc:
        parser.error(str(exc))
    import uvicorn  # the server extra; imported late so --help works without it

    app = create_app(host)
    if args.preload:
        host.preload()
    url = base_url(args.host, args.port)
    for i, model in enumerate(host.models()):
        default = f"  (also {url}/)" if i == 0 else ""
        dtype = str(model.dtype).removeprefix("torch.")
        print(f"remote-vae-server: {model.name} [{model.preset.name}, {model.device}, {dtype}] at {url}/{model.name}{default}")
    print(f"remote-vae-server: model list at {url}/v1/models", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        host.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
