"""Optional bearer-token authentication for the VAE server.

The token comes from an environment variable or a file, is compared in constant time and is never
logged. Health checks stay open so load balancers and our node's "check endpoint" button work.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

TOKEN_ENV = "REMOTE_VAE_SERVER_TOKEN"
OPEN_PATHS = frozenset({"/", "/health"})


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


def requires_auth(path: str) -> bool:
    return path not in OPEN_PATHS
