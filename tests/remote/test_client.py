"""The HTTP client against real servers on 127.0.0.1: retries, timeouts, cancellation, progress,
tokens, error messages, response validation, and every diffusers return combination."""

from __future__ import annotations

import io
import itertools
import logging
import threading
import time
import warnings
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import numpy as np
import pytest
import requests
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import remote_utils
from diffusers.video_processor import VideoProcessor
from PIL import Image

from remote_vae.remote import (
    RemoteVAECancelled,
    RemoteVAEError,
    RemoteVAETimeout,
    Reply,
    Transfer,
    errors,
    protocol,
    remote_decode,
    remote_encode,
    send,
    tokens,
    transport,
)
from support.compare import assert_same
from support.stub_servers import (
    Canned,
    flaky,
    json_error,
    recorder,
    refused_url,
    serve,
    slow,
    stalling,
    tensor_answer,
    text_answer,
    unaccepting,
)

pytestmark = pytest.mark.timeout(60)

FAST = {"backoff": 0.01}  # keep retry tests quick
HANG_GUARD = 5.0  # seconds: a cancelled call returning later than this is a hang, not slowness
TOKEN = "s3cret-t0ken-value"


def latent(shape=(1, 4, 8, 8), dtype=torch.float16, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def image_bytes(fmt="JPEG", size=(8, 6)):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        buffer, format=fmt
    )
    return buffer.getvalue()


MP4 = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + bytes(range(64))
OK = tensor_answer(latent((1, 3, 8, 8)))


def pt_wire(tensor=None):
    return protocol.build_decode_request(
        latent() if tensor is None else tensor, output_type="pt", do_scaling=False
    )


# --------------------------------------------------------------------------- retries


def test_retries_until_the_server_recovers():
    with flaky(2, json_error(503, "warming up"), OK) as stub:
        reply = send(stub.url, pt_wire(), **FAST)
    assert len(stub.requests) == 3
    assert reply.transfer.attempts == 3 and reply.transfer.status == 200
    assert torch.equal(reply.tensor(), protocol.parse_tensor_response(OK.body, dict(OK.headers)))
    assert all(r.body == stub.requests[0].body for r in stub.requests)  # the same body every attempt


@pytest.mark.parametrize("status", sorted(transport.RETRY_STATUSES))
def test_every_retryable_status_is_retried(status):
    with flaky(1, json_error(status, "transient"), OK) as stub:
        assert send(stub.url, pt_wire(), retries=1, **FAST).transfer.attempts == 2
    assert len(stub.requests) == 2


def test_gives_up_after_the_last_retry_with_status_and_message():
    # A proxy's own page (not the server's JSON error, which is not retried: test_client_bounds.py).
    with flaky(99, text_answer(502, "upstream exploded", content_type="text/plain"), OK) as stub:
        with pytest.raises(RemoteVAEError) as info:
            send(stub.url, pt_wire(), retries=2, **FAST)
    assert len(stub.requests) == 3
    error = info.value
    assert (error.status, error.server_message, error.endpoint) == (502, "upstream exploded", stub.url)
    assert str(error).startswith(f"{stub.url} answered 502: upstream exploded (hint: a proxy in front")


@pytest.mark.parametrize("status", [400, 401, 404, 405, 413, 422])
def test_other_client_errors_are_not_retried(status):
    with flaky(99, json_error(status, "no good"), OK) as stub:
        with pytest.raises(RemoteVAEError) as info:
            send(stub.url, pt_wire(), retries=3, **FAST)
    assert len(stub.requests) == 1
    assert info.value.status == status and info.value.server_message == "no good"


def test_retry_after_is_honoured():
    # The server fails again when the retry comes sooner than its Retry-After; back-off alone
    # (0.01 s) would be too early, so two attempts in total means Retry-After was waited for.
    failure = json_error(503, "scaling up", extra=[("Retry-After", "1")])
    with flaky(1, failure, OK, min_gap=0.9) as stub:
        reply = send(stub.url, pt_wire(), retries=1, **FAST)
    assert reply.transfer.attempts == 2 and len(stub.requests) == 2


def test_retry_after_too_early_exhausts_the_retries():
    # The control for the test above: a server that needs a gap the client is not told about.
    with flaky(1, json_error(503, "scaling up"), OK, min_gap=0.9) as stub:
        with pytest.raises(RemoteVAEError, match="answered 503: scaling up"):
            send(stub.url, pt_wire(), retries=1, **FAST)
    assert len(stub.requests) == 2


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(None, None), ("", None), ("3", 3.0), ("0.25", 0.25), ("-5", 0.0), ("86400", transport.MAX_RETRY_AFTER),
     ("soon", None), ("nan", None)],
)  # fmt: skip
def test_retry_after_seconds(value, seconds):
    assert transport.retry_after_seconds(value) == seconds


