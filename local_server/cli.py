"""`remote-vae-server`: host VAEs over Hugging Face's remote-VAE protocol.

    remote-vae-server --model sd15 --model myflux:flux=/models/ae.safetensors --port 8190

With no `--model`, every preset's default checkpoint is hosted and loaded on first use.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import torch

from ..remote.presets import PRESETS, Preset, PresetError, get_preset
from .accel import Accel
from .app import Settings, check_model_name, create_app
from .auth import TOKEN_ENV, TokenError, load_token
from .comfyui_import import COMFYUI_ENV
from .connections import ConnectionLimits
from .devices import resolve_device
from .limits import Limits
from .postprocess import limit_pillow
from .registry import ModelRegistry, Tuning
from .uploads import UploadLimits

LOOPBACK = ("127.0.0.1", "localhost", "::1")

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
    parser.add_argument(
        "--comfyui",
        metavar="DIR",
        default=os.environ.get(COMFYUI_ENV) or None,
        help="serve VAEs with the ComfyUI installed in DIR (its own VAE code, every architecture it detects): "
        "--model NAME[:PRESET]=FILE, or by default every .safetensors file of its models/vae folders (also "
        f"extra_model_paths.yaml), named after the file (default: ${COMFYUI_ENV}; none: the diffusers backend)",
    )
    # fmt: off
    # One flag per line reads best here; the formatter would spread each over five.
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="auto: the preset's safe dtype on GPU, float32 on CPU (with --comfyui: ComfyUI's choice for each VAE)")
    parser.add_argument("--preload", action="store_true", help="load every model before serving instead of on first use")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    limits, defaults = parser.add_argument_group("limits"), Limits()
    limits.add_argument("--max-pixels", type=int, default=defaults.max_pixels, help="pixels per image or frame (default 4096x4096)")
    limits.add_argument("--max-frames", type=int, default=defaults.max_frames, help="frames per video (default %(default)s)")
    limits.add_argument("--max-batch-pixels", type=int, default=defaults.max_batch_pixels, help="pixels of all images in one request")
    limits.add_argument("--max-request-bytes", type=int, default=defaults.max_request_bytes, help="request body size (default 512 MiB)")
    limits.add_argument(
        "--max-request-memory", type=int, default=defaults.max_request_memory,
        help="bytes of host memory one request may need at its peak (default: an eighth of this machine's, %(default)s)",
    )
    limits.add_argument(
        "--max-in-flight", type=int, default=defaults.max_in_flight,
        help="requests in the server at once, running or waiting; beyond it: 503 + Retry-After (default %(default)s)",
    )
    # The flags --max-in-flight replaces; as before, the server held their sum.
    limits.add_argument("--max-concurrency", type=int, help=argparse.SUPPRESS)
    limits.add_argument("--max-queue", type=int, help=argparse.SUPPRESS)
    limits.add_argument("--request-timeout", type=float, default=defaults.request_timeout, help="seconds per request (504 after)")
    add_connection_arguments(parser)
    security = parser.add_argument_group("security")
    security.add_argument("--token-file", help=f"file holding the bearer token clients must send (default: ${TOKEN_ENV}; none: no auth)")
    security.add_argument("--cors-origin", action="append", default=[], help="allow browser requests from this origin (repeat)")
    speed = parser.add_argument_group("throughput")
    speed.add_argument("--batching", choices=("auto", "on", "off"), default="on", help="batch same-shape requests that arrive together (auto: on CUDA only)")
    speed.add_argument("--batch-window", type=float, default=0.01, help="seconds a request waits for others to batch with")
    speed.add_argument("--memory-budget", type=int, help="bytes a job may use (default: the device's free memory)")
    speed.add_argument("--channels-last", action="store_true", help="channels_last memory layout (CUDA speed-up)")
    speed.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN autotune convolutions per shape")
    speed.add_argument("--compile", action="store_true", help="torch.compile the encoder/decoder (warm-up with --preload)")
    # fmt: on
    return parser


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for how long and how much one connection may hold (`ConnectionLimits`, `UploadLimits`)."""
    group, uploads, connections = parser.add_argument_group("connections"), UploadLimits(), ConnectionLimits()
    flags = [  # flag, type, default, what it bounds
        ("--max-connections", int, connections.max_connections,
         "open connections; a request on one more gets 503 + Retry-After"),
        ("--header-timeout", float, connections.header_timeout,
         "seconds a client has to send a request's line and headers"),
        ("--upload-timeout", float, uploads.idle_timeout, "longest pause in a request body before a 408, in seconds"),
        ("--min-upload-rate", int, uploads.min_rate,
         f"bytes/s a request body must average after its first {uploads.grace:g} s"),
        ("--send-timeout", float, connections.send_timeout,
         "seconds a client may read nothing of its answer before the connection is dropped"),
        ("--shutdown-timeout", int, connections.shutdown_timeout,
         "on SIGTERM, seconds running requests get to finish; uploads in progress are refused"),
    ]  # fmt: skip
    for flag, kind, default, text in flags:
        group.add_argument(flag, type=kind, default=default, help=f"{text} (default %(default)s)")


