"""Tokens bound to origins: only the bound origin gets its token, never over plain http to another machine
unless allowed, HF_TOKEN only to Hugging Face endpoint hosts over https, and no message holds a token."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest

from remote_vae.remote import tokens
from remote_vae.remote.tokens import TokenError, TokenStore

SECRET = "s3cr3t-Token_value"


def store(environ: dict[str, str], settings=None) -> TokenStore:
    return TokenStore.load(settings, environ)


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("https://GPU-box:443/flux", "https://gpu-box"),
        ("http://gpu-box:8190/sd15/decode?x=1", "http://gpu-box:8190"),
        ("http://[::1]:8190/", "http://[::1]:8190"),
        ("http://127.0.0.1:80", "http://127.0.0.1"),
    ],
)
def test_origin_is_scheme_host_and_non_default_port(url, origin):
    assert tokens.origin_of(url) == origin


@pytest.mark.parametrize("url", ["ftp://box/", "gpu-box:8190", "http://", "http://box:99999/"])
def test_a_non_http_origin_is_refused_by_name(url):
    with pytest.raises(TokenError, match="http"):
        tokens.origin_of(url)


def test_a_token_goes_only_to_its_origin():
    s = store({tokens.TOKENS_ENV: f"https://gpu-box:8190={SECRET}, http://127.0.0.1:8190=local-token"})
    assert s.token_for("https://gpu-box:8190/flux") == SECRET
    assert s.token_for("https://gpu-box:8191/flux") is None  # another port is another server
    assert s.token_for("http://gpu-box:8190/flux") is None  # another scheme too
    assert s.token_for("https://evil.example/flux") is None
    assert s.token_for("http://127.0.0.1:8190/sd15") == "local-token"


def test_plain_http_to_another_machine_needs_explicit_permission():
    env = {tokens.TOKENS_ENV: f"http://10.1.2.3:8190={SECRET};http://localhost:8190=loop"}
    s = store(env)
    assert s.token_for("http://10.1.2.3:8190/sd15") is None
    reason = s.withheld("http://10.1.2.3:8190/sd15")
    assert "not sent over plain http to another machine (http://10.1.2.3:8190)" in reason
    assert "REMOTE_VAE_ALLOW_HTTP=http://10.1.2.3:8190" in reason
    assert SECRET not in reason
    assert s.token_for("http://localhost:8190/sd15") == "loop"
    allowed = store({**env, tokens.ALLOW_HTTP_ENV: "http://10.1.2.3:8190"})
    assert allowed.token_for("http://10.1.2.3:8190/sd15") == SECRET
    assert allowed.withheld("http://10.1.2.3:8190/sd15") is None


def test_hf_token_only_to_hugging_face_endpoints_over_https():
    s = store({tokens.HF_TOKEN_ENV: SECRET})
    assert s.token_for("https://q1bj3bpq6kzilnsu.us-east-1.aws.endpoints.huggingface.cloud/") == SECRET
    assert s.token_for("http://q1bj3bpq6kzilnsu.us-east-1.aws.endpoints.huggingface.cloud/") is None
    assert s.token_for("https://endpoints.huggingface.cloud.evil.example/") is None
    assert s.token_for("https://gpu-box:8190/") is None


@pytest.mark.parametrize("bad", [f"{SECRET}\u20ac", f"{SECRET} x", f"{SECRET}\x00"])
def test_a_token_that_cannot_travel_is_refused_without_showing_it(bad):
    with pytest.raises(TokenError) as caught:
        store({tokens.TOKENS_ENV: f"https://gpu-box={bad}"} if " " not in bad else {tokens.HF_TOKEN_ENV: bad})
    assert SECRET not in str(caught.value) and "position" in str(caught.value)


def test_an_entry_without_origin_is_refused_without_showing_it():
    with pytest.raises(TokenError, match="without '='") as caught:
        store({tokens.TOKENS_ENV: SECRET})
    assert SECRET not in str(caught.value)


def test_settings_file_round_trip_is_private_and_env_wins(tmp_path):
    path = tmp_path / "remote_vae" / "tokens.json"
    assert tokens.write_binding(path, "https://GPU-box:8190/flux", SECRET) == "https://gpu-box:8190"
    tokens.write_binding(path, "http://10.1.2.3:8190/", "lan", allow_http=True)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    s = store({}, path)
    assert s.token_for("https://gpu-box:8190/x") == SECRET and s.token_for("http://10.1.2.3:8190/x") == "lan"
    assert s.describe() == [
        {"origin": "https://gpu-box:8190", "allow_http": False},
        {"origin": "http://10.1.2.3:8190", "allow_http": True},
    ]
    assert (
        store({tokens.TOKENS_ENV: "https://gpu-box:8190=from-env"}, path).token_for("https://gpu-box:8190")
        == "from-env"
    )
    tokens.write_binding(path, "https://gpu-box:8190", None)
    assert json.loads(path.read_text())["servers"].keys() == {"http://10.1.2.3:8190"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot be read (JSONDecodeError)"),
        ('{"tokens": {}}', "has no 'servers' object"),
        ('{"servers": {"https://a": {"allow_http": true}}}', "has no token string for https://a"),
    ],
)
def test_a_broken_settings_file_is_named(tmp_path, content, message):
    path = tmp_path / "tokens.json"
    path.write_text(content)
    with pytest.raises(TokenError, match=re.escape(message)):
        store({}, path)


def test_a_missing_settings_file_binds_nothing(tmp_path):
    assert store({}, tmp_path / "absent.json").bindings == {}
    assert store({tokens.SETTINGS_FILE_ENV: str(tmp_path / "absent.json")}).bindings == {}


def test_settings_file_from_the_environment(tmp_path):
    path = tmp_path / "tokens.json"
    tokens.write_binding(path, "https://gpu-box", SECRET)
    assert store({tokens.SETTINGS_FILE_ENV: str(path)}).token_for("https://gpu-box/flux") == SECRET
