"""Bearer-token auth on the job routes, and CORS only when configured."""

import logging

import requests

from remote_vae.local_server.app import Settings
from remote_vae.remote import protocol
from remote_vae.remote.client import send
from support.one_model import hosting, pt, z
from support.serving import error_of


def test_bearer_token_is_required_except_for_health(vae, caplog):
    with hosting(vae, Settings(token="s3cret-token")) as url, caplog.at_level(logging.DEBUG):
        answer = pt(url, z(1, 4, 8, 8))
        assert "missing or wrong bearer token" in error_of(answer, 401)
        assert answer.headers["www-authenticate"] == "Bearer"
        error_of(pt(url, z(1, 4, 8, 8), headers={"Authorization": "Bearer nope"}), 401)
        assert requests.get(url + "/health", timeout=10).status_code == 200
        assert requests.get(url + "/metrics", timeout=10).status_code == 401
        assert requests.get(url + "/v1/models", timeout=10).status_code == 401
        wire = protocol.build_decode_request(z(1, 4, 8, 8), output_type="pt", do_scaling=False)
        reply = send(url + "/sd15", wire, token="s3cret-token")
        assert reply.tensor().shape == (1, 3, 64, 64)
    assert "s3cret-token" not in caplog.text


def test_refused_tokens_are_counted_and_logged_on_job_routes_only(vae, caplog):
    with (
        hosting(vae, Settings(token="s3cret-token")) as url,
        caplog.at_level(logging.INFO, logger="remote_vae.server"),
    ):
        refused = pt(url, z(1, 4, 8, 8), headers={"X-Request-ID": "no-token-1"})
        assert error_of(refused, 401) and refused.headers["x-request-id"] == "no-token-1"
        assert "x-request-id" not in requests.get(url + "/metrics", timeout=10).headers
        text = requests.get(
            url + "/metrics", headers={"Authorization": "Bearer s3cret-token"}, timeout=10
        ).text
    assert 'remote_vae_rejected_total{reason="auth"} 1' in text
    assert 'remote_vae_requests_total{model="-",op="-",outcome="client_error",status="401"} 1' in text
    assert any("no-token-1 - - shape=[] status=401" in r.getMessage() for r in caplog.records)


def test_cors_only_when_configured(vae):
    origin = {"Origin": "https://app.example"}
    with hosting(vae) as url:
        assert (
            "access-control-allow-origin"
            not in requests.get(url + "/health", headers=origin, timeout=10).headers
        )
    with hosting(vae, Settings(cors_origins=["https://app.example"])) as url:
        answer = requests.get(url + "/health", headers=origin, timeout=10)
    assert answer.headers["access-control-allow-origin"] == "https://app.example"
