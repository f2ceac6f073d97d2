"""What the client raises, and the words it uses: the server's own message, a hint per status, no secrets."""

from __future__ import annotations

import html
import json
import re
from urllib.parse import urlsplit, urlunsplit

MAX_MESSAGE_CHARS = 500


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
        retryable: bool = False,
    ) -> None:
        self.endpoint = endpoint
        self.status = status
        self.server_message = server_message
        self.hint = hint
        self.retryable = retryable  # an answer a retry may fix (here or at another endpoint)
        text = f"{endpoint} {problem}"
        super().__init__(f"{text} (hint: {hint})" if hint else text)


class RemoteVAETimeout(RemoteVAEError):
    """The server did not connect or answer within the timeout."""


class RemoteVAECancelled(RemoteVAEError):
    """`cancel()` returned True while the request was under way."""


def display_url(endpoint: str) -> str:
    """The endpoint as errors show it: no query string, no password."""
    parts = urlsplit(endpoint)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username}:***@{netloc.rsplit('@', 1)[1]}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def server_root(endpoint: str) -> str:
    """scheme://host[:port] of an endpoint: where the server should be running."""
    parts = urlsplit(endpoint)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


# Linear on any input (an unclosed block ends the text; a tag ends at the next `<`): an error page is
# the server's to write, and a quadratic pattern would stall the client for minutes on a crafted one.
_HTML_DROP = re.compile(r"<(script|style)\b.*?(?:</\1\s*>|\Z)", re.IGNORECASE | re.DOTALL)
_HTML_TAG = re.compile(r"<[^<>]*>")


def clip(text: str) -> str:
    """One line of at most MAX_MESSAGE_CHARS characters."""
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"


def server_message(body: bytes) -> str | None:
    """The server's own words: JSON `error`/`message`/`detail`, else the text with HTML tags stripped."""
    text = body.decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        data = None
    if isinstance(data, dict):
        for key in ("error", "message", "detail"):
            if key in data:
                value = data[key]
                return clip(value if isinstance(value, str) else json.dumps(value))
    if data is None:
        text = html.unescape(_HTML_TAG.sub(" ", _HTML_DROP.sub(" ", text)))
    return clip(text) or None


def status_hint(status: int, token_sent: bool, token_advice: str | None = None) -> str | None:
    """What to do about `status`; `token_advice` says how to get a token to this server when none was sent."""
    if status in (401, 403):
        if token_sent:
            return "the server refused the token; check that it is the one the server was started with"
        return token_advice or "the server wants a token"
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


def is_json_error(body: bytes) -> bool:
    """Whether `body` is a JSON object with an `error` key: how a remote-VAE server words its errors."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return isinstance(data, dict) and "error" in data


# Hints for a 502/504 the server sent itself (see transport.from_proxy), not a proxy in front of it.
OWN_STATUS_HINTS = {
    502: "the server could not get an answer from its own model worker; its log says why",
    504: "the server's own time limit for a request passed (its --request-timeout): "
    "send less at once, or raise that limit",
}


def redact(text: str | None, token: str | None) -> str | None:
    """`text` with the token replaced by ***: a server or a library may echo it."""
    if text is None or not token:
        return text
    return text.replace(token, "***")