def test_retry_after_http_date():
    future = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    past = format_datetime(datetime.now(timezone.utc) - timedelta(seconds=30), usegmt=True)
    assert 20 < transport.retry_after_seconds(future) <= 30
    assert transport.retry_after_seconds(past) == 0.0


def test_backoff_doubles_and_is_capped():
    assert [transport.backoff_seconds(0.5, n) for n in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert transport.backoff_seconds(0.5, 20) == transport.MAX_BACKOFF


def test_cut_off_answer_is_retried_then_reported():
    short = Canned(200, list(OK.headers), OK.body[:100], content_length=len(OK.body))
    with serve(lambda request, index: short) as stub:
        with pytest.raises(RemoteVAEError, match="could not be reached: the answer was cut off"):
            send(stub.url, pt_wire(), retries=1, **FAST)
    assert len(stub.requests) == 2


# --------------------------------------------------------------------------- timeouts and cancel


def test_read_timeout_against_a_stalling_server():
    with stalling() as stub:
        with pytest.raises(RemoteVAETimeout) as info:
            send(stub.url, pt_wire(), timeout=(5, 0.5), retries=3, **FAST)
        assert len(stub.requests) == 1  # read timeouts are not retried
    assert str(info.value).startswith(f"{stub.url} did not answer within 0.5 s (read timeout)")
    assert info.value.endpoint == stub.url and info.value.status is None


def test_read_timeout_on_a_slow_body():
    with slow(tensor_answer(torch.zeros(4, 1024, dtype=torch.uint8)), seconds_per_kib=10) as stub:
        with pytest.raises(RemoteVAETimeout, match="did not answer within 0.3 s"):
            send(stub.url, pt_wire(), timeout=(5, 0.3))


def test_connect_timeout_is_retried_then_raised():
    with unaccepting() as url:
        with pytest.raises(RemoteVAETimeout) as info:
            send(url, pt_wire(), timeout=(0.2, 5), retries=1, **FAST)
    assert "did not accept a connection within 0.2 s (connect timeout)" in str(info.value)
    assert f"is the server running and reachable at {url.rstrip('/')}?" in str(info.value)


def test_a_misspelt_option_is_a_type_error():
    with recorder(OK) as stub:
        with pytest.raises(
            TypeError, match="unexpected keyword argument 'timout'; the options are: timeout, "
        ):
            remote_decode(stub.url, latent(), output_type="pt", return_type="pt", timout=5)
        with pytest.raises(TypeError, match="unexpected keyword argument 'tokn'"):
            send(stub.url, pt_wire(), tokn="x")
    assert stub.requests == []


@pytest.mark.parametrize("timeout", [0, -1, (1, 0), (None, 5)])
def test_timeouts_must_be_positive(timeout):
    with pytest.raises(ValueError, match="must be positive"):
        send("http://127.0.0.1:9/", pt_wire(), timeout=timeout)


def test_cold_start_timeout_lengthens_the_read_timeout():
    assert transport.split_timeout((3, 5), 120) == (3.0, 120.0)
    assert transport.split_timeout(7, None) == (7.0, 7.0)
    assert transport.split_timeout((3, 500), 120) == (3.0, 500.0)


def cancel_after(seconds: float):
    deadline = time.monotonic() + seconds
    return lambda: time.monotonic() > deadline


def test_cancel_while_the_server_stalls():
    with stalling() as stub:
        started = time.monotonic()
        with pytest.raises(RemoteVAECancelled, match="request was cancelled"):
            send(stub.url, pt_wire(), timeout=(5, 120), cancel=cancel_after(0.3))
        assert time.monotonic() - started < HANG_GUARD


def test_cancel_during_a_slow_download():
    big = tensor_answer(torch.zeros(64, 1024, dtype=torch.uint8))
    seen = []
    with slow(big, seconds_per_kib=0.05) as stub:
        started = time.monotonic()
        with pytest.raises(RemoteVAECancelled):
            send(stub.url, pt_wire(), cancel=lambda: len(seen) > 0 and seen[-1][2] >= 4096,
                 progress=lambda *p: seen.append(p))  # fmt: skip
        assert time.monotonic() - started < HANG_GUARD
    assert 4096 <= seen[-1][2] < 65536


def test_cancel_during_back_off():
    failure = json_error(503, "down", extra=[("Retry-After", "60")])
    with flaky(99, failure, OK) as stub:
        started = time.monotonic()
        with pytest.raises(RemoteVAECancelled):
            send(stub.url, pt_wire(), retries=3, cancel=cancel_after(0.3))
        assert time.monotonic() - started < HANG_GUARD
    assert len(stub.requests) == 1


def test_cancel_before_sending_sends_nothing():
    with recorder(OK) as stub:
        with pytest.raises(RemoteVAECancelled):
            remote_decode(stub.url, latent(), output_type="pt", return_type="pt", cancel=lambda: True)
    assert stub.requests == []


# --------------------------------------------------------------------------- progress and transfer stats


def test_progress_totals_equal_bytes_on_the_wire():
    tensor = latent((1, 4, 96, 96), torch.float32)  # 144 KiB up: several upload chunks
    answer = tensor_answer(latent((1, 3, 64, 64), torch.float16), extra=[("X-Request-ID", "req-42")])
    calls = []
    with recorder(answer) as stub:
        reply = send(stub.url, pt_wire(tensor), progress=lambda *args: calls.append(args))
    sent_body = stub.requests[0].body
    assert (
        int(stub.requests[0].header("Content-Length"))
        == len(sent_body)
        == len(protocol.tensor_to_bytes(tensor))
    )
    assert calls[-1] == (len(sent_body), len(sent_body), len(answer.body), len(answer.body))
    assert len(calls) > 2
    assert all(total == len(sent_body) for _, total, _, _ in calls)
    for before, after in itertools.pairwise(calls):
        assert after[0] >= before[0] and after[2] >= before[2]
    transfer = reply.transfer
    assert (transfer.bytes_sent, transfer.bytes_received, transfer.status) == (
        len(sent_body),
        len(answer.body),
        200,
    )
    assert transfer.request_id == "req-42"
    assert transfer.server.startswith("BaseHTTP/")
    assert transfer.attempts == 1 and transfer.seconds > 0 and transfer.endpoint == stub.url


def test_progress_does_not_change_the_request():
    with recorder(OK) as stub:
        send(stub.url, pt_wire())
        send(stub.url, pt_wire(), progress=lambda *args: None, cancel=lambda: False)
    plain, watched = stub.requests
    assert (plain.target, plain.headers, plain.body) == (watched.target, watched.headers, watched.body)


def test_reply_headers_are_case_insensitive():
    with recorder(OK) as stub:
        reply = send(stub.url, pt_wire())
    assert reply.headers["SHAPE"] == reply.headers["shape"] == "[1,3,8,8]"
    assert isinstance(reply, Reply) and isinstance(reply.transfer, Transfer)


# --------------------------------------------------------------------------- sessions and our additions


def test_one_keep_alive_session_per_thread():
    with recorder(OK) as stub:
        send(stub.url, pt_wire())
        send(stub.url, pt_wire())
        other: list[requests.Session] = []
        worker = threading.Thread(
            target=lambda: (send(stub.url, pt_wire()), other.append(transport.thread_session()))
        )
        worker.start()
        worker.join(timeout=30)
    first, second, third = stub.requests
    assert first.client_port == second.client_port  # the connection was reused
    assert third.client_port != first.client_port
    assert other[0] is not transport.thread_session()


def test_a_passed_session_is_used():
    class CountingSession(requests.Session):
        posts = 0

        def post(self, *args, **kwargs):
            CountingSession.posts += 1
            return super().post(*args, **kwargs)

    with recorder(OK) as stub:
        send(stub.url, pt_wire(), session=CountingSession())
    assert CountingSession.posts == 1


def test_extensions_and_cold_start_header_only_when_asked():
    with recorder(OK) as stub:
        remote_decode(stub.url, latent(), do_scaling=False, output_type="pt", return_type="pt")
        remote_decode(stub.url, latent(), do_scaling=False, output_type="pt", return_type="pt",
                      extensions=protocol.Extensions(output_dtype="float16", tile="on"), cold_start_timeout=90)  # fmt: skip
    plain, extended = stub.requests
    assert "X-Scale-Up-Timeout" not in dict(plain.headers)
    assert dict(extended.headers)["X-Scale-Up-Timeout"] == "90"
    assert extended.query == plain.query + "&output_dtype=float16&tile=on"
    assert [h for h in extended.headers if h[0] != "X-Scale-Up-Timeout"] == plain.headers


# --------------------------------------------------------------------------- tokens


def origin(url: str) -> str:
    return "/".join(url.split("/")[:3])


def test_token_from_argument(monkeypatch):
    monkeypatch.delenv(tokens.TOKENS_ENV, raising=False)
    with recorder(OK) as stub:
        send(stub.url, pt_wire(), token=TOKEN)
        send(stub.url, pt_wire())
    assert stub.requests[0].header("Authorization") == f"Bearer {TOKEN}"
    assert stub.requests[1].header("Authorization") is None


def test_token_bound_to_the_origin_in_the_environment(monkeypatch):
    monkeypatch.setenv("REMOTE_VAE_TOKEN", "an-unbound-token")  # the old, unbound variable is not read
    with recorder(OK) as stub, recorder(OK) as other:
        monkeypatch.setenv(tokens.TOKENS_ENV, f"{origin(stub.url)}={TOKEN}")
        send(stub.url, pt_wire())
        send(other.url, pt_wire())  # another port is another server: no token
        send(stub.url, pt_wire(), token="explicit")
        send(stub.url, pt_wire(), tokens=tokens.TokenStore())  # an empty store of the caller's: no token
    assert [r.header("Authorization") for r in stub.requests] == [f"Bearer {TOKEN}", "Bearer explicit", None]
    assert other.requests[0].header("Authorization") is None


def test_no_token_over_plain_http_to_another_machine(monkeypatch):
    monkeypatch.setenv(tokens.TOKENS_ENV, f"http://gpu-box.invalid:8190={TOKEN}")
    with pytest.raises(RemoteVAEError) as explicit:  # refused before anything is sent
        send("http://gpu-box.invalid:8190/sd15", pt_wire(), token=TOKEN, retries=0)
    assert "was not sent its token" in str(explicit.value) and "REMOTE_VAE_ALLOW_HTTP" in str(explicit.value)
    assert TOKEN not in str(explicit.value)
    store = tokens.TokenStore.load()
    assert store.token_for("http://gpu-box.invalid:8190/sd15") is None  # the bound one is withheld too


@pytest.mark.parametrize("bad", [TOKEN + "\u20ac", TOKEN[:4] + "\n" + TOKEN[4:], TOKEN + " more"])
def test_a_token_that_cannot_travel_is_an_error_without_the_token(monkeypatch, bad):
    with recorder(OK) as stub:
        with pytest.raises(RemoteVAEError) as info:
            send(stub.url, pt_wire(), token=bad)
        monkeypatch.setenv(tokens.TOKENS_ENV, f"{origin(stub.url)}={bad}")
        with pytest.raises(RemoteVAEError) as configured:
            send(stub.url, pt_wire())
    assert "cannot travel in an HTTP header" in str(info.value)
    assert "cannot travel in an HTTP header" in str(configured.value) or "without '='" in str(
        configured.value
    )
    for error in (info.value, configured.value):
        assert all(part not in str(error) + repr(error) for part in (TOKEN[:4], TOKEN[4:]))
    assert stub.requests == []


def test_token_never_appears_in_errors_or_logs(monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    echo = json_error(503, f"token {TOKEN} is over quota")  # a server that echoes what it got
    with flaky(99, echo, OK) as stub:
        monkeypatch.setenv(tokens.TOKENS_ENV, f"{origin(stub.url)}={TOKEN}")
        with pytest.raises(RemoteVAEError) as info:
            remote_decode(stub.url, latent(), output_type="pt", return_type="pt", retries=1, **FAST)
    assert stub.requests[0].header("Authorization") == f"Bearer {TOKEN}"
    error = info.value
    texts = [str(error), repr(error), error.server_message, caplog.text]
    texts += [str(e) + repr(e) for e in (error.__cause__, error.__context__) if e is not None]
    assert caplog.text  # the retry was logged...
    assert all(TOKEN not in text for text in texts)  # ...without the token
    assert error.server_message == "token *** is over quota"
    assert error.__cause__ is None and error.__context__ is None  # no chained request object holding headers


def test_token_hints(monkeypatch):
    monkeypatch.delenv(tokens.TOKENS_ENV, raising=False)
    with recorder(json_error(401, "unauthorized")) as stub:
        with pytest.raises(RemoteVAEError) as without:
            send(stub.url, pt_wire())
        with pytest.raises(RemoteVAEError) as wrong:
            send(stub.url, pt_wire(), token="nope")
    assert f"(hint: the server wants a token: bind one to {origin(stub.url)} in ComfyUI's settings" in str(
        without.value
    )
    assert f"REMOTE_VAE_TOKENS={origin(stub.url)}=<token>" in str(without.value)
    assert "the server refused the token" in str(wrong.value) and "nope" not in str(wrong.value)


def test_password_in_the_url_is_not_shown():
    url = refused_url().replace("http://", "http://user:hunter2@")
    with pytest.raises(RemoteVAEError) as info:
        send(url, pt_wire(), retries=0)
    assert "hunter2" not in str(info.value) and "user:***@127.0.0.1" in info.value.endpoint


# --------------------------------------------------------------------------- error messages


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (json_error(400, "latent has 16 channels but preset sd15 expects 4"),
         "answered 400: latent has 16 channels but preset sd15 expects 4"),
        (json_error(422, "bad shape", key="message"), "answered 422: bad shape"),
        (json_error(422, "field required", key="detail"), "answered 422: field required"),
        (Canned(400, [("Content-Type", "application/json")], b'{"error": {"code": 7}}'),
         'answered 400: {"code": 7}'),
        (text_answer(502, "<html><head><title>502 Bad Gateway</title><style>h1{x}</style></head>"
                          "<body><h1>Bad&nbsp;Gateway</h1><hr>nginx</body></html>"),
         "answered 502: 502 Bad Gateway Bad Gateway nginx"),
        (text_answer(500, "Internal Server Error", "text/plain"), "answered 500: Internal Server Error"),
        (Canned(500, [], b""), "answered 500: Internal Server Error"),
    ],
)  # fmt: skip
def test_error_messages(answer, message):
    with recorder(answer) as stub:
        with pytest.raises(RemoteVAEError) as info:
            send(stub.url, pt_wire(), retries=0)
    assert str(info.value).startswith(f"{stub.url} {message}")
    assert info.value.status == answer.status


