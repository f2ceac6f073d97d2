"""Server building blocks that need no model: metrics text, token checks, limits."""

import pytest

from remote_vae.local_server.auth import TokenError, is_authorized, load_token
from remote_vae.local_server.limits import LimitExceeded, Limits
from remote_vae.local_server.metrics import Metrics, server_metrics


def test_metrics_render_in_prometheus_text_format():
    r = Metrics()
    r.counter("jobs_total", "Jobs.", ("model", "outcome"))
    r.histogram("latency_seconds", "Latency.", ("model",), buckets=(0.1, 1.0))
    r.gauge("depth", "Depth.")
    r.inc("jobs_total", model="sd15", outcome="ok")
    r.inc("jobs_total", 2, model="sd15", outcome="ok")
    r.observe("latency_seconds", 0.5, model='a"b')
    r.observe("latency_seconds", 0.05, model='a"b')
    r.set("depth", 3)
    assert r.render() == (
        "# HELP jobs_total Jobs.\n# TYPE jobs_total counter\n"
        'jobs_total{model="sd15",outcome="ok"} 3\n'
        "# HELP latency_seconds Latency.\n# TYPE latency_seconds histogram\n"
        'latency_seconds_bucket{model="a\\"b",le="0.1"} 1\n'
        'latency_seconds_bucket{model="a\\"b",le="1"} 2\n'
        'latency_seconds_bucket{model="a\\"b",le="+Inf"} 2\n'
        'latency_seconds_sum{model="a\\"b"} 0.55\n'
        'latency_seconds_count{model="a\\"b"} 2\n'
        "# HELP depth Depth.\n# TYPE depth gauge\ndepth 3\n"
    )


def test_metrics_reject_wrong_labels():
    r = server_metrics()
    with pytest.raises(ValueError, match="takes labels"):
        r.inc("remote_vae_bytes_in_total", model="x", extra="y")


def test_token_from_env_and_file(tmp_path, monkeypatch):
    monkeypatch.delenv("REMOTE_VAE_SERVER_TOKEN", raising=False)
    assert load_token() is None
    monkeypatch.setenv("REMOTE_VAE_SERVER_TOKEN", " s3cret \n")
    assert load_token() == "s3cret"
    path = tmp_path / "token"
    path.write_text("from-file\n")
    assert load_token(str(path)) == "from-file"
    path.write_text("   ")
    with pytest.raises(TokenError, match="is empty"):
        load_token(str(path))
    with pytest.raises(TokenError, match="cannot read token file"):
        load_token(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        ("Bearer s3cret", True),
        ("bearer s3cret", True),
        ("Bearer wrong", False),
        ("s3cret", False),
        (None, False),
        ("Basic s3cret", False),
    ],
)
def test_bearer_check(header, ok):
    assert is_authorized("s3cret", header) is ok
    assert is_authorized(None, header) is True


def test_limits_name_the_limit():
    limits = Limits(
        max_pixels=1024 * 1024, max_frames=9, max_batch_pixels=2 * 1024 * 1024, max_request_bytes=100
    )
    limits.check_body(100)
    limits.check_output(2, 1, 1024, 1024)
    with pytest.raises(LimitExceeded, match="101 bytes exceeds the server's limit of 100 bytes"):
        limits.check_body(101)
    with pytest.raises(
        LimitExceeded, match="2048x1024 = 2097152 pixels per image exceeds .* 1048576"
    ) as info:
        limits.check_output(1, 1, 1024, 2048)
    assert info.value.status == 413
    with pytest.raises(LimitExceeded, match="13 frames exceed the server's limit of 9 frames"):
        limits.check_output(1, 13, 64, 64)
    with pytest.raises(LimitExceeded, match="a batch of 3 x 1024x1024"):
        limits.check_output(3, 1, 1024, 1024)
