"""Bearer tokens bound to server origins in the user's local configuration, never in a workflow.

A workflow names endpoints only. Which token goes to which server is decided here, from two local
sources (the environment wins over the file):

- a settings file (JSON, written by the web extension's settings entry, readable by its owner only):
  `{"servers": {"https://gpu-box:8190": {"token": "...", "allow_http": false}}}`;
- `REMOTE_VAE_TOKENS`: whitespace-, comma- or semicolon-separated `ORIGIN=TOKEN` pairs, for headless use,
  and `REMOTE_VAE_ALLOW_HTTP`: origins whose token may travel over plain http.

A request carries a token only to the origin it is bound to, and over plain http only to a loopback host
or an origin allowed explicitly. `HF_TOKEN` goes only to Hugging Face endpoint hosts, over https.
No message here ever contains a token.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

TOKENS_ENV = "REMOTE_VAE_TOKENS"
ALLOW_HTTP_ENV = "REMOTE_VAE_ALLOW_HTTP"
HF_TOKEN_ENV = "HF_TOKEN"
HF_HOST_SUFFIX = ".endpoints.huggingface.cloud"
DEFAULT_PORTS = {"http": 80, "https": 443}
_SEPARATORS = re.compile(r"[\s,;]+")


class TokenError(ValueError):
    """A token configuration that cannot be used; the message names the origin or file, never the token."""


def origin_of(url: str) -> str:
    """`scheme://host[:port]` of an http(s) URL, lowercase, without a default port."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise TokenError(f"{url!r} is not a URL; an origin looks like https://gpu-box:8190") from None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in DEFAULT_PORTS or not host:
        raise TokenError(f"{url!r} is not an http(s) URL; an origin looks like https://gpu-box:8190")
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}" if port in (None, DEFAULT_PORTS[scheme]) else f"{scheme}://{shown}:{port}"