def test_long_text_errors_are_truncated():
    with recorder(text_answer(400, "<p>" + "x" * 5000 + "</p>")) as stub:
        with pytest.raises(RemoteVAEError) as info:
            send(stub.url, pt_wire())
    assert len(info.value.server_message) == errors.MAX_MESSAGE_CHARS
    assert info.value.server_message.endswith("…") and "<p>" not in str(info.value)


@pytest.mark.parametrize(
    ("status", "hint"),
    [
        (404, "wrong URL or model name"),
        (413, "the request is too large for the server"),
        (503, "the endpoint is busy, down or scaled to zero"),
        (429, "the server is busy"),
        (418, None),
    ],
)
def test_status_hints(status, hint):
    with recorder(json_error(status, "nope")) as stub:
        with pytest.raises(RemoteVAEError) as info:
            send(stub.url, pt_wire(), retries=0)
    assert info.value.hint == hint or (hint and info.value.hint.startswith(hint))
    assert ("(hint: " in str(info.value)) == (hint is not None)


def test_connection_refused_hint():
    url = refused_url()
    with pytest.raises(RemoteVAEError) as info:
        send(url, pt_wire(), retries=1, **FAST)
    root = url.rstrip("/")
    assert str(info.value) == f"{url} refused the connection (hint: is the server running at {root}?)"
    assert info.value.status is None


