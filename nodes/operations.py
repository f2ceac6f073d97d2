"""What the nodes do: remote decode of a LATENT and remote encode of an IMAGE, with fallback and events.

Imported only when a node runs (it brings torch and requests).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..remote import client
from ..remote.presets import PRESETS, Preset
from . import comfy_runtime
from .batching import MAX_PARALLEL, PIXEL_BUDGET, plan_chunks, run_in_order
from .choices import DEFAULT_TIMEOUT, DEFAULT_TOKEN_ENV, MIN_TIMEOUT, TRANSFER_DECODE, TRANSFER_ENCODE
from .convert import (
    UnexpectedReply,
    crop_pixels,
    decode_request,
    decoded_size,
    encode_request,
    image_from_reply,
    latent_from_reply,
)
from .fallback import local_decode, local_encode
from .resolve import (
    NodeInputError,
    decode_preset,
    encode_preset,
    endpoint_url,
    frames_are_time,
    is_hugging_face,
    token_variable,
)
from .ui_events import report_transfer, report_warning

CONNECT_TIMEOUT = 10.0
SMALLEST_COMPRESSION = min(p.spatial_compression for p in PRESETS.values())


@dataclass
class Outcome:
    """A finished remote run: the tensor, one Transfer per request, and the wall time."""

    value: torch.Tensor
    transfers: list = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class Connection:
    """Where and how to send: the same for every request of one run."""

    url: str
    timeout: int = DEFAULT_TIMEOUT
    token_env: str | None = DEFAULT_TOKEN_ENV
    interrupted: Callable[[], bool] = comfy_runtime.interrupted

    def send(self, wire, stop: threading.Event):
        return client.send(
            self.url,
            wire,
            timeout=(min(CONNECT_TIMEOUT, float(self.timeout)), float(self.timeout)),
            token_env=self.token_env,
            cancel=lambda: stop.is_set() or self.interrupted(),
        )


def _unexpected(err: UnexpectedReply, reply) -> client.RemoteVAEError:
    """A reply that parsed but holds the wrong thing, as the client's error (so the fallback applies)."""
    status = reply.transfer.status
    return client.RemoteVAEError(
        reply.transfer.endpoint,
        f"answered {status} but {err}",
        status=status,
        hint="check that the endpoint URL and the preset name the same model",
    )


def _connect(
    endpoint: str, preset: Preset | None, operation: str, timeout: int, token_env, interrupted
) -> Connection:
    if timeout < MIN_TIMEOUT:
        raise NodeInputError(f"timeout {timeout} s is below the minimum of {MIN_TIMEOUT} s")
    return Connection(
        endpoint_url(endpoint, preset, operation), timeout, token_variable(token_env), interrupted
    )


def _check_transfer(transfer: str, allowed: tuple[str, ...]) -> None:
    if transfer not in allowed:
        raise NodeInputError(f"transfer {transfer!r} is not one of {', '.join(allowed)}")


def _run(jobs, node_id: str | None, parallel: int) -> tuple[list, float]:
    bar = comfy_runtime.progress_bar(len(jobs), node_id)
    started = time.perf_counter()
    results = run_in_order(jobs, parallel=parallel, on_done=lambda: bar.update(1))
    return results, time.perf_counter() - started


# --------------------------------------------------------------------------- decode


def decode_latent(
    samples: torch.Tensor,
    *,
    preset: str = "auto",
    endpoint: str = "",
    transfer: str = "lossless",
    timeout: int = DEFAULT_TIMEOUT,
    token_env: str | None = DEFAULT_TOKEN_ENV,
    video_only: bool = False,
    transfers: tuple[str, ...] = TRANSFER_DECODE,
    node_id: str | None = None,
    pixel_budget: int = PIXEL_BUDGET,
    parallel: int = MAX_PARALLEL,
    interrupted: Callable[[], bool] = comfy_runtime.interrupted,
) -> Outcome:
    """Decode raw LATENT samples remotely into IMAGE frames [B*F,H,W,3], exactly as VAEDecode would."""
    shape = list(samples.shape)
    _check_transfer(transfer, transfers)
    chosen = decode_preset(preset, shape, has_endpoint=bool((endpoint or "").strip()), video_only=video_only)
    if transfer == "compact" and len(shape) == 5:
        raise NodeInputError(
            "transfer 'compact' (JPEG) needs image latents [B,C,H,W]; pick lossless or exact for 5-D latents"
        )
    conn = _connect(endpoint, chosen, "decode", timeout, token_env, interrupted)
    _, height, width = decoded_size(chosen, shape)
    one_per_request = len(shape) == 5 or transfer == "compact"
    chunks = plan_chunks(shape[0], height * width, pixel_budget, max_items=1 if one_per_request else None)
    jobs = [_decode_job(conn, samples[chunk], transfer, chosen) for chunk in chunks]
    results, seconds = _run(jobs, node_id, parallel)
    images = torch.cat([image for image, _ in results])
    return Outcome(images, [t for _, t in results], seconds)


