"""The HTTP client: diffusers' `remote_decode` / `remote_encode`, made robust.

Requests are built only by `protocol`, so what goes on the wire is byte-identical to what diffusers
sends. Around that exchange this module adds what diffusers lacks: connect and read timeouts,
retries with exponential back-off (honouring `Retry-After`), an optional bearer token, cancellation,
progress reports, validation of every response, and errors that say what went wrong and what to do.
"""

from __future__ import annotations

import email.utils
import html
import io
import json
import logging
import os
import queue
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import requests
import torch
import urllib3
from PIL import Image
from requests.structures import CaseInsensitiveDict

from . import protocol
from .endpoints import pool_for, split_endpoints

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT: tuple[float, float] = (10.0, 300.0)  # (connect, read) seconds
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF = 0.5
MAX_BACKOFF = 30.0  # cap of backoff * 2**attempt
MAX_RETRY_AFTER = 60.0  # cap of a server's Retry-After
POLL_INTERVAL = 0.1  # how often cancel() is polled while waiting (the brief asks for <= 0.25 s)
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_MESSAGE_CHARS = 500
MAX_ERROR_BODY = 1 << 20  # read at most this much of an error page
CHUNK = 1 << 16

Progress = Callable[[int, int, int, "int | None"], None]
Cancel = Callable[[], bool]


# --------------------------------------------------------------------------- errors and results


class RemoteVAEError(RuntimeError):
    """Every failure the client raises: which endpoint, what it answered, and what to do."""

    def __init__(
        self,
        endpoint: str,
        problem: str,
        *,
        status: int | None = None,
        server_message: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.status = status
        self.server_message = server_message
        self.hint = hint
        text = f"{endpoint} {problem}"
        super().__init__(f"{text} (hint: {hint})" if hint else text)


class RemoteVAETimeout(RemoteVAEError):
    """The server did not connect or answer within the timeout."""


class RemoteVAECancelled(RemoteVAEError):
    """`cancel()` returned True while the request was under way."""


@dataclass
class Transfer:
    """Statistics of one completed exchange (seconds and attempts include retries and back-off)."""

    endpoint: str
    status: int
    bytes_sent: int
    bytes_received: int
    seconds: float
    attempts: int
    server: str | None = None
    request_id: str | None = None


@dataclass
class Reply:
    """A 2xx answer: its body, its headers (case-insensitive) and how the exchange went."""

    body: bytes
    headers: Mapping[str, str]
    transfer: Transfer

    def tensor(self) -> torch.Tensor:
        """The body as a tensor; `shape`/`dtype` headers and the body length must agree."""
        try:
            return protocol.parse_tensor_response(self.body, self.headers)
        except protocol.ProtocolError as exc:
            raise self._bad_body(f"a bad tensor: {exc}") from None

    def _bad_body(self, what: str) -> RemoteVAEError:
        status = self.transfer.status
        return RemoteVAEError(
            self.transfer.endpoint,
            f"answered {status} with {what}",
            status=status,
            hint="the server does not speak the remote-VAE protocol for this request; check the endpoint URL",
        )


# --------------------------------------------------------------------------- sessions, tokens, URLs

_local = threading.local()


def thread_session() -> requests.Session:
    """One pooled keep-alive session per thread (sessions are not meant to be shared across threads)."""
    session = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
    return session


def resolve_token(token: str | None, token_env: str | None) -> str | None:
    if token is None and token_env:
        token = os.environ.get(token_env)
    token = (token or "").strip()
    return token or None


def display_url(endpoint: str) -> str:
    """The endpoint as errors show it: no query string, no password."""
    parts = urlsplit(endpoint)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username}:***@{netloc.rsplit('@', 1)[1]}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _server_root(endpoint: str) -> str:
    parts = urlsplit(endpoint)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def _split_timeout(
    timeout: float | tuple[float, float], cold_start_timeout: int | None
) -> tuple[float, float]:
    connect, read = timeout if isinstance(timeout, tuple) else (timeout, timeout)
    if connect is None or read is None or connect <= 0 or read <= 0:
        raise ValueError(
            f"timeout={timeout!r}: both the connect and the read timeout must be positive seconds"
        )
    if cold_start_timeout:
        # The gateway holds the request while the endpoint scales up: wait at least that long for it.
        read = max(float(read), float(cold_start_timeout))
    return float(connect), float(read)