def test_unknown_host_hint():
    # .invalid never resolves (RFC 6761)
    with pytest.raises(RemoteVAEError) as info:
        send("http://no-such-host.invalid:8190/sd15", pt_wire(), retries=0)
    assert str(info.value) == (
        "http://no-such-host.invalid:8190/sd15 could not be resolved (unknown host name) "
        "(hint: check the host name in the endpoint URL)"
    )
    assert info.value.__cause__ is None and info.value.__context__ is None


@pytest.mark.parametrize("url", ["127.0.0.1:8190/sd15", "http://", "ftp://127.0.0.1/x"])
def test_invalid_urls(url):
    with pytest.raises(RemoteVAEError, match="is not a valid URL"):
        send(url, pt_wire())


# --------------------------------------------------------------------------- response validation


def _tensor_headers(shape="[1,3,8,8]", dtype="float16"):
    return [("Content-Type", "tensor/binary"), ("shape", shape), ("dtype", dtype)]


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (Canned(200, _tensor_headers(), OK.body[:-2]), "a bad tensor: body has 382 bytes but shape"),
        (Canned(200, _tensor_headers()[:2], OK.body), "a bad tensor: response has no `dtype` header"),
        (Canned(200, [_tensor_headers()[2]], OK.body), "a bad tensor: response has no `shape` header"),
        (Canned(200, _tensor_headers(dtype="float64"), OK.body), "a bad tensor: unsupported dtype 'float64'"),
        (
            Canned(200, _tensor_headers(shape="1,3,8,8"), OK.body),
            "a bad tensor: `shape` header '1,3,8,8' is not a JSON array",
        ),
    ],
)
def test_bad_tensor_answers(answer, message):
    with recorder(answer) as stub:
        with pytest.raises(RemoteVAEError) as info:
            remote_decode(stub.url, latent(), output_type="pt", return_type="pt")
    assert f"{stub.url} answered 200 with {message}" in str(info.value)
    assert info.value.status == 200


