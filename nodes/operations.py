"""What the nodes do: remote decode of a LATENT and remote encode of an IMAGE, with fallback and events.

Imported only when a node runs (it brings torch and requests).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

import torch

from ..remote import link, planes, protocol
from ..remote.catalog import describe_model, known_model
from ..remote.errors import RemoteVAECancelled, RemoteVAEError
from ..remote.frames import LOSSLESS_CODECS, Codec
from ..remote.presets import PRESETS, Preset
from ..remote.receiving import ReceiverFactory, decode_threads
from ..remote.reply import Reply, Transfer
from ..remote.sending import send, split_endpoints
from ..remote.tokens import TokenError, TokenStore, origin_of
from . import comfy_runtime
from .choices import (
    AUTO,
    DEFAULT_TIMEOUT,
    MIN_TIMEOUT,
    TRANSFER_DECODE,
    TRANSFER_ENCODE,
    TRANSFER_VIDEO,
    TransferMode,
)
from .chunking import MAX_PARALLEL, PIXEL_BUDGET, plan_chunks, run_in_order
from .convert import (
    DecodeForm,
    audio_from_reply,
    audio_latent_from_reply,
    audio_request,
    crop_pixels,
    decode_request,
    decoded_size,
    encode_request,
    image_from_reply,
    latent_from_reply,
    pixel_receiver,
)
from .fallback import local_decode, local_encode
from .resolve import (
    NodeInputError,
    check_layout,
    decode_preset,
    encode_preset,
    endpoint_url,
    frames_are_time,
    is_hugging_face,
)
from .ui_events import report_transfer, report_warning

CONNECT_TIMEOUT = 10.0
SMALLEST_COMPRESSION = min(p.spatial_compression for p in PRESETS.values())


@dataclass(frozen=True)
class NodeRequest:
    """What the node's widgets ask for: the model, where it runs, the transfer form and the timeout."""

    preset: str = AUTO
    endpoint: str = ""
    transfer: TransferMode = "lossless"
    timeout: int = DEFAULT_TIMEOUT
    video_only: bool = False  # Remote Video Decode: video latents only, and no JPEG
    # The server's own description of its model (a Remote VAE Loader's VAE; preset auto with a URL): it
    # wins over the preset table, which has no row for the server's comfy-backend models.
    model: Preset | None = None
    tile_size: int | None = None  # the server decodes/encodes in tiles of this many latent pixels a side
    upload: protocol.FloatDtype | None = None  # the server's model dtype, when described: latents go in it

    @property
    def has_endpoint(self) -> bool:
        return bool((self.endpoint or "").strip())


def with_server_model(request: NodeRequest, operation: protocol.Operation) -> NodeRequest:
    """Preset auto with a URL: the model as its server describes it (GET /v1/models). Endpoints without a
    model list (Hugging Face's, other servers) keep the guess from the latent's shape; a server that
    cannot be reached at all is an error here already."""
    endpoints = split_endpoints(request.endpoint or "")
    if (
        request.preset != AUTO
        or request.model is not None
        or not endpoints
        or any(map(is_hugging_face, endpoints))
    ):
        return request
    endpoint_url(request.endpoint, None, operation)  # a URL that is not one says so before anything is sent
    try:
        tokens = comfy_runtime.local_tokens()
    except TokenError:
        return request  # Connection.for_request says what is wrong with the configuration
    try:
        model = describe_model(
            request.endpoint, tokens=tokens, timeout=min(CONNECT_TIMEOUT, float(request.timeout))
        )
    except RemoteVAEError as exc:
        if exc.status is None:
            raise
        comfy_runtime.log.debug("%s: the preset is guessed from the shape", exc)
        return request
    return replace(request, model=model.preset(), upload=model.dtype)


@dataclass(frozen=True)
class RunOptions:
    """How a run goes: its node (progress bar, events), the request size, parallelism and the Cancel check."""

    node_id: str | None = None
    pixel_budget: int = PIXEL_BUDGET
    parallel: int = MAX_PARALLEL
    interrupted: Callable[[], bool] = comfy_runtime.interrupted


@dataclass
class Outcome:
    """A finished remote run: the tensor, one Transfer per request, and the wall time."""

    value: torch.Tensor
    transfers: list[Transfer]
    seconds: float


