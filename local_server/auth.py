"""Optional bearer-token authentication for the VAE server.

The token comes from an environment variable or a file, is compared in constant time and is never
logged. `RequireToken` guards the routes that need it; health checks stay open so load balancers and
our node's "check endpoint" button work.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from pathlib import Path

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response

TOKEN_ENV = "REMOTE_VAE_SERVER_TOKEN"


class TokenError(ValueError):
    pass


def load_token(token_file: str | None = None, env: str = TOKEN_ENV) -> str | None:
    """The server's token: from `token_file` when given, else from the environment; None = no auth."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise TokenError(f"cannot read token file {token_file}: {exc.strerror}") from None
        if not token:
            raise TokenError(f"token file {token_file} is empty")
        return token
    token = os.environ.get(env, "").strip()
    return token or None


def is_authorized(expected: str | None, authorization: str | None) -> bool:
    """Constant-time check of an `Authorization: Bearer <token>` header against `expected`."""
    if expected is None:
        return True
    scheme, _, supplied = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(supplied.strip().encode(), expected.encode())


class RequireToken:
    """ASGI middleware: 401 with `WWW-Authenticate: Bearer` unless the request carries `token`.

    `on_refusal` is called for each refused request (the job routes count them in /metrics).
    """

    def __init__(self, app: ASGIApp, token: str | None, on_refusal: Callable[[], None] | None = None) -> None:
        self.app = app
        self.token = token
        self.on_refusal = on_refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if is_authorized(self.token, Headers(scope=scope).get("authorization")):
            await self.app(scope, receive, send)
            return
        if self.on_refusal is not None:
            self.on_refusal()
        message = "missing or wrong bearer token: send Authorization: Bearer <token>"
        await error_response(401, message, {"www-authenticate": "Bearer"})(scope, receive, send)