def test_bad_image_answer():
    with recorder(Canned(200, [("Content-Type", "image/jpeg")], b"<html>not an image</html>")) as stub:
        with pytest.raises(RemoteVAEError, match=r"answered 200 with a body that is not an image \(25 bytes"):
            remote_decode(stub.url, latent())


@pytest.mark.parametrize("body", [b"", b"\x00\x00\x00\x18moov", b"<html>oops</html>"])
def test_bad_mp4_answer(body):
    with recorder(Canned(200, [("Content-Type", "text/plain")], body)) as stub:
        with pytest.raises(RemoteVAEError, match="a body that is not an MP4 file"):
            remote_decode(stub.url, latent((1, 16, 2, 4, 4)), output_type="mp4", return_type="mp4")


def test_expected_shape():
    with recorder(OK) as stub:
        out = remote_decode(
            stub.url, latent(), output_type="pt", return_type="pt", expected_shape=[1, 3, 8, 8]
        )
        assert out.shape == (1, 3, 8, 8)
        assert remote_decode(stub.url, latent(), output_type="pt", return_type="pt",
                             expected_shape=[None, 3, -1, 8]).shape == (1, 3, 8, 8)  # fmt: skip
        with pytest.raises(
            RemoteVAEError, match=r"a tensor of shape \[1, 3, 8, 8\], expected \[1, 3, 64, 64\]"
        ):
            remote_decode(
                stub.url, latent(), output_type="pt", return_type="pt", expected_shape=(1, 3, 64, 64)
            )
        with pytest.raises(RemoteVAEError, match="expected \\[1, 4, 1, 1\\]"):
            remote_encode(stub.url, latent((1, 3, 8, 8)), expected_shape=[1, 4, 1, 1])