@dataclass(frozen=True)
class Connection:
    """Where and how to send: the same for every request of one run."""

    url: str
    timeout: int = DEFAULT_TIMEOUT
    tokens: TokenStore = field(
        default_factory=TokenStore
    )  # bound in local configuration, never in a workflow
    interrupted: Callable[[], bool] = comfy_runtime.interrupted

    @classmethod
    def for_request(
        cls, request: NodeRequest, preset: Preset | None, operation: protocol.Operation, run: RunOptions
    ) -> Connection:
        if request.timeout < MIN_TIMEOUT:
            raise NodeInputError(f"timeout {request.timeout} s is below the minimum of {MIN_TIMEOUT} s")
        url = endpoint_url(request.endpoint, preset, operation)
        try:
            tokens = comfy_runtime.local_tokens()
        except TokenError as exc:
            raise NodeInputError(f"the server token configuration cannot be used: {exc}") from None
        return cls(url, request.timeout, tokens, run.interrupted)

    def send(
        self, wire: protocol.WireRequest, stop: threading.Event, receiver: ReceiverFactory | None = None
    ) -> Reply:
        return send(
            self.url,
            wire,
            total_timeout=float(self.timeout),  # the node's timeout bounds its whole call, retries included
            timeout=(min(CONNECT_TIMEOUT, float(self.timeout)), float(self.timeout)),
            tokens=self.tokens,
            cancel=lambda: stop.is_set() or self.interrupted(),
            receiver=receiver,
        )


Job = Callable[[threading.Event], "tuple[torch.Tensor, Transfer]"]


def _job(
    conn: Connection,
    build: Callable[[], protocol.WireRequest],
    read: Callable[[Reply], torch.Tensor],
    receive: Callable[[], ReceiverFactory] | None = None,
) -> Job:
    """One request: its body is built on the worker thread, `receive` (when given) takes the answer as it
    arrives, and `read` checks and converts the reply."""

    def job(stop: threading.Event) -> tuple[torch.Tensor, Transfer]:
        reply = conn.send(build(), stop, receive() if receive else None)
        return read(reply), reply.transfer

    return job


def _run(jobs: Sequence[Job], run: RunOptions) -> Outcome:
    bar = comfy_runtime.progress_bar(len(jobs), run.node_id)
    started = time.perf_counter()
    results = run_in_order(jobs, parallel=run.parallel, on_done=lambda: bar.update(1))
    seconds = time.perf_counter() - started
    values = [value for value, _ in results]
    joined = values[0] if len(values) == 1 else torch.cat(values)  # one chunk: no copy
    return Outcome(joined, [t for _, t in results], seconds)


def _check_transfer(transfer: str, allowed: tuple[TransferMode, ...]) -> None:
    if transfer not in allowed:
        raise NodeInputError(f"transfer {transfer!r} is not one of {', '.join(allowed)}")


# --------------------------------------------------------------------------- decode


def decode_latent(samples: torch.Tensor, request: NodeRequest, run: RunOptions = RunOptions()) -> Outcome:
    """Decode raw LATENT samples remotely into IMAGE frames [B*F,H,W,3], exactly as VAEDecode would."""
    shape = list(samples.shape)
    transfer = request.transfer
    _check_transfer(transfer, TRANSFER_VIDEO if request.video_only else TRANSFER_DECODE)
    check_layout(shape, video_only=request.video_only)
    request = with_server_model(request, "decode")
    chosen = decode_preset(
        request.preset,
        shape,
        has_endpoint=request.has_endpoint,
        video_only=request.video_only,
        described=request.model,
    )
    if transfer == "compact" and len(shape) == 5:
        raise NodeInputError(
            "transfer 'compact' (JPEG) needs image latents [B,C,H,W]; pick lossless or exact for 5-D latents"
        )
    conn = Connection.for_request(request, chosen, "decode", run)
    frames, height, width = decoded_size(chosen, shape)
    one_per_request = len(shape) == 5 or transfer == "compact"
    chunks = plan_chunks(shape[0], height * width, run.pixel_budget, max_items=1 if one_per_request else None)
    parts = [samples[chunk] for chunk in chunks]
    largest = link.Job(frames * max(c.stop - c.start for c in chunks), height, width)
    form = decode_form(request, conn, largest)
    jobs = [
        _job(
            conn,
            partial(decode_request, part, form, request.tile_size),
            partial(_read_image, form=form, preset=chosen, latent_shape=list(part.shape)),
            partial(pixel_receiver, chosen, list(part.shape)) if form.pixels else None,
        )
        for part in parts
    ]
    return _run(jobs, run)


