"""The server's errors: each carries the HTTP status it is answered with (docs/protocol.md, "Status codes").

Client mistakes found by the codec or the presets (`ProtocolError`, `PresetError`) are 400s; these are the
server's own refusals and failures. `ModelLoadError` is a loader's expected failure: the registry turns it
into `ModelUnavailable`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from starlette.responses import Response

from ..remote import protocol


class ServerError(Exception):
    """A failure answered with `status`, the message as the JSON body, and `headers`."""

    status = 500
    headers: Mapping[str, str] = {}


class UnknownModel(ServerError, LookupError):
    """A request named a model this server does not host."""

    status = 404


class CannotEncode(ServerError, ValueError):
    """Encode asked of a model that only decodes (some tiny decoders)."""

    status = 400


class ModelUnavailable(ServerError, RuntimeError):
    """A hosted model that could not be loaded; the message carries the loader's reason."""

    status = 503


class OutOfMemory(ServerError, RuntimeError):
    """Even the smallest plan (one item, smallest tile) ran out of device memory."""

    status = 507


class DeadlineExceeded(ServerError, TimeoutError):
    """A request ran past the server's `--request-timeout`."""

    status = 504


class ClientClosed(ServerError, ConnectionError):
    """The client closed the connection before the server answered: counted and logged as nginx's 499,
    never as a server fault (nobody reads the answer)."""

    status = 499


class ModelLoadError(RuntimeError):
    """Weights could not be loaded; the message says what failed and what to do.

    `has_hint`: the message already says how to point the server at local weights, so the registry
    adds no hint of its own.
    """

    def __init__(self, message: str, *, has_hint: bool = False) -> None:
        super().__init__(message)
        self.has_hint = has_hint


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    """Every error answer: `{"error": message}` as JSON with `status`."""
    body = protocol.error_body(without_addresses(message))
    response = Response(body, status_code=status, media_type=protocol.JSON_TYPE)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


# `<_io.BytesIO object at 0x7f...>`, as Pillow and others write an object into their messages.
HEAP_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+>")


def without_addresses(message: str) -> str:
    """`message` without the heap addresses of objects it names: they tell a client about the server's
    memory (and make equal errors differ), never what to fix."""
    return HEAP_ADDRESS.sub(">", message)


def first_line(exc: BaseException) -> str:
    """An exception's first line, for messages that quote a library's error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