def _reply(body: bytes, headers=()) -> Reply:
    return Reply(body, dict(headers), Transfer("http://h:8190/sd15", 200, 0, len(body), 0.0, 1))


def test_reply_checks_in_protocol_terms_and_in_the_callers():
    pixels = torch.zeros(1, 8, 8, 3, dtype=torch.uint8)
    reply = _reply(*protocol.tensor_response(pixels))
    assert torch.equal(reply.tensor([1, 8, 8, 3], dtype=torch.uint8), pixels)
    with pytest.raises(
        RemoteVAEError,
        match=r"answered 200 with a tensor of shape \[1, 8, 8, 3\], expected any shape float32",
    ):
        reply.tensor(dtype=torch.float32)
    with pytest.raises(
        RemoteVAEError, match=r"but it holds uint8 values where floats were asked for \(hint: mine\)"
    ):
        reply.tensor(dtype="float", hint="mine")
    with pytest.raises(
        RemoteVAEError, match=r"but it holds \[1, 8, 8, 3\] uint8 where 2 images were asked for"
    ):
        reply.tensor([2, 8, 8, 3], meaning="2 images were asked for")
    png = _reply(image_bytes("PNG", size=(8, 6)))
    assert png.image((8, 6)).format == "png"
    with pytest.raises(
        RemoteVAEError, match=r"answered 200 with a 8x6 image, expected 16x16 \(hint: the server does not"
    ):
        png.image((16, 16))
    with pytest.raises(
        RemoteVAEError, match=r"answered 200 but it is a 8x6 image where the latent decodes to 16x16"
    ):
        png.image((16, 16), meaning="the latent decodes to 16x16")
    with pytest.raises(
        RemoteVAEError, match=r"not a readable JPEG image \(5 bytes\): .*; it starts b'hello'"
    ):
        _reply(b"hello").image(kind="a readable JPEG image")


