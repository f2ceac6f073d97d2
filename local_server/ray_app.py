"""Ray Serve deployment: the same ASGI app, one replica per GPU, autoscaled on ongoing requests.

    serve run remote_vae.local_server.ray_app:build models="sd15;flux=/models/ae.safetensors"
    serve run local_server/ray_serve.yaml

Arguments (all strings, as `serve run` passes them): `models` (`;`-separated `--model` specs; default
every preset), `comfyui` (a ComfyUI installation whose VAE code serves them, as
`--comfyui`), `device`, `dtype`, `num_replicas` (fixed count) or `min_replicas`/`max_replicas` with
`target_ongoing_requests` (autoscaling), `gpus_per_replica` (default 1 when CUDA is present, else 0),
`cpus_per_replica`, `max_ongoing_requests`. Each replica hosts every listed model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from ray import serve

REPLICA_HEADER = b"x-remote-vae-replica"


def with_header(app: Callable, name: bytes, value: bytes) -> Callable:
    """Wrap an ASGI app so every HTTP response names the replica that served it, and its body chunks
    are bytes: Ray Serve pickles a replica's ASGI messages to its proxy, and a memoryview (our answers'
    bodies without a copy) does not pickle."""

    async def wrapped(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_with_header(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (name, value)]}
            elif isinstance(message.get("body"), memoryview):
                message = {**message, "body": bytes(message["body"])}
            await send(message)

        await app(scope, receive, send_with_header)

    return wrapped


def asgi_builder(
    models: list[str], device: str, dtype: str, comfyui: str | None = None
) -> Callable[[], Callable]:
    """A builder Ray evaluates on each replica: its own ModelRegistry and app (models load on first use)."""

    def build_app() -> Callable:
        from .app import create_app
        from .cli import build_registry
        from .limits import Limits
        from .postprocess import limit_pillow

        registry = build_registry(models, device, dtype, comfyui=comfyui)
        limit_pillow(Limits().max_pixels)  # the replica's process serves this app only
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a replica (local testing mode)
            replica = str(os.getpid())
        return with_header(create_app(registry), REPLICA_HEADER, replica.encode())

    return build_app


def deployment_options(args: Mapping[str, str]) -> dict[str, Any]:
    """Ray Serve deployment options from `serve run` arguments."""
    import torch

    gpus = float(args.get("gpus_per_replica", 1 if torch.cuda.is_available() else 0))
    options: dict[str, Any] = {
        "name": "remote-vae",
        "ray_actor_options": {"num_gpus": gpus, "num_cpus": float(args.get("cpus_per_replica", 1))},
        "max_ongoing_requests": int(args.get("max_ongoing_requests", 8)),
    }
    if "num_replicas" in args:
        options["num_replicas"] = int(args["num_replicas"])
    else:
        options["autoscaling_config"] = {
            "min_replicas": int(args.get("min_replicas", 1)),
            "max_replicas": int(args.get("max_replicas", 4)),
            "target_ongoing_requests": float(args.get("target_ongoing_requests", 2)),
        }
    return options


def build(args: Mapping[str, str]) -> serve.Application:
    """The application builder for `serve run remote_vae.local_server.ray_app:build key=value ...`."""
    models = [spec.strip() for spec in args.get("models", "").split(";") if spec.strip()]
    builder = asgi_builder(
        models, args.get("device", "auto"), args.get("dtype", "auto"), args.get("comfyui") or None
    )

    @serve.ingress(builder)
    class RemoteVAEReplica:
        """One replica: the ASGI app the builder made serves every request."""

    return serve.deployment(RemoteVAEReplica, **deployment_options(args)).bind()