# --------------------------------------------------------------------------- error messages

_HTML_DROP = re.compile(r"<(script|style)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_HTML_TAG = re.compile(r"<[^>]*>")


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"


def server_message(body: bytes) -> str | None:
    """The server's own words: JSON `error`/`message`/`detail`, else the text with HTML tags stripped."""
    text = body.decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        for key in ("error", "message", "detail"):
            if key in data:
                value = data[key]
                return _clip(value if isinstance(value, str) else json.dumps(value))
    if data is None:
        text = html.unescape(_HTML_TAG.sub(" ", _HTML_DROP.sub(" ", text)))
    return _clip(text) or None


def status_hint(status: int, token_sent: bool, token_env: str | None) -> str | None:
    if status in (401, 403):
        if token_sent:
            return "the server refused the token; check that it is the one the server was started with"
        where = f" or set ${token_env}" if token_env else ""
        return f"the server wants a token: pass token=...{where}"
    hints = {
        404: "wrong URL or model name: check the endpoint (e.g. http://host:8190/<model>); "
        "the published Hugging Face endpoints may have been retired",
        408: "the server gave up reading the request; check the network or send less at once",
        413: "the request is too large for the server: send fewer or smaller latents at once, "
        "or raise the server's size limit",
        429: "the server is busy; retry later or send fewer requests at once",
        500: "the server failed while processing the request; its log says why",
        502: "a proxy in front of the server got no valid answer; the server may be down or restarting",
        503: "the endpoint is busy, down or scaled to zero; wait and retry, or pass cold_start_timeout=... "
        "to wait for it to scale up",
        504: "a proxy in front of the server timed out; the server may be overloaded, or raise its timeout",
    }
    return hints.get(status)


def _redact(text: str | None, token: str | None) -> str | None:
    if text is None or not token:
        return text
    return text.replace(token, "***")


# --------------------------------------------------------------------------- one HTTP exchange


class _Aborted(Exception):
    """Raised inside the worker thread to stop an upload or download after a cancel."""


class _UploadBody(io.BytesIO):
    """The request body as a sized file: requests keeps Content-Length, and each read reports progress."""

    def __init__(self, data: bytes, abort: threading.Event, report: Callable[[int], None]) -> None:
        super().__init__(data)
        self._abort = abort
        self._report = report

    def read(self, size: int | None = -1) -> bytes:
        if self._abort.is_set():
            raise _Aborted()
        chunk = super().read(size)
        self._report(self.tell())
        return chunk


@dataclass
class _Answer:
    status: int
    reason: str
    headers: CaseInsensitiveDict
    body: bytes
    bytes_sent: int
    bytes_received: int


@dataclass
class _Exchange:
    """Everything one attempt needs; `run` executes in a worker thread."""

    session: requests.Session
    url: str
    params: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes
    timeout: tuple[float, float]
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    abort: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        try:
            self.events.put(("done", self._post()))
        except BaseException as exc:  # handed to the waiting thread, which decides what it means
            self.events.put(("error", exc))

    def _post(self) -> _Answer:
        total = len(self.body)
        sent = 0

        def uploaded(count: int) -> None:
            nonlocal sent
            sent = count
            self.events.put(("progress", (sent, total, 0, None)))

        # An empty stream would switch requests to chunked encoding; plain bytes keep Content-Length: 0.
        data = _UploadBody(self.body, self.abort, uploaded) if self.body else b""
        response = self.session.post(
            self.url, params=self.params, data=data, headers=self.headers, timeout=self.timeout, stream=True
        )
        try:
            return self._receive(response, total)
        finally:
            response.close()

    def _receive(self, response: requests.Response, total: int) -> _Answer:
        ok = 200 <= response.status_code < 300
        length = response.headers.get("content-length")
        expected = int(length) if length and length.isdigit() else None
        chunks: list[bytes] = []
        got = 0
        self.events.put(("progress", (total, total, 0, expected)))
        try:
            for chunk in _body_chunks(response.raw):
                if self.abort.is_set():
                    raise _Aborted()
                chunks.append(chunk)
                got += len(chunk)
                wire = response.raw.tell() or got  # compressed bytes on the wire, when compressed
                self.events.put(("progress", (total, total, wire, expected)))
                if not ok and got >= MAX_ERROR_BODY:
                    break
        except urllib3.exceptions.ReadTimeoutError as exc:
            raise requests.ReadTimeout(str(exc)) from None
        except (urllib3.exceptions.ProtocolError, urllib3.exceptions.DecodeError) as exc:
            raise requests.ConnectionError(f"the answer was cut off: {exc}") from None
        return _Answer(
            status=response.status_code,
            reason=response.reason or "",
            headers=CaseInsensitiveDict(response.headers),
            body=b"".join(chunks),
            bytes_sent=total,
            bytes_received=response.raw.tell() or got,
        )


def _body_chunks(raw: Any) -> Iterator[bytes]:
    """The decoded body as it arrives (read1: whatever is there, so progress and cancel stay live)."""
    read1 = getattr(raw, "read1", None)  # urllib3 >= 2.3; older versions block until a chunk is full
    if read1 is None:
        yield from raw.stream(CHUNK // 4, decode_content=True)
        return
    while chunk := read1(CHUNK, decode_content=True):
        yield chunk


def _wait(exchange: _Exchange, progress: Progress | None, cancel: Cancel | None, endpoint: str) -> _Answer:
    """Run the exchange in a daemon thread; poll `cancel` and forward progress from this thread."""
    threading.Thread(target=exchange.run, name="remote-vae-http", daemon=True).start()
    while True:
        latest = None
        outcome = None
        try:
            kind, value = exchange.events.get(timeout=POLL_INTERVAL)
            while True:  # drain: report only the newest progress
                if kind == "progress":
                    latest = value
                else:
                    outcome = (kind, value)
                    break
                kind, value = exchange.events.get_nowait()
        except queue.Empty:
            pass
        if latest is not None and progress is not None:
            progress(*latest)
        if outcome is not None:
            kind, value = outcome
            if kind == "error":
                raise value
            return value
        if cancel is not None and cancel():
            exchange.abort.set()  # stops the upload/download; a stalled server is simply abandoned
            raise RemoteVAECancelled(endpoint, "request was cancelled")


def _raise_if_cancelled(cancel: Cancel | None, endpoint: str) -> None:
    if cancel is not None and cancel():
        raise RemoteVAECancelled(endpoint, "request was cancelled")


def _sleep(seconds: float, cancel: Cancel | None, endpoint: str) -> None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        _raise_if_cancelled(cancel, endpoint)
        time.sleep(min(left, POLL_INTERVAL))
    _raise_if_cancelled(cancel, endpoint)


def retry_after_seconds(value: str | None) -> float | None:
    """`Retry-After` as seconds (delta-seconds or an HTTP date), capped at MAX_RETRY_AFTER."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def backoff_seconds(backoff: float, attempt: int) -> float:
    """Delay before retry number `attempt + 1` (attempt counts from 0)."""
    return min(backoff * 2**attempt, MAX_BACKOFF)


# --------------------------------------------------------------------------- send


def send(
    endpoint: str | Sequence[str],
    wire: protocol.WireRequest,
    *,
    timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
    token: str | None = None,
    token_env: str | None = "REMOTE_VAE_TOKEN",
    cold_start_timeout: int | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    session: requests.Session | None = None,
) -> Reply:
    """POST `wire` to `endpoint` and return the 2xx reply; see `send_one` for retries and errors.

    `endpoint` may name several servers hosting the same model (a list, or one string separated by
    commas or spaces): each request goes to the one with the fewest requests outstanding, and when
    it cannot be reached or answers a retryable status the request fails over to the next one.
    """
    options = dict(
        timeout=timeout, backoff=backoff, token=token, token_env=token_env,
        cold_start_timeout=cold_start_timeout, progress=progress, cancel=cancel, session=session,
    )  # fmt: skip
    candidates = split_endpoints(endpoint)
    if len(candidates) <= 1:
        return send_one(candidates[0] if candidates else "", wire, retries=retries, **options)
    pool = pool_for(candidates)
    tried: list[str] = []
    failures: list[RemoteVAEError] = []
    while (chosen := pool.acquire(exclude=tried)) is not None:
        last = len(tried) == len(candidates) - 1
        failed = False
        try:
            return send_one(chosen, wire, retries=retries if last else 0, **options)
        except RemoteVAECancelled:
            raise
        except RemoteVAEError as exc:
            if exc.status is not None and exc.status not in RETRY_STATUSES:
                raise  # the request itself is wrong: another server would say the same
            failed = True
            tried.append(chosen)
            failures.append(exc)
            if not last:
                log.warning("%s; failing over to the next endpoint", exc)
        finally:
            pool.release(chosen, failed=failed)
    raise RemoteVAEError(
        ", ".join(display_url(e) for e in candidates),
        f"all {len(candidates)} endpoints failed: " + "; ".join(str(f) for f in failures),
        status=failures[-1].status,
        server_message=failures[-1].server_message,
        hint="are the servers running and reachable?",
    )


def send_one(
    endpoint: str,
    wire: protocol.WireRequest,
    *,
    timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
    token: str | None = None,
    token_env: str | None = "REMOTE_VAE_TOKEN",
    cold_start_timeout: int | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    session: requests.Session | None = None,
) -> Reply:
    """POST `wire` to `endpoint` and return the 2xx reply, retrying what is worth retrying.

    Connection errors and HTTP 408/429/500/502/503/504 are retried up to `retries` times, waiting
    `Retry-After` when the server gives one, else `backoff * 2**attempt` (both capped). Read timeouts
    are not retried (the server got the request and may still be working on it). Any other status
    raises at once. `progress(bytes_sent, total_to_send, bytes_received, total_to_receive_or_None)`
    is called from this thread; `cancel()` is polled every POLL_INTERVAL seconds while waiting.
    """
    where = display_url(endpoint)
    connect_timeout, read_timeout = _split_timeout(timeout, cold_start_timeout)
    token = resolve_token(token, token_env)
    headers = dict(wire.headers)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if cold_start_timeout:
        headers["X-Scale-Up-Timeout"] = str(int(cold_start_timeout))
    session = session or thread_session()
    started = time.monotonic()
    for attempt in range(retries + 1):
        _raise_if_cancelled(cancel, where)
        exchange = _Exchange(
            session, endpoint, wire.params, headers, wire.body, (connect_timeout, read_timeout)
        )
        try:
            answer = _wait(exchange, progress, cancel, where)
        except requests.ConnectTimeout:
            error: RemoteVAEError = RemoteVAETimeout(
                where,
                f"did not accept a connection within {connect_timeout:g} s (connect timeout)",
                hint=f"is the server running and reachable at {_server_root(endpoint)}?",
            )
            delay = backoff_seconds(backoff, attempt)
        except requests.ReadTimeout:
            raise RemoteVAETimeout(
                where,
                f"did not answer within {read_timeout:g} s (read timeout)",
                hint="the server may be overloaded or stuck; raise timeout=(connect, read) for large jobs",
            ) from None
        except requests.exceptions.SSLError as exc:
            raise RemoteVAEError(
                where,
                f"failed the TLS handshake: {_redact(str(exc), token)}",
                hint="check the https URL and certificate",
            ) from None
        except requests.ConnectionError as exc:
            error = _connection_error(where, endpoint, exc, token)
            delay = backoff_seconds(backoff, attempt)
        except (
            requests.exceptions.InvalidURL,
            requests.exceptions.MissingSchema,
            requests.exceptions.InvalidSchema,
        ):
            raise RemoteVAEError(
                where, "is not a valid URL", hint="an endpoint looks like http://host:8190/<model>"
            ) from None
        else:
            if 200 <= answer.status < 300:
                return _reply(where, answer, attempt + 1, started)
            error = _http_error(where, answer, token, token_env)
            if answer.status not in RETRY_STATUSES:
                raise error
            delay = retry_after_seconds(answer.headers.get("retry-after"))
            if delay is None:
                delay = backoff_seconds(backoff, attempt)
        if attempt == retries:
            raise error
        log.warning("%s; retry %d/%d in %.2f s", error, attempt + 1, retries, delay)
        _sleep(delay, cancel, where)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


_UNKNOWN_HOST = (
    "name or service not known",
    "nodename nor servname",
    "failed to resolve",
    "getaddrinfo failed",
)


def _connection_error(
    where: str, endpoint: str, exc: requests.ConnectionError, token: str | None
) -> RemoteVAEError:
    text = str(exc)
    lowered = text.lower()
    root = _server_root(endpoint)
    if "refused" in lowered:
        return RemoteVAEError(where, "refused the connection", hint=f"is the server running at {root}?")
    if any(marker in lowered for marker in _UNKNOWN_HOST):
        return RemoteVAEError(
            where, "could not be resolved (unknown host name)", hint="check the host name in the endpoint URL"
        )
    return RemoteVAEError(
        where,
        f"could not be reached: {_redact(_clip(text), token)}",
        hint=f"is the server running at {root}, and is the network up?",
    )


def _http_error(where: str, answer: _Answer, token: str | None, token_env: str | None) -> RemoteVAEError:
    message = _redact(server_message(answer.body), token)
    return RemoteVAEError(
        where,
        f"answered {answer.status}: {message or answer.reason or 'no message'}",
        status=answer.status,
        server_message=message,
        hint=status_hint(answer.status, token is not None, token_env),
    )


def _reply(where: str, answer: _Answer, attempts: int, started: float) -> Reply:
    transfer = Transfer(
        endpoint=where,
        status=answer.status,
        bytes_sent=answer.bytes_sent,
        bytes_received=answer.bytes_received,
        seconds=time.monotonic() - started,
        attempts=attempts,
        server=answer.headers.get("server"),
        request_id=answer.headers.get("x-request-id"),
    )
    return Reply(answer.body, answer.headers, transfer)


# --------------------------------------------------------------------------- response checks


def _check_shape(
    reply: Reply, tensor: torch.Tensor, expected_shape: Sequence[int | None] | None
) -> torch.Tensor:
    """`expected_shape` entries that are None (or -1) match any size."""
    if expected_shape is None:
        return tensor
    want = list(expected_shape)
    got = list(tensor.shape)
    if len(want) != len(got) or any(w not in (None, -1) and w != g for w, g in zip(want, got)):
        raise reply._bad_body(f"a tensor of shape {got}, expected {want}")
    return tensor


def _open_image(reply: Reply) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(reply.body)).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        head = reply.body[:16]
        raise reply._bad_body(
            f"a body that is not an image ({len(reply.body)} bytes starting {head!r}): {exc}"
        ) from None
    image.format = _image_type(reply.body)
    return image


def _image_type(data: bytes) -> str:
    """The lowercase format name diffusers writes into `image.format`."""
    if data.startswith(protocol.JPEG_MAGIC):
        return "jpeg"
    if data.startswith(protocol.PNG_MAGIC):
        return "png"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if data.startswith(b"BM"):
        return "bmp"
    return "unknown"


def _check_mp4(reply: Reply) -> bytes:
    if len(reply.body) < 8 or reply.body[4:8] != b"ftyp":
        raise reply._bad_body(
            f"a body that is not an MP4 file ({len(reply.body)} bytes, no ISO-BMFF `ftyp` box at the start)"
        )
    return reply.body


def _frames(reply: Reply, tensor: torch.Tensor) -> list[Image.Image]:
    """A uint8 [N,H,W,C] tensor (server-side partial post-processing) as one PIL image per row."""
    if tensor.dtype != torch.uint8 or tensor.ndim != 4 or tensor.shape[-1] not in (3, 4):
        raise reply._bad_body(
            f"a {protocol.dtype_name(tensor.dtype)} tensor of shape {list(tensor.shape)}; "
            "partial_postprocess=True should give uint8 [N,H,W,3]"
        )
    return [Image.fromarray(image.numpy()) for image in tensor]


def _unit_frames(reply: Reply, tensor: torch.Tensor) -> list[Image.Image]:
    """A float [F,3,H,W] tensor in 0..1 (output_type="pil" with a processor) as PIL frames."""
    if tensor.ndim != 4 or not tensor.is_floating_point():
        raise reply._bad_body(
            f"a {protocol.dtype_name(tensor.dtype)} tensor of shape {list(tensor.shape)}; "
            "output_type='pil' with a processor should give float [F,3,H,W] in 0..1"
        )
    pixels = (tensor.permute(0, 2, 3, 1).float().numpy() * 255).round()
    # diffusers casts without clipping; clipping changes nothing for in-range values and avoids wrap-around.
    return [Image.fromarray(frame) for frame in np.clip(pixels, 0, 255).astype("uint8")]


# --------------------------------------------------------------------------- diffusers-compatible API


def _warn_base64(name: str, value: str) -> None:
    if value == "base64":
        warnings.warn(f"{name}='base64' is deprecated. Using `binary`.", FutureWarning, stacklevel=3)
    elif value != "binary":
        raise ValueError(f"{name}={value!r} is not supported; use 'binary'")


def _check_decode_inputs(
    tensor: Any,
    processor: Any,
    output_type: str,
    return_type: str,
    partial_postprocess: bool,
    height: int | None,
    width: int | None,
) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if return_type not in protocol.OUTPUT_TYPES:
        raise ValueError(f"return_type={return_type!r} is not one of {', '.join(protocol.OUTPUT_TYPES)}")
    if tensor.ndim == 3 and (height is None or width is None):
        raise ValueError(
            f"`height` and `width` required for packed latents: a 3-D latent of shape {list(tensor.shape)} "
            "needs the image size in pixels"
        )
    if (
        output_type == "pt"
        and return_type == "pil"
        and not partial_postprocess
        and not callable(getattr(processor, "postprocess", None))
    ):
        raise ValueError(
            "`processor` is required: output_type='pt' with return_type='pil' and partial_postprocess=False "
            "needs a VaeImageProcessor or VideoProcessor to turn the raw tensor into images "
            "(or pass partial_postprocess=True)"
        )
    if (
        return_type == "mp4"
        and output_type != "mp4"
        and not (output_type == "pt" and not partial_postprocess)
    ):
        raise ValueError(f"return_type='mp4' needs output_type='mp4' (got output_type={output_type!r})")


def remote_decode(
    endpoint: str,
    tensor: torch.Tensor,
    processor: Any = None,
    do_scaling: bool | None = True,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    output_type: str = "pil",
    return_type: str = "pil",
    image_format: str = "jpg",
    partial_postprocess: bool = False,
    input_tensor_type: str = "binary",
    output_tensor_type: str = "binary",
    height: int | None = None,
    width: int | None = None,
    *,
    timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
    token: str | None = None,
    token_env: str | None = "REMOTE_VAE_TOKEN",
    cold_start_timeout: int | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    session: requests.Session | None = None,
    extensions: protocol.Extensions | None = None,
    expected_shape: Sequence[int | None] | None = None,
) -> Image.Image | list[Image.Image] | bytes | torch.Tensor:
    """Decode latents on a remote VAE; a drop-in for `diffusers.utils.remote_utils.remote_decode`.

    The positional arguments are diffusers' (same names, order and defaults), the request on the wire
    is the same, and so is the result wherever diffusers returns one:

    - output_type="pil", no processor, return_type="pil": a PIL RGB image whose `.format` is the
      lowercase sniffed type ("jpeg", "png", ...).
    - output_type="pil" with a processor (the video flag): return_type="pil" gives a list of PIL
      frames, return_type="pt" the tensor as received.
    - output_type="pt", partial_postprocess=True: return_type="pil" gives PIL images (a single image
      when there is one), return_type="pt" the uint8 [N,H,W,3] tensor.
    - output_type="pt", partial_postprocess=False: the raw tensor, or with a processor and
      return_type="pil" (or "mp4", as diffusers) `processor.postprocess(...)[0]`
      (`postprocess_video` for a video processor: a list of frames).
    - output_type="mp4", return_type="mp4": the MP4 bytes.

    Where diffusers crashes after the round trip, this does the obvious thing instead:

    - output_type="mp4" with return_type "pil" or "pt" (diffusers' own mp4 examples): the MP4 bytes.
    - output_type="pil", no processor, return_type="pt": the received image as a uint8 [1,H,W,3] tensor.
    - return_type="mp4" with output_type "pil", or "pt" with partial_postprocess=True: ValueError
      before anything is sent (there is no video to return).

    diffusers' input checks stay ValueErrors; a 3-D (packed) latent needs both `height` and
    `width` (diffusers only complains when both are missing, then sends neither). `input_tensor_type`
    / `output_tensor_type` "base64" warn and use binary, like diffusers. Unlike diffusers this warns
    about nothing for `do_scaling=True` without `scaling_factor` (it asks the server for its own VAE
    config, which our server supports).

    Keyword-only options: `timeout` (connect, read) seconds, `retries`/`backoff`, bearer `token`
    (else the env var named by `token_env`), `cold_start_timeout` (sent as X-Scale-Up-Timeout),
    `progress`, `cancel`, `session` (see `send`), `extensions` (our optional query parameters,
    appended after diffusers' ones) and `expected_shape` (checked against a tensor response;
    None or -1 entries match anything). Every failure raises RemoteVAEError.
    """
    _warn_base64("input_tensor_type", input_tensor_type)
    _warn_base64("output_tensor_type", output_tensor_type)
    _check_decode_inputs(tensor, processor, output_type, return_type, partial_postprocess, height, width)
    wire = protocol.build_decode_request(
        tensor,
        output_type=output_type,
        image_format=image_format,
        partial_postprocess=partial_postprocess,
        do_scaling=do_scaling,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        height=height,
        width=width,
        processor_flag=processor is not None,
        extensions=extensions,
    )
    reply = send(
        endpoint,
        wire,
        timeout=timeout,
        retries=retries,
        backoff=backoff,
        token=token,
        token_env=token_env,
        cold_start_timeout=cold_start_timeout,
        progress=progress,
        cancel=cancel,
        session=session,
    )
    if output_type == "mp4":
        return _check_mp4(reply)
    if output_type == "pil" and processor is None:
        image = _open_image(reply)
        if return_type == "pt":
            return torch.from_numpy(np.array(image)).unsqueeze(0)
        return image
    output = _check_shape(reply, reply.tensor(), expected_shape)
    if return_type == "pt":
        return output
    if output_type == "pil":  # with a processor: float frames in 0..1
        return _unit_frames(reply, output)
    if partial_postprocess:
        images = _frames(reply, output)
        return images[0] if len(images) == 1 else images
    if processor is None:  # return_type="mp4" without processor: diffusers returns the tensor
        return output
    if callable(getattr(processor, "postprocess_video", None)):
        return processor.postprocess_video(output, output_type="pil")[0]
    return processor.postprocess(output, output_type="pil")[0]


def remote_encode(
    endpoint: str,
    image: torch.Tensor | Image.Image,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    *,
    timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
    token: str | None = None,
    token_env: str | None = "REMOTE_VAE_TOKEN",
    cold_start_timeout: int | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    session: requests.Session | None = None,
    extensions: protocol.Extensions | None = None,
    expected_shape: Sequence[int | None] | None = None,
) -> torch.Tensor:
    """Encode an image on a remote VAE; a drop-in for `diffusers.utils.remote_utils.remote_encode`.

    A PIL image is sent as PNG exactly like diffusers; a tensor is sent raw with `shape`/`dtype`.
    Returns the latent tensor the server answers with (checked against `expected_shape` if given).
    Keyword-only options as in `remote_decode`.
    """
    if isinstance(image, torch.Tensor):
        payload: torch.Tensor | bytes = image
    elif isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        payload = buffer.getvalue()
    else:
        raise TypeError(f"image must be a PIL image or a torch.Tensor, got {type(image).__name__}")
    wire = protocol.build_encode_request(
        payload, scaling_factor=scaling_factor, shift_factor=shift_factor, extensions=extensions
    )
    reply = send(
        endpoint,
        wire,
        timeout=timeout,
        retries=retries,
        backoff=backoff,
        token=token,
        token_env=token_env,
        cold_start_timeout=cold_start_timeout,
        progress=progress,
        cancel=cancel,
        session=session,
    )
    return _check_shape(reply, reply.tensor(), expected_shape)