def test_partial_postprocess_answer_must_be_uint8_images():
    with recorder(tensor_answer(latent((1, 3, 8, 8)))) as stub:
        with pytest.raises(
            RemoteVAEError, match=r"a float16 tensor of shape \[1, 3, 8, 8\]; partial_postprocess"
        ):
            remote_decode(stub.url, latent(), output_type="pt", partial_postprocess=True)


def test_video_frames_answer_must_be_float_frames():
    with recorder(tensor_answer(torch.zeros(1, 3, 2, 8, 8, dtype=torch.uint8))) as stub:
        with pytest.raises(RemoteVAEError, match="output_type='pil' with a processor should give float"):
            remote_decode(stub.url, latent((1, 16, 2, 1, 1)), processor=VideoProcessor())


# --------------------------------------------------------------------------- input checks


def test_packed_latents_need_height_and_width():
    with recorder(OK) as stub:
        with pytest.raises(
            ValueError, match=r"`height` and `width` required for packed latents: .*\[1, 16, 64\]"
        ):
            remote_decode(stub.url, latent((1, 16, 64)))
        with pytest.raises(ValueError, match="required for packed latents"):
            remote_decode(stub.url, latent((1, 16, 64)), height=32)  # diffusers would send neither
    assert stub.requests == []


def test_audio_latents_go_without_a_size_for_the_raw_tensor_only():
    """An audio latent [B,C,L] takes no height/width; its one answer is output_type="pt" (raw audio)."""
    audio = tensor_answer(torch.zeros(1, 2, 4 * 2048))
    with recorder(audio) as stub:
        got = remote_decode(
            stub.url, latent((1, 64, 4)), output_type="pt", return_type="pt", do_scaling=False
        )
        assert list(got.shape) == [1, 2, 8192]
        for partial in (False, True):  # an image answer of a 3-D latent needs the packed size
            output_type = "pil" if not partial else "pt"
            with pytest.raises(
                ValueError, match=r"`height` and `width` required for packed latents: .*\(audio"
            ):
                remote_decode(
                    stub.url, latent((1, 64, 4)), output_type=output_type, partial_postprocess=partial
                )
    assert len(stub.requests) == 1


def test_base64_warns_and_sends_binary():
    with recorder(OK) as stub:
        with pytest.warns(FutureWarning, match="input_tensor_type='base64' is deprecated. Using `binary`."):
            remote_decode(stub.url, latent(), output_type="pt", return_type="pt", input_tensor_type="base64")
        with pytest.warns(FutureWarning, match="output_tensor_type='base64' is deprecated"):
            remote_decode(stub.url, latent(), output_type="pt", return_type="pt", output_tensor_type="base64")
    assert stub.requests[0].body == stub.requests[1].body == protocol.tensor_to_bytes(latent())
    with pytest.raises(ValueError, match="input_tensor_type='json' is not supported"):
        remote_decode(stub.url, latent(), input_tensor_type="json")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"return_type": "np"}, ValueError, "return_type='np' is not one of pil, pt, mp4"),
        ({"output_type": "latent"}, ValueError, "output_type 'latent' is not one of"),
        ({"image_format": "webp"}, ValueError, "image_format 'webp' is not one of jpg, png"),
        ({"tensor": np.zeros((1, 4, 8, 8))}, TypeError, "tensor must be a torch.Tensor, got ndarray"),
    ],
)
def test_decode_argument_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        remote_decode("http://127.0.0.1:9/", **{"tensor": latent(), **kwargs})


def test_encode_rejects_other_inputs():
    with pytest.raises(TypeError, match="image must be a PIL image or a torch.Tensor, got bytes"):
        remote_encode("http://127.0.0.1:9/", b"\x89PNG")


def test_encode_returns_the_latent():
    answer = tensor_answer(latent((1, 4, 2, 2), torch.bfloat16))
    with recorder(answer) as stub:
        out = remote_encode(stub.url, Image.new("RGB", (16, 16)), scaling_factor=0.18215)
    assert out.dtype == torch.bfloat16 and torch.equal(out, latent((1, 4, 2, 2), torch.bfloat16))


# --------------------------------------------------------------------------- every return combination

VIDEO_FRAMES = 5