def _decode_job(conn: Connection, latent: torch.Tensor, transfer: str, preset: Preset):
    def job(stop: threading.Event):
        reply = conn.send(decode_request(latent, transfer), stop)
        try:
            return image_from_reply(reply, transfer, preset, list(latent.shape)), reply.transfer
        except UnexpectedReply as err:
            raise _unexpected(err, reply) from None

    return job


# --------------------------------------------------------------------------- encode


def encode_image(
    pixels: torch.Tensor,
    *,
    preset: str = "auto",
    endpoint: str = "",
    transfer: str = "lossless",
    timeout: int = DEFAULT_TIMEOUT,
    token_env: str | None = DEFAULT_TOKEN_ENV,
    node_id: str | None = None,
    pixel_budget: int = PIXEL_BUDGET,
    parallel: int = MAX_PARALLEL,
    interrupted: Callable[[], bool] = comfy_runtime.interrupted,
) -> Outcome:
    """Encode IMAGE pixels remotely into raw LATENT samples (the posterior mode), as VAEEncode would."""
    if pixels.ndim != 4 or pixels.shape[-1] < 3:
        raise NodeInputError(f"IMAGE of shape {list(pixels.shape)} is not [B,H,W,3] (or 4 with alpha)")
    _check_transfer(transfer, TRANSFER_ENCODE)
    chosen = encode_preset(preset, has_endpoint=bool((endpoint or "").strip()))
    conn = _connect(endpoint, chosen, "encode", timeout, token_env, interrupted)
    multiple = chosen.spatial_compression if chosen else SMALLEST_COMPRESSION
    pixels = crop_pixels(pixels[:, :, :, :3], multiple)
    if pixels.shape[1] == 0 or pixels.shape[2] == 0:
        raise NodeInputError(
            f"the image is smaller than {multiple} pixels, the VAE's compression: nothing to encode"
        )
    as_video = frames_are_time(chosen)
    one_frame = chosen is not None and chosen.is_video and not as_video
    as_png = transfer == "lossless" and is_hugging_face(conn.url) and not as_video
    batch, height, width = pixels.shape[0], pixels.shape[1], pixels.shape[2]
    if as_video:
        chunks = [slice(0, batch)]
    else:
        one_each = one_frame or as_png
        chunks = plan_chunks(batch, height * width, pixel_budget, max_items=1 if one_each else None)
    jobs = [
        _encode_job(conn, pixels[chunk], transfer, chosen, as_video, one_frame, as_png) for chunk in chunks
    ]
    results, seconds = _run(jobs, node_id, parallel)
    latent = torch.cat([latent for latent, _ in results])
    return Outcome(latent, [t for _, t in results], seconds)


def _encode_job(
    conn: Connection,
    pixels: torch.Tensor,
    transfer: str,
    preset,
    as_video: bool,
    one_frame: bool,
    as_png: bool,
):
    def job(stop: threading.Event):
        reply = conn.send(encode_request(pixels, transfer, as_video, as_png), stop)
        try:
            return latent_from_reply(reply, preset, list(pixels.shape), as_video, one_frame), reply.transfer
        except UnexpectedReply as err:
            raise _unexpected(err, reply) from None

    return job


# --------------------------------------------------------------------------- what the nodes call


def run_node(
    node_id: str | None,
    remote: Callable[[], Outcome],
    local: Callable[[], torch.Tensor] | None,
    what: str,
) -> torch.Tensor:
    """Run `remote` and report its transfers. On Cancel raise ComfyUI's interrupt. When the remote fails,
    run `local` (the connected VAE) with a visible warning, or re-raise when there is none.

    Input errors (preset, endpoint, transfer) are raised as they are: a fallback would hide them."""
    try:
        outcome = remote()
    except client.RemoteVAECancelled:
        comfy_runtime.raise_interrupt()
        raise
    except client.RemoteVAEError as err:
        if local is None:
            raise
        report_warning(node_id, f"Remote VAE {what} failed, used the connected VAE locally instead: {err}")
        return local()
    report_transfer(node_id, outcome.transfers, outcome.seconds)
    return outcome.value


def decode_node(node_id: str | None, samples: dict, vae, **widgets) -> torch.Tensor:
    """RemoteVAEDecode / RemoteVideoDecode: LATENT dict -> IMAGE (other LATENT keys do not matter here)."""
    latent = samples["samples"]
    return run_node(
        node_id,
        lambda: decode_latent(latent, node_id=node_id, **widgets),
        None if vae is None else lambda: local_decode(vae, latent),
        "decode",
    )


def encode_node(node_id: str | None, pixels: torch.Tensor, vae, **widgets) -> dict:
    """RemoteVAEEncode: IMAGE -> LATENT dict."""
    latent = run_node(
        node_id,
        lambda: encode_image(pixels, node_id=node_id, **widgets),
        None if vae is None else lambda: local_encode(vae, pixels),
        "encode",
    )
    return {"samples": latent}
