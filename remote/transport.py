"""One request to one endpoint: timeouts, retries with back-off and Retry-After, cancel and progress.

Requests are built only by `protocol` and sent as they are, so what goes on the wire is byte-identical
to what diffusers sends. Around that exchange this module adds what diffusers lacks: connect and read
timeouts and a bound on the whole call, retries of what a retry can fix (with exponential back-off,
honouring `Retry-After`), an optional bearer token, cancellation, progress reports, replies refused as
soon as they grow past what the request can decode to, and errors that say what went wrong and what
to do.
"""

from __future__ import annotations

import email.utils
import io
import logging
import queue
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypedDict

import requests
import urllib3
from requests.structures import CaseInsensitiveDict

from . import protocol
from .bounds import ReplyLimits, limits_for
from .errors import (
    OWN_STATUS_HINTS,
    RemoteVAECancelled,
    RemoteVAEError,
    RemoteVAETimeout,
    clip,
    display_url,
    is_json_error,
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
POLL_INTERVAL = 0.1  # how often cancel() and the deadline are checked while waiting
# Retried whoever answers: nothing ran (408: the request did not arrive in time, often a stale keep-alive
# connection), or the answer says "come back later" (429, 503).
RETRY_STATUSES = frozenset({408, 429, 503})
# Retried only from a proxy or gateway (see `from_proxy`); from the server itself they mean its job ran
# and failed or ran out of its own time, and a retry would run it again. 500 is never retried.
PROXY_RETRY_STATUSES = frozenset({502, 504})
MAX_ERROR_BODY = 1 << 20  # read at most this much of an error page
CHUNK = 1 << 18  # the most one read hands a receiver (each read costs Python work: fewer on a fast link)
# The Content-Encodings requests' Accept-Encoding asks for (diffusers sends the same header), with their
# zlib window: undone here with a bound, never inflated whole. Any other encoding is refused.
ACCEPTED_ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}

Progress = Callable[[int, int, int, "int | None"], None]
Cancel = Callable[[], bool]


class TransportOptions(TypedDict, total=False):
    """How to send: the keyword-only options `send`, `remote_decode` and `remote_encode` share.

    `timeout`: (connect, read) seconds, or one number for both (default DEFAULT_TIMEOUT).
    `total_timeout`: seconds for the whole call, retries and back-off included (default: connect + read).
    `retries` / `backoff`: how often and how soon to retry (see `send_one`).
    `token`: a bearer token for this call; else the one bound to the endpoint's origin in `tokens`
    (default: `TokenStore.load()`, the local configuration; see remote/tokens.py). Neither travels over
    plain http to another machine unless that origin is allowed explicitly.
    `cold_start_timeout`: sent as X-Scale-Up-Timeout; the read timeout is at least this long.
    `progress(bytes_sent, total_to_send, bytes_received, total_to_receive_or_None)` and `cancel()`:
    called from the calling thread. `session`: a requests.Session (default: one per thread).
    `max_reply_bytes`: refuse a longer reply body (default: the most the request can decode to, see
    remote/bounds.py).
    `receiver(head)`: called with a 2xx answer's head (a Reply without its body) in the worker thread; what
    it returns is fed each body chunk and finished after the last one, and the Reply then carries it
    instead of the body (remote/receiving.py). Each attempt gets a new one.
    """

    timeout: float | tuple[float, float]
    total_timeout: float | None
    retries: int
    backoff: float
    token: str | None
    tokens: TokenStore | None
    cold_start_timeout: int | None
    progress: Progress | None
    cancel: Cancel | None
    session: requests.Session | None
    max_reply_bytes: int | None
    receiver: Callable[[Reply], Any] | None


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


@dataclass(frozen=True)
class Deadline:
    """The bound on a whole call: `seconds` from its start, every attempt and back-off included."""

    seconds: float
    at: float

    @classmethod
    def start(cls, seconds: float) -> Deadline:
        if not seconds > 0:
            raise ValueError(f"total_timeout={seconds!r} must be positive seconds")
        return cls(float(seconds), time.monotonic() + seconds)

    def left(self) -> float:
        return self.at - time.monotonic()

    def passed(self, where: str) -> RemoteVAETimeout:
        return RemoteVAETimeout(
            where,
            f"did not finish within {self.seconds:g} s (the total timeout of the call, retries included)",
            hint="the server is slow, stuck or trickling its answer; raise the timeout for large jobs",
        )