def is_loopback(origin: str) -> bool:
    host = (urlsplit(origin).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_token(token: str, where: str) -> str:
    """The token stripped, if it can travel in an HTTP header (visible ASCII); else a TokenError."""
    token = token.strip()
    if not token:
        raise TokenError(f"the token for {where} is empty")
    for position, char in enumerate(token, start=1):
        if not "!" <= char <= "~":
            raise TokenError(
                f"the token for {where} has a character that cannot travel in an HTTP header at position "
                f"{position}; tokens are printable ASCII without spaces: copy it again"
            )
    return token


SETTINGS_FILE_ENV = "REMOTE_VAE_TOKENS_FILE"  # where the client reads the settings file outside ComfyUI


@dataclass
class TokenStore:
    """Which token each server origin gets; `token_for(url)` is all a client asks."""

    bindings: dict[str, str] = field(default_factory=dict)  # origin -> token
    allow_http: set[str] = field(default_factory=set)  # origins a token may reach over plain http
    hf_token: str | None = None

    @classmethod
    def load(
        cls, settings_file: str | Path | None = None, environ: Mapping[str, str] | None = None
    ) -> TokenStore:
        """The file's bindings, then the environment's (which win); `settings_file` None: $REMOTE_VAE_TOKENS_FILE."""
        environ = os.environ if environ is None else environ
        settings_file = settings_file or environ.get(SETTINGS_FILE_ENV)
        store = cls()
        if settings_file:
            for binding in read_settings(settings_file):
                store.bind(binding.origin, binding.token, allow_http=binding.allow_http)
        for origin, token in parse_pairs(environ.get(TOKENS_ENV, "")).items():
            store.bind(origin, token)
        store.allow_http |= {origin_of(o) for o in _SEPARATORS.split(environ.get(ALLOW_HTTP_ENV, "")) if o}
        hf = environ.get(HF_TOKEN_ENV, "").strip()
        store.hf_token = check_token(hf, HF_TOKEN_ENV) if hf else None
        return store

    def bind(self, url: str, token: str, *, allow_http: bool = False) -> None:
        origin = origin_of(url)
        self.bindings[origin] = check_token(token, origin)
        if allow_http:
            self.allow_http.add(origin)

    def token_for(self, url: str) -> str | None:
        """The token bound to `url`'s origin (or HF_TOKEN for a Hugging Face endpoint), where it may travel."""
        try:
            origin = origin_of(url)
        except TokenError:
            return None
        if self.plain_http_refusal(origin):
            return None
        if origin in self.bindings:
            return self.bindings[origin]
        host = urlsplit(origin).hostname or ""
        return self.hf_token if origin.startswith("https://") and host.endswith(HF_HOST_SUFFIX) else None

    def withheld(self, url: str) -> str | None:
        """Why the token bound to `url`'s origin is not sent there, or None."""
        try:
            origin = origin_of(url)
        except TokenError:
            return None
        return self.plain_http_refusal(origin) if origin in self.bindings else None

    def plain_http_refusal(self, url: str) -> str | None:
        """Why no token may travel to `url` (plain http to another machine, not allowed), or None."""
        origin = origin_of(url)
        if not origin.startswith("http://") or origin in self.allow_http or is_loopback(origin):
            return None
        return (
            f"a token is not sent over plain http to another machine ({origin}); use https, or allow "
            f"that origin explicitly ({ALLOW_HTTP_ENV}={origin}, or 'allow over plain http' in ComfyUI's "
            "settings under Remote VAE)"
        )

    def describe(self) -> list[dict]:
        """What the settings entry shows: origins and flags, never tokens."""
        return [{"origin": o, "allow_http": o in self.allow_http} for o in self.bindings]


@dataclass(frozen=True)
class Binding:
    """One entry of the settings file."""

    origin: str
    token: str
    allow_http: bool = False


def parse_pairs(text: str) -> dict[str, str]:
    """`ORIGIN=TOKEN` pairs (the environment form) as {origin: token}."""
    pairs: dict[str, str] = {}
    for item in _SEPARATORS.split(text.strip()):
        if not item:
            continue
        origin, sep, token = item.partition("=")
        if not sep:
            raise TokenError(  # the entry itself may be a pasted token: not shown
                f"{TOKENS_ENV} holds an entry without '='; write ORIGIN=TOKEN pairs, e.g. https://gpu-box:8190=<token>"
            )
        origin = origin_of(origin)
        pairs[origin] = check_token(token, origin)
    return pairs


def read_settings(path: str | Path) -> list[Binding]:
    """The settings file's bindings; a missing file binds nothing."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise TokenError(
            f"the token settings file {path} cannot be read ({type(exc).__name__}); fix or delete it"
        ) from None
    servers = data.get("servers") if isinstance(data, dict) else None
    if not isinstance(servers, dict):
        raise TokenError(f"the token settings file {path} has no 'servers' object; fix or delete it")
    bindings = []
    for origin, entry in servers.items():
        origin = origin_of(origin)
        token = entry.get("token") if isinstance(entry, dict) else None
        if not isinstance(token, str):
            raise TokenError(
                f"the token settings file {path} has no token string for {origin}; fix or delete it"
            )
        bindings.append(Binding(origin, check_token(token, origin), bool(entry.get("allow_http", False))))
    return bindings


def write_binding(path: str | Path, url: str, token: str | None, *, allow_http: bool = False) -> str:
    """Bind (or, with `token=None`, unbind) `url`'s origin in the settings file; returns the origin.

    The file is replaced atomically and readable by its owner only.
    """
    path = Path(path)
    origin = origin_of(url)
    bindings = {b.origin: b for b in read_settings(path)}
    if token is None:
        bindings.pop(origin, None)
    else:
        bindings[origin] = Binding(origin, check_token(token, origin), allow_http)
    servers = {b.origin: {"token": b.token, "allow_http": b.allow_http} for b in bindings.values()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tokens-")
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump({"servers": servers}, out, indent=2)
    os.replace(temporary, path)  # mkstemp made it 0600
    return origin


def how_to_bind(url: str) -> str:
    """Advice for a server that wants a token none is bound to."""
    try:
        origin = origin_of(url)
    except TokenError:
        origin = "ORIGIN"
    return (
        f"the server wants a token: bind one to {origin} in ComfyUI's settings (Remote VAE, server tokens), "
        f"or set {TOKENS_ENV}={origin}=<token> where ComfyUI (or your script) starts"
    )
