"""Metrics and request ids."""

import logging

import requests

from support.one_model import hosting, pt, z
from support.serving import error_of, post_decode


def test_metrics_and_request_ids(vae, caplog):
    with hosting(vae) as url, caplog.at_level(logging.INFO, logger="remote_vae.server"):
        ok = pt(url, z(1, 4, 8, 8), headers={"X-Request-ID": "abc-123"})
        assert ok.headers["x-request-id"] == "abc-123"
        generated = pt(url, z(1, 4, 8, 8), headers={"X-Request-ID": "bad id with spaces"}).headers[
            "x-request-id"
        ]
        assert generated != "bad id with spaces" and len(generated) == 16
        error_of(post_decode(url + "/sd15", z(1, 16, 8, 8), output_type="pt", do_scaling=False), 400)
        text = requests.get(url + "/metrics", timeout=10).text
    assert 'remote_vae_requests_total{model="sd15",op="decode",outcome="ok",status="200"} 2' in text
    assert 'remote_vae_requests_total{model="sd15",op="decode",outcome="client_error",status="400"} 1' in text
    for name in ("queue", "compute", "render", "request"):
        assert f'remote_vae_{name}_seconds_count{{model="sd15",op="decode"}}' in text
    assert 'remote_vae_bytes_in_total{model="sd15"} ' in text and "remote_vae_queue_depth 0" in text
    line = next(r.getMessage() for r in caplog.records if "abc-123" in r.getMessage())
    assert "sd15 decode shape=[1, 4, 8, 8] status=200" in line and "compute=" in line