def decode_form(request: NodeRequest, conn: Connection, job: link.Job) -> DecodeForm:
    """What `auto` and `near-lossless` resolve to for this run: raw uint8 where the link rule (remote/link.py)
    says compressing is a loss or the servers do not offer the codec (Hugging Face endpoints never get
    one), else the codec; and the server model's dtype for the upload when known, packed where the
    servers unpack it and the link rule says it pays."""
    transfer = request.transfer
    endpoints = split_endpoints(conn.url)
    plain = DecodeForm(transfer, upload=request.upload)
    if transfer not in ("auto", "near-lossless") or any(map(is_hugging_face, endpoints)):
        if transfer == "near-lossless":
            raise NodeInputError(_no_codec(conn.url, "h264rgb"))
        return plain
    if transfer == "auto" and not link.LINKS.compress(_origin(endpoints[0]), job, decode_threads()):
        return plain  # decided without asking the server anything
    codec: Codec = "jxl" if transfer == "auto" else "h264rgb"
    timeout = min(CONNECT_TIMEOUT, float(conn.timeout))
    models = [known_model(e, tokens=conn.tokens, timeout=timeout) for e in endpoints]
    upload = request.upload or next((m.dtype for m in models if m is not None), None)
    packed = all(
        m is not None and planes.ENCODING in m.upload_encodings for m in models
    ) and link.LINKS.pack_upload(_origin(endpoints[0]))
    if all(m is not None and codec in m.codecs for m in models):
        return DecodeForm(transfer, codec, upload, packed)
    if transfer == "near-lossless":
        for endpoint, model in zip(endpoints, models):
            if model is None:  # the look-up failed: say why (a server that is down: the fallback runs)
                describe_model(endpoint, tokens=conn.tokens, timeout=timeout)
        raise NodeInputError(_no_codec(conn.url, codec))
    return DecodeForm(transfer, upload=upload, packed=packed)


def _no_codec(url: str, codec: Codec) -> str:
    return (
        f"transfer 'near-lossless' needs a remote-vae server that offers the {codec} codec; {url} does not "
        "(it needs PyAV with libx264rgb there): pick auto or lossless"
    )


def _origin(endpoint: str) -> str:
    try:
        return origin_of(endpoint)
    except TokenError:
        return endpoint


def _read_image(reply: Reply, form: DecodeForm, preset: Preset, latent_shape: list[int]) -> torch.Tensor:
    """The IMAGE of one reply; a pixel answer's measurements go to its Transfer and, raw or lossless (what
    `auto` chooses between), to the link rule: a near-lossless answer's rate is its encoder's, and its
    costs are not the lossless codec's."""
    image = image_from_reply(reply, form.transfer, preset, latent_shape)
    if reply.receiver is None:
        return image
    received, transfer = reply.receiver.received, reply.transfer
    frames, height, width = image.shape[0], image.shape[1], image.shape[2]
    job = link.Job(frames, height, width)
    transfer.pixel_bytes, transfer.codec = job.raw_bytes, received.codec
    lossless = received.codec in LOSSLESS_CODECS
    if received.codec is not None and not lossless:
        return image
    stats = received.server_stats or {}
    threads = stats.get("encode_threads")
    sample = link.Sample(
        raw_bytes=job.raw_bytes,
        wire_bytes=transfer.bytes_received,
        receive_seconds=transfer.receive_seconds or 0.0,
        megapixels=job.megapixels,
        compressed=lossless,
        encode_seconds=stats.get("encode_seconds") if lossless else None,
        encode_threads=int(threads) if lossless and threads else None,
        decode_seconds=received.decode_seconds if lossless else None,
    )
    link.LINKS.record(_origin(transfer.endpoint), sample)
    return image


# --------------------------------------------------------------------------- encode