def deadline_for(options: Mapping[str, Any]) -> Deadline:
    """The call's deadline: `total_timeout`, else the connect plus the read timeout."""
    total = options.get("total_timeout")
    if total is None:
        total = sum(split_timeout(options.get("timeout", DEFAULT_TIMEOUT), options.get("cold_start_timeout")))
    return Deadline.start(total)


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
    limits: ReplyLimits  # what the request can decode to: the Reply checks images against it
    receive_seconds: float | None = None  # first to last body byte, less the receiver's work between
    receiver: Any = None  # what took the body, when the caller gave a `receiver`
    length: int = 0  # of the (decoded) body, kept or not


class _Inflater:
    """A Content-Encoding undone as the body arrives, never more than the caller has room for."""

    def __init__(self, encoding: str) -> None:
        self._zlib = None if encoding == "identity" else zlib.decompressobj(ACCEPTED_ENCODINGS[encoding])

    def feed(self, data: bytes, room: int) -> bytes:
        """The decoded bytes of `data`: at most `room` of them when compressed (identity: `data`)."""
        return data if self._zlib is None else self._zlib.decompress(data, room)

    @property
    def complete(self) -> bool:
        return self._zlib is None or self._zlib.eof


@dataclass
class _Exchange:
    """Everything one attempt needs; `run` executes in a worker thread."""

    session: requests.Session
    where: str
    url: str
    params: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes
    timeout: tuple[float, float]
    limits: ReplyLimits
    receiver: Callable[[Reply], Any] | None = None
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
        """Read the body as it arrives, refusing a 2xx one larger than `limits` allows as soon as it is."""
        status = response.status_code
        ok = 200 <= status < 300
        expected = _content_length(response.headers)
        encoding = protocol.content_encoding(response.headers)
        known = encoding == "identity" or encoding in ACCEPTED_ENCODINGS
        if ok and not known:
            accepted = ", ".join(ACCEPTED_ENCODINGS)
            raise self._refused(
                status, f"with Content-Encoding {encoding!r}, which was not asked for (it accepts {accepted})"
            )
        limit = self.limits.max_bytes if ok else MAX_ERROR_BODY
        if ok and encoding == "identity" and expected is not None and expected > limit:
            raise self._too_large(status, f"Content-Length {expected}", limit)
        inflater = _Inflater(encoding) if known else None  # None: an error page in an unknown encoding
        receiver = self._receiver_for(response, status, total) if ok and self.receiver else None
        chunks: list[bytes] = []
        got = wire = 0
        first = last = None
        # The receiver's own work between reads (converting, decoding) is not the link's: it is left out of
        # the receive time, or a fast link would look as slow as this machine converts.
        converting = converted = 0.0
        self.events.put(("progress", (total, total, 0, expected)))
        try:
            for chunk in _raw_chunks(response.raw):
                if self.abort.is_set():
                    raise _Aborted()
                wire += len(chunk)
                last = time.monotonic()
                first = first or last
                self.events.put(("progress", (total, total, wire, expected)))
                if inflater is None:
                    break
                try:
                    decoded = inflater.feed(chunk, limit - got + 1)
                except zlib.error as exc:
                    if not ok:
                        break  # keep what could be read of the error page
                    raise self._refused(
                        status, f"with a {encoding} body that does not decompress: {exc}"
                    ) from None
                got += len(decoded)
                if got > limit:
                    if ok:
                        raise self._too_large(status, f"more than {limit} bytes", limit)
                    break
                if receiver is None:
                    chunks.append(decoded)
                elif decoded:
                    started = time.monotonic()
                    receiver.feed(decoded)
                    converted += converting  # the previous chunk's work ran before this chunk was read
                    converting = time.monotonic() - started
        except urllib3.exceptions.ReadTimeoutError as exc:
            raise requests.ReadTimeout(str(exc)) from None
        except urllib3.exceptions.HTTPError as exc:
            raise requests.ConnectionError(f"the answer was cut off: {exc}") from None
        if ok and inflater is not None and not inflater.complete:
            raise requests.ConnectionError(f"the answer was cut off: its {encoding} stream ended early")
        if receiver is not None:
            receiver.finish()
        return _Answer(
            status=status,
            reason=response.reason or "",
            headers=CaseInsensitiveDict(response.headers),
            body=b"".join(chunks)[:limit],
            bytes_sent=total,
            bytes_received=wire,
            limits=self.limits,
            receive_seconds=None if first is None else max(0.0, last - first - converted),
            receiver=receiver,
            length=got,
        )

    def _receiver_for(self, response: requests.Response, status: int, total: int) -> Any:
        transfer = Transfer(self.where, status, total, 0, 0.0, 1)
        return self.receiver(Reply(b"", CaseInsensitiveDict(response.headers), transfer, self.limits))

    def _refused(self, status: int, problem: str) -> RemoteVAEError:
        hint = "the server or a proxy in front of it compresses answers in a way this client refuses: turn that off"
        return RemoteVAEError(self.where, f"answered {status} {problem}", status=status, hint=hint)

    def _too_large(self, status: int, size: str, limit: int) -> RemoteVAEError:
        return RemoteVAEError(
            self.where,
            f"answered {status} with {size}, more than the {limit} bytes a reply to this request can hold",
            status=status,
            hint="check the endpoint URL: a remote-VAE server answers this request with less "
            "(max_reply_bytes=... allows more)",
        )