def answer_for(output_type, partial, processor, accept):
    """What a correct server answers for each request (small tensors: only the client is under test)."""
    video = isinstance(processor, VideoProcessor)
    gen = torch.Generator().manual_seed(3)
    if accept == "image/jpeg":
        return Canned(200, [("Content-Type", "image/jpeg")], image_bytes("JPEG"))
    if accept == "image/png":
        return Canned(200, [("Content-Type", "image/png")], image_bytes("PNG"))
    if accept == "text/plain":
        return Canned(200, [("Content-Type", "text/plain; charset=utf-8")], MP4)
    if output_type == "pil":  # processor flag: float frames in 0..1
        return tensor_answer(torch.rand(VIDEO_FRAMES, 3, 6, 8, generator=gen).half())
    if partial:  # uint8 NHWC
        rows = VIDEO_FRAMES if video else 2
        return tensor_answer(torch.randint(0, 256, (rows, 6, 8, 3), dtype=torch.uint8, generator=gen))
    shape = (1, 3, VIDEO_FRAMES, 6, 8) if video else (2, 3, 6, 8)
    return tensor_answer((torch.rand(shape, generator=gen) * 2 - 1).half())


PROCESSORS = {"none": None, "image": VaeImageProcessor(), "video": VideoProcessor()}
COMBINATIONS = [
    (o, r, p, proc)
    for o in ("pil", "pt", "mp4")
    for r in ("pil", "pt", "mp4")
    for p in (False, True)
    for proc in PROCESSORS
]


def _call_diffusers(url, tensor, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            return "ok", remote_utils.remote_decode(url, tensor, **kwargs)
        except ValueError as exc:
            return "ValueError", exc
        except UnboundLocalError as exc:
            return "crash", exc


@pytest.mark.parametrize(("output_type", "return_type", "partial", "processor_name"), COMBINATIONS)
def test_return_combination_matches_diffusers(output_type, return_type, partial, processor_name):
    """Where diffusers returns, we return the same; where it crashes, we do the documented thing."""
    processor = PROCESSORS[processor_name]
    tensor = latent((1, 16, 2, 1, 1) if processor_name == "video" else (1, 4, 1, 1))
    accept = protocol.decode_accept(output_type, "jpg", processor is not None)
    answer = answer_for(output_type, partial, processor, accept)
    kwargs = {"processor": processor, "output_type": output_type, "return_type": return_type,
              "partial_postprocess": partial, "do_scaling": False}  # fmt: skip
    with recorder(answer) as stub:
        outcome, theirs = _call_diffusers(stub.url, tensor, **kwargs)
        diffusers_requests = len(stub.requests)
        try:
            ours = remote_decode(stub.url, tensor, **kwargs, retries=0)
        except ValueError as exc:
            ours = exc
        our_requests = len(stub.requests) - diffusers_requests

    if outcome == "ok":
        assert_same(theirs, ours)
        assert our_requests == 1
    elif outcome == "ValueError":  # diffusers' input checks: same exception type, nothing sent
        assert isinstance(ours, ValueError) and "`processor` is required" in str(ours)
        assert (diffusers_requests, our_requests) == (0, 0)
    else:  # diffusers crashed after the round trip with UnboundLocalError
        assert diffusers_requests == 1
        if output_type == "mp4":
            assert ours == MP4
        elif output_type == "pil" and processor is None and return_type == "pt":
            expected = np.asarray(Image.open(io.BytesIO(answer.body)).convert("RGB"))
            assert ours.dtype == torch.uint8 and ours.shape == (1, *expected.shape)
            assert np.array_equal(ours[0].numpy(), expected)
        else:
            assert return_type == "mp4"
            assert isinstance(ours, ValueError) and "return_type='mp4' needs output_type='mp4'" in str(ours)
            assert our_requests == 0


def test_combinations_cover_the_documented_crashes():
    """The matrix above must include every diffusers crash listed in hf-protocol.md section 7."""
    crashes = {
        ("mp4", "pil", False, "none"),
        ("pil", "pt", False, "none"),
        ("pil", "mp4", False, "video"),
        ("pt", "mp4", True, "none"),
    }
    assert crashes <= set(COMBINATIONS)


def test_single_pil_image_is_unwrapped_like_diffusers():
    answer = tensor_answer(torch.randint(0, 256, (1, 6, 8, 3), dtype=torch.uint8))
    with recorder(answer) as stub:
        out = remote_decode(stub.url, latent(), output_type="pt", partial_postprocess=True)
    assert isinstance(out, Image.Image) and out.size == (8, 6)


def test_pil_output_format_is_lowercase_sniffed():
    for fmt, name in (("JPEG", "jpeg"), ("PNG", "png"), ("BMP", "bmp"), ("GIF", "gif"), ("WEBP", "unknown")):
        with recorder(Canned(200, [], image_bytes(fmt))) as stub:
            assert remote_decode(stub.url, latent()).format == name