def encode_image(pixels: torch.Tensor, request: NodeRequest, run: RunOptions = RunOptions()) -> Outcome:
    """Encode IMAGE pixels remotely into raw LATENT samples (the posterior mode), as VAEEncode would."""
    if pixels.ndim != 4 or pixels.shape[-1] < 3:
        raise NodeInputError(f"IMAGE of shape {list(pixels.shape)} is not [B,H,W,3] (or 4 with alpha)")
    transfer = request.transfer
    _check_transfer(transfer, TRANSFER_ENCODE)
    request = with_server_model(request, "encode")
    chosen = request.model or encode_preset(request.preset, has_endpoint=request.has_endpoint)
    conn = Connection.for_request(request, chosen, "encode", run)
    multiple = chosen.spatial_compression if chosen else SMALLEST_COMPRESSION
    pixels = crop_pixels(pixels[:, :, :, :3], multiple)
    if pixels.shape[1] == 0 or pixels.shape[2] == 0:
        raise NodeInputError(
            f"the image is smaller than {multiple} pixels, the VAE's compression: nothing to encode"
        )
    as_video = frames_are_time(chosen)
    one_frame = chosen is not None and chosen.still_image
    as_png = transfer == "lossless" and is_hugging_face(conn.url) and not as_video
    batch, height, width = pixels.shape[0], pixels.shape[1], pixels.shape[2]
    if as_video:
        chunks = [slice(0, batch)]
    else:
        one_each = one_frame or as_png
        chunks = plan_chunks(batch, height * width, run.pixel_budget, max_items=1 if one_each else None)
    parts = [pixels[chunk] for chunk in chunks]
    jobs = [
        _job(
            conn,
            partial(encode_request, part, transfer, as_video, as_png, request.tile_size),
            partial(
                latent_from_reply,
                preset=chosen,
                pixel_shape=list(part.shape),
                as_video=as_video,
                one_frame=one_frame,
            ),
        )
        for part in parts
    ]
    return _run(jobs, run)


# --------------------------------------------------------------------------- audio (a Remote VAE Loader's VAE)


def decode_audio(
    samples: torch.Tensor, request: NodeRequest, channels: int, run: RunOptions = RunOptions()
) -> Outcome:
    """Audio latents -> audio [B,channels,samples] (float32, raw), one request per item."""
    return _per_item(
        samples, request, run, "decode",
        build=lambda item: decode_request(item, "exact", request.tile_size),
        read=lambda reply, shape: audio_from_reply(reply, channels, shape),
    )  # fmt: skip


def encode_audio(waveform: torch.Tensor, request: NodeRequest, run: RunOptions = RunOptions()) -> Outcome:
    """Audio [B,channels,samples] -> its latents (float32), one request per item."""
    channels = _described(request).latent_channels
    return _per_item(
        waveform, request, run, "encode",
        build=lambda item: audio_request(item, request.tile_size),
        read=lambda reply, shape: audio_latent_from_reply(reply, channels, shape),
    )  # fmt: skip


def _per_item(
    items: torch.Tensor,
    request: NodeRequest,
    run: RunOptions,
    operation: protocol.Operation,
    build: Callable[[torch.Tensor], protocol.WireRequest],
    read: Callable[[Reply, list[int]], torch.Tensor],
) -> Outcome:
    conn = Connection.for_request(request, _described(request), operation, run)
    parts = [items[i : i + 1] for i in range(items.shape[0])]
    return _run(
        [_job(conn, partial(build, part), partial(read, shape=list(part.shape))) for part in parts], run
    )


def _described(request: NodeRequest) -> Preset:
    if request.model is None:
        raise NodeInputError("audio is sent only to a model its server has described: use Remote VAE Loader")
    return request.model


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
    except RemoteVAECancelled:
        comfy_runtime.raise_interrupt()
        raise
    except RemoteVAEError as err:
        if local is None:
            raise
        report_warning(node_id, f"Remote VAE {what} failed, used the connected VAE locally instead: {err}")
        return local()
    report_transfer(node_id, outcome.transfers, outcome.seconds)
    return outcome.value


def decode_node(node_id: str | None, samples: dict, vae, request: NodeRequest) -> torch.Tensor:
    """RemoteVAEDecode / RemoteVideoDecode: LATENT dict -> IMAGE (other LATENT keys do not matter here)."""
    latent = samples["samples"]
    return run_node(
        node_id,
        lambda: decode_latent(latent, request, RunOptions(node_id=node_id)),
        None if vae is None else lambda: local_decode(vae, latent),
        "decode",
    )


def encode_node(node_id: str | None, pixels: torch.Tensor, vae, request: NodeRequest) -> dict:
    """RemoteVAEEncode: IMAGE -> LATENT dict."""
    latent = run_node(
        node_id,
        lambda: encode_image(pixels, request, RunOptions(node_id=node_id)),
        None if vae is None else lambda: local_encode(vae, pixels),
        "encode",
    )
    return {"samples": latent}