def connection_limits_from(args: argparse.Namespace) -> ConnectionLimits:
    return ConnectionLimits(
        max_connections=args.max_connections,
        header_timeout=args.header_timeout,
        send_timeout=args.send_timeout,
        shutdown_timeout=args.shutdown_timeout,
    )


def settings_from(args: argparse.Namespace) -> Settings:
    limits = Limits(
        max_pixels=args.max_pixels,
        max_frames=args.max_frames,
        max_batch_pixels=args.max_batch_pixels,
        max_request_bytes=args.max_request_bytes,
        max_request_memory=args.max_request_memory,
        max_in_flight=max_in_flight(args),
        request_timeout=args.request_timeout,
    )
    uploads = UploadLimits(idle_timeout=args.upload_timeout, min_rate=args.min_upload_rate)
    return Settings(
        limits=limits,
        uploads=uploads,
        token=load_token(args.token_file),
        cors_origins=tuple(args.cors_origin),
    )


def max_in_flight(args: argparse.Namespace) -> int:
    """--max-in-flight, or the sum of the old --max-concurrency (default 2) and --max-queue (default 16)."""
    if args.max_concurrency is None and args.max_queue is None:
        return args.max_in_flight
    concurrency = 2 if args.max_concurrency is None else args.max_concurrency
    return concurrency + (16 if args.max_queue is None else args.max_queue)


def tuning_from(args: argparse.Namespace) -> Tuning:
    return Tuning(
        batching={"auto": None, "on": True, "off": False}[args.batching],
        batch_window=args.batch_window,
        memory_budget=args.memory_budget,
        accel=Accel(
            channels_last=args.channels_last, cudnn_benchmark=args.cudnn_benchmark, compile=args.compile
        ),
    )


def build_registry(
    specs: Sequence[str], device: str, dtype: str, options: Tuning | None = None, comfyui: str | None = None
) -> ModelRegistry:
    if comfyui:
        from .comfy_models import build_comfy_registry  # imports ComfyUI: only when asked for

        return build_comfy_registry(comfyui, specs, device, dtype, options)
    registry = ModelRegistry(load_hint=LOAD_HINT, options=options)
    models = [parse_model_spec(spec) for spec in specs] or [(p.name, p, None) for p in PRESETS.values()]
    for name, preset, source in models:
        registry.add(name, preset, source=source, device=device, dtype=dtype)
    return registry


def base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if resolve_device(args.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA device is available; use --device cpu")
        settings = settings_from(args)
        models = build_registry(args.model, args.device, args.dtype, tuning_from(args), args.comfyui)
    except (PresetError, ValueError, RuntimeError, TokenError) as exc:
        parser.error(str(exc))
    import uvicorn  # the server extra; imported late so --help works without it

    from .http_server import uvicorn_config

    if args.host not in LOOPBACK and settings.token is None:
        print(
            f"remote-vae-server: WARNING: listening on {args.host} without a token: anyone who can reach this "
            f"port can use the server; set ${TOKEN_ENV} or --token-file",
            file=sys.stderr,
            flush=True,
        )
    app = create_app(models, settings)
    limit_pillow(settings.limits.max_pixels)  # process-wide, so here and not in create_app
    if args.preload:
        models.preload()
    url = base_url(args.host, args.port)
    for i, model in enumerate(models.models()):
        default = f"  (also {url}/)" if i == 0 else ""
        dtype = str(model.dtype).removeprefix("torch.")
        print(
            f"remote-vae-server: {model.name} [{model.preset.name}, {model.device}, {dtype}] at {url}/{model.name}{default}"
        )
    print(f"remote-vae-server: model list at {url}/v1/models", flush=True)
    try:
        # On SIGTERM/SIGINT uvicorn stops accepting, refuses uploads in progress, lets running requests
        # finish within --shutdown-timeout, then returns.
        config = uvicorn_config(
            app, connection_limits_from(args), host=args.host, port=args.port, log_level=args.log_level
        )
        uvicorn.Server(config).run()
    finally:
        models.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
