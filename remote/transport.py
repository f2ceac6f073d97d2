"""One request to one endpoint: timeouts, retries with back-off and Retry-After, cancel and progress.

Requests are built only by `protocol` and sent as they are, so what goes on the wire is byte-identical
to what diffusers sends. Around that exchange this module adds what diffusers lacks: connect and read
timeouts, retries with exponential back-off (honouring `Retry-After`), an optional bearer token,
cancellation, progress reports, and errors that say what went wrong and what to do.
"""

from __future__ import annotations

import email.utils
import io
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypedDict

import requests
import urllib3
from requests.structures import CaseInsensitiveDict

from . import protocol
from .errors import (
    RemoteVAECancelled,
    RemoteVAEError,
    RemoteVAETimeout,
    clip,
    display_url,
    redact,
    server_message,
    server_root,
    status_hint,
)
from .reply import Reply, Transfer
from .tokens import TokenError, TokenStore, check_token, how_to_bind, origin_of

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT: tuple[float, float] = (10.0, 300.0)  # (connect, read) seconds
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF = 0.5
MAX_BACKOFF = 30.0  # cap of backoff * 2**attempt
MAX_RETRY_AFTER = 60.0  # cap of a server's Retry-After
POLL_INTERVAL = 0.1  # how often cancel() is polled while waiting (the brief asks for <= 0.25 s)
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_ERROR_BODY = 1 << 20  # read at most this much of an error page
CHUNK = 1 << 16

Progress = Callable[[int, int, int, "int | None"], None]
Cancel = Callable[[], bool]


class TransportOptions(TypedDict, total=False):
    """How to send: the keyword-only options `send`, `remote_decode` and `remote_encode` share.

    `timeout`: (connect, read) seconds, or one number for both (default DEFAULT_TIMEOUT).
    `retries` / `backoff`: how often and how soon to retry (see `send_one`).
    `token`: a bearer token for this call; else the one bound to the endpoint's origin in `tokens`
    (default: `TokenStore.load()`, the local configuration; see remote/tokens.py). Neither travels over
    plain http to another machine unless that origin is allowed explicitly.
    `cold_start_timeout`: sent as X-Scale-Up-Timeout; the read timeout is at least this long.
    `progress(bytes_sent, total_to_send, bytes_received, total_to_receive_or_None)` and `cancel()`:
    called from the calling thread. `session`: a requests.Session (default: one per thread).
    """

    timeout: float | tuple[float, float]
    retries: int
    backoff: float
    token: str | None
    tokens: TokenStore | None
    cold_start_timeout: int | None
    progress: Progress | None
    cancel: Cancel | None
    session: requests.Session | None


def check_options(options: Mapping[str, Any]) -> None:
    """A TypeError for a misspelt option, as a keyword-only parameter would give."""
    known = TransportOptions.__annotations__
    for name in options:
        if name not in known:
            raise TypeError(f"unexpected keyword argument {name!r}; the options are: {', '.join(known)}")


# --------------------------------------------------------------------------- sessions, tokens, timeouts

_local = threading.local()


def thread_session() -> requests.Session:
    """One pooled keep-alive session per thread (sessions are not meant to be shared across threads)."""
    session = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
    return session


def authorization(endpoint: str, where: str, options: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The token this request carries and, when none does, advice for a 401.

    An explicit `token` goes where the caller sends it, except over plain http to another machine; else
    the token bound to the endpoint's origin in the local configuration, if any.
    """
    try:
        store = options.get("tokens") or TokenStore.load()
        explicit = options.get("token")
        if explicit is None:
            token = store.token_for(endpoint)
            return token, None if token else (store.withheld(endpoint) or how_to_bind(endpoint))
        token = check_token(explicit, origin_of(endpoint))
    except TokenError as exc:
        raise RemoteVAEError(where, f"was not sent: {exc}", hint="fix the token configuration") from None
    refusal = store.plain_http_refusal(endpoint)
    if refusal:
        raise RemoteVAEError(where, "was not sent its token", hint=refusal)
    return token, None


def split_timeout(
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


# --------------------------------------------------------------------------- retries


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


def send_one(endpoint: str, wire: protocol.WireRequest, **options: Unpack[TransportOptions]) -> Reply:
    """POST `wire` to `endpoint` and return the 2xx reply, retrying what is worth retrying.

    Connection errors and HTTP 408/429/500/502/503/504 are retried up to `retries` times, waiting
    `Retry-After` when the server gives one, else `backoff * 2**attempt` (both capped). Read timeouts
    are not retried (the server got the request and may still be working on it). Any other status
    raises at once. `progress(bytes_sent, total_to_send, bytes_received, total_to_receive_or_None)`
    is called from this thread; `cancel()` is polled every POLL_INTERVAL seconds while waiting.
    """
    where = display_url(endpoint)
    cold_start_timeout = options.get("cold_start_timeout")
    connect_timeout, read_timeout = split_timeout(options.get("timeout", DEFAULT_TIMEOUT), cold_start_timeout)
    retries = options.get("retries", DEFAULT_RETRIES)
    backoff = options.get("backoff", DEFAULT_BACKOFF)
    token, token_advice = authorization(endpoint, where, options)
    progress, cancel = options.get("progress"), options.get("cancel")
    headers = dict(wire.headers)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if cold_start_timeout:
        headers["X-Scale-Up-Timeout"] = str(int(cold_start_timeout))
    session = options.get("session") or thread_session()
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
                hint=f"is the server running and reachable at {server_root(endpoint)}?",
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
                f"failed the TLS handshake: {redact(str(exc), token)}",
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
            error = _http_error(where, answer, token, token_advice)
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
    root = server_root(endpoint)
    if "refused" in lowered:
        return RemoteVAEError(where, "refused the connection", hint=f"is the server running at {root}?")
    if any(marker in lowered for marker in _UNKNOWN_HOST):
        return RemoteVAEError(
            where, "could not be resolved (unknown host name)", hint="check the host name in the endpoint URL"
        )
    return RemoteVAEError(
        where,
        f"could not be reached: {redact(clip(text), token)}",
        hint=f"is the server running at {root}, and is the network up?",
    )


def _http_error(where: str, answer: _Answer, token: str | None, token_advice: str | None) -> RemoteVAEError:
    message = redact(server_message(answer.body), token)
    return RemoteVAEError(
        where,
        f"answered {answer.status}: {message or answer.reason or 'no message'}",
        status=answer.status,
        server_message=message,
        hint=status_hint(answer.status, token is not None, token_advice),
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