def _content_length(headers: Mapping[str, str]) -> int | None:
    value = (headers.get("content-length") or "").strip()
    return int(value) if value.isascii() and value.isdigit() else None


def _raw_chunks(raw: Any) -> Iterator[bytes]:
    """The body as it arrives, still encoded (read1: whatever is there, so progress and cancel stay live)."""
    read1 = getattr(raw, "read1", None)  # urllib3 >= 2.3; older versions block until a chunk is full
    if read1 is None:
        yield from raw.stream(CHUNK // 4, decode_content=False)
        return
    while chunk := read1(CHUNK, decode_content=False):
        yield chunk


def _wait(
    exchange: _Exchange, progress: Progress | None, cancel: Cancel | None, deadline: Deadline
) -> _Answer:
    """Run the exchange in a daemon thread; poll `cancel` and the deadline and forward progress from this
    thread. On either the worker is told to stop at its next chunk; a stalled one is simply abandoned
    (its socket times out soon after the deadline: see `send_one`)."""
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
            exchange.abort.set()
            raise RemoteVAECancelled(exchange.where, "request was cancelled")
        if deadline.left() <= 0:
            exchange.abort.set()
            raise deadline.passed(exchange.where)


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
    asked = retry_after_asked(value)
    return None if asked is None else min(asked, MAX_RETRY_AFTER)


def retry_after_asked(value: str | None) -> float | None:
    """`Retry-After` as the seconds the server asks for (not negative, not capped); None when unreadable."""
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
    return max(seconds, 0.0)


def backoff_seconds(backoff: float, attempt: int) -> float:
    """Delay before retry number `attempt + 1` (attempt counts from 0)."""
    return min(backoff * 2**attempt, MAX_BACKOFF)


def from_proxy(headers: Mapping[str, str], body: bytes) -> bool:
    """Whether an error answer comes from a proxy or gateway in front of the server, not the server.

    A remote-VAE server answers its own errors with a JSON `{"error": ...}` body, and ours sets
    X-Request-ID on every answer; a proxy's own 502/504 (nginx, a load balancer, a cloud gateway) is an
    HTML or text page. An answer with either mark counts as the server's own.
    """
    return "x-request-id" not in headers and not is_json_error(body)


def worth_retrying(status: int, headers: Mapping[str, str], body: bytes) -> bool:
    """Whether a retry can fix this error answer: RETRY_STATUSES from anyone, PROXY_RETRY_STATUSES
    from a proxy only (the server's own 504 means its deadline passed: a retry would run the job again)."""
    return status in RETRY_STATUSES or (status in PROXY_RETRY_STATUSES and from_proxy(headers, body))


def send_one(
    endpoint: str,
    wire: protocol.WireRequest,
    *,
    deadline: Deadline | None = None,
    **options: Unpack[TransportOptions],
) -> Reply:
    """POST `wire` to `endpoint` and return the 2xx reply, retrying what a retry can fix.

    Connection errors, connect timeouts and the answers `worth_retrying` are retried up to `retries`
    times, waiting `Retry-After` when the answer gives one, else `backoff * 2**attempt` (both capped).
    Read timeouts are not retried (the server got the request and may still be working on it). Any
    other status raises at once. Nothing outlasts `deadline` (default: `total_timeout` from now): an
    attempt still running then is abandoned, and a wait that would pass it is not begun (a Retry-After
    longer than what is left is a RemoteVAETimeout at once). A 2xx body longer than `max_reply_bytes`
    (default: what the request can decode to, remote/bounds.py) is refused as it arrives.
    `progress(bytes_sent, total_to_send, bytes_received, total_to_receive_or_None)` is called from
    this thread; `cancel()` is polled every POLL_INTERVAL seconds while waiting.
    """
    where = display_url(endpoint)
    cold_start_timeout = options.get("cold_start_timeout")
    connect_timeout, read_timeout = split_timeout(options.get("timeout", DEFAULT_TIMEOUT), cold_start_timeout)
    deadline = deadline or deadline_for(options)
    limits = reply_limits(wire, options.get("max_reply_bytes"))
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
        left = deadline.left()
        if left <= 0:
            raise deadline.passed(where)
        # Every socket wait ends soon after the deadline, so an abandoned attempt does not linger.
        timeouts = (min(connect_timeout, left + 1.0), min(read_timeout, left + 1.0))
        exchange = _Exchange(
            session,
            where,
            endpoint,
            wire.params,
            headers,
            wire.body,
            timeouts,
            limits,
            options.get("receiver"),
        )
        asked = None
        try:
            answer = _wait(exchange, progress, cancel, deadline)
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
            error = connection_error(where, endpoint, exc, token)
            delay = backoff_seconds(backoff, attempt)
        except (
            requests.exceptions.InvalidURL,
            requests.exceptions.MissingSchema,
            requests.exceptions.InvalidSchema,
        ):
            raise RemoteVAEError(
                where, "is not a valid URL", hint="an endpoint looks like http://host:8190/<model>"
            ) from None
        except requests.RequestException as exc:  # the rest of what requests raises (too many redirects, ...)
            raise RemoteVAEError(where, f"failed: {redact(clip(str(exc)), token)}") from None
        else:
            if 200 <= answer.status < 300:
                return _reply(where, answer, attempt + 1, started)
            error = _http_error(where, answer, token, token_advice)
            if not error.retryable:
                raise error
            asked = retry_after_asked(answer.headers.get("retry-after"))
            delay = backoff_seconds(backoff, attempt) if asked is None else min(asked, MAX_RETRY_AFTER)
        if attempt == retries:
            raise error
        left = deadline.left()
        if asked is not None and asked > left:
            raise _waits_too_long(error, asked, left)
        if delay >= left:
            raise error
        log.warning("%s; retry %d/%d in %.2f s", error, attempt + 1, retries, delay)
        _sleep(delay, cancel, where)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def reply_limits(wire: protocol.WireRequest, max_reply_bytes: int | None) -> ReplyLimits:
    """What a reply to `wire` may hold; `max_reply_bytes` replaces the byte bound when given."""
    limits = limits_for(wire)
    if max_reply_bytes is None:
        return limits
    if not max_reply_bytes > 0:
        raise ValueError(f"max_reply_bytes={max_reply_bytes!r} must be a positive number of bytes")
    return replace(limits, max_bytes=int(max_reply_bytes))


def _waits_too_long(error: RemoteVAEError, asked: float, left: float) -> RemoteVAETimeout:
    """A Retry-After longer than the call has left: waiting would only end in a timeout."""
    return RemoteVAETimeout(
        error.endpoint,
        f"answered {error.status} and asked to wait {asked:g} s before a retry (Retry-After), "
        f"but the timeout leaves {max(left, 0.0):.1f} s",
        status=error.status,
        server_message=error.server_message,
        hint="the server is busy or starting: run again later, or raise the timeout",
    )


_UNKNOWN_HOST = (
    "name or service not known",
    "nodename nor servname",
    "failed to resolve",
    "getaddrinfo failed",
)


def connection_error(
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
    # The server's own 502/504 is its job failing or running out of time, not a proxy's: say so.
    own = None if from_proxy(answer.headers, answer.body) else OWN_STATUS_HINTS.get(answer.status)
    return RemoteVAEError(
        where,
        f"answered {answer.status}: {message or answer.reason or 'no message'}",
        status=answer.status,
        server_message=message,
        hint=own or status_hint(answer.status, token is not None, token_advice),
        retryable=worth_retrying(answer.status, answer.headers, answer.body),
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
        receive_seconds=answer.receive_seconds,
    )
    if answer.receiver is not None:
        return Reply(b"", answer.headers, transfer, answer.limits, answer.receiver, answer.length)
    return Reply(answer.body, answer.headers, transfer, answer.limits)
