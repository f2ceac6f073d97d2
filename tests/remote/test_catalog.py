"""A hosted model as its server describes it (GET /v1/models): URL -> server and model, the geometry read
from the list, and errors that say what is wrong (no server, no model list, no such model, a token)."""

from __future__ import annotations

import json

import pytest

from remote_vae.remote import catalog, tokens
from remote_vae.remote.catalog import ServerModel, describe_model, split_model_url
from remote_vae.remote.errors import RemoteVAEError
from remote_vae.remote.tokens import TokenStore
from support import stub_servers
from support.stub_servers import Canned

WAN = {
    "name": "wan_2.1_vae",
    "backend": "comfy",
    "geometry": {"dims": "video", "latent_channels": 16, "spatial_compression": 8, "temporal_compression": 4,
                 "output_channels": 3, "sample_rate": None, "still_image": False},
}  # fmt: skip
AUDIO = {
    "name": "stable_audio",
    "backend": "comfy",
    "geometry": {"dims": "audio", "latent_channels": 64, "spatial_compression": 2048, "temporal_compression": 1,
                 "output_channels": 2, "sample_rate": 44100, "still_image": False},
}  # fmt: skip
# A server from before the comfy backend: shapes only in the preset.
OLD_SD15 = {"name": "sd15", "preset": {"name": "sd15", "latent_channels": 4, "dims": 2, "spatial_compression": 8,
                                       "temporal_compression": 1}}  # fmt: skip


def listing(*models: dict, default: str | None = None, **server) -> Canned:
    body = {
        "default": default if default is not None else models[0]["name"],
        "models": list(models),
        **server,
    }
    return Canned(200, [("Content-Type", "application/json")], json.dumps(body).encode())


@pytest.mark.parametrize(
    ("url", "base", "model"),
    [
        ("http://gpu:8190/sd15", "http://gpu:8190", "sd15"),
        ("http://gpu:8190/sd15/", "http://gpu:8190", "sd15"),
        ("http://gpu:8190/sd15/decode", "http://gpu:8190", "sd15"),
        ("https://gpu/vae/flux/encode?x=1", "https://gpu/vae", "flux"),
        ("http://gpu:8190/predict", "http://gpu:8190", None),
        ("http://gpu:8190", "http://gpu:8190", None),
    ],
)
def test_a_model_url_names_a_server_and_a_model(url, base, model):
    assert split_model_url(url) == (base, model)


def test_geometry_is_read_from_the_model_list():
    with stub_servers.recorder(listing(OLD_SD15, WAN, AUDIO)) as stub:
        wan = describe_model(stub.url + "wan_2.1_vae", tokens=TokenStore())
        audio = describe_model(stub.url + "stable_audio/decode", tokens=TokenStore())
        default = describe_model(stub.url.rstrip("/"), tokens=TokenStore())
    assert wan == ServerModel("wan_2.1_vae", stub.url.rstrip("/"), "comfy", "video", 16, 8, 4, 3, None, False)
    assert [r.path for r in stub.requests] == ["/v1/models"] * 3
    assert (audio.dims, audio.latent_channels, audio.output_channels, audio.sample_rate) == (
        "audio",
        64,
        2,
        44100,
    )
    assert (default.name, default.dims, default.backend) == ("sd15", "image", "diffusers")  # from its preset
    preset = wan.preset()
    assert (preset.name, preset.latent_channels, preset.dims, preset.spatial_compression) == (
        "wan_2.1_vae",
        16,
        3,
        8,
    )
    assert preset.frames_for(2) == 5 and not preset.uses_mean_std  # raw latents: no scaling factors


@pytest.mark.parametrize(
    ("server", "codecs", "encodings"),
    [
        ({}, (), ()),  # a server from before the extensions
        ({"codecs": ["h264rgb", "png", "jxl"], "upload_encodings": ["x-remote-vae-zstd-planes", "br"]},
         ("jxl", "h264rgb"), ("x-remote-vae-zstd-planes", "br")),
        ({"codecs": "jxl", "upload_encodings": "x-remote-vae-zstd-planes"}, (), ()),  # not lists: nothing
        ({"upload_encodings": [1, None, "x-remote-vae-zstd-planes"]}, (), ("x-remote-vae-zstd-planes",)),
    ],
)  # fmt: skip
def test_what_the_server_compresses_and_unpacks_is_read_from_the_list(server, codecs, encodings):
    with stub_servers.recorder(listing(WAN, **server)) as stub:
        wan = describe_model(stub.url + "wan_2.1_vae", tokens=TokenStore())
    assert (wan.codecs, wan.upload_encodings) == (codecs, encodings)


def test_a_described_model_is_known_without_asking_again():
    """A node run describes its server (preset auto), then asks what the server offers: one request."""
    catalog.forget_known_models()
    try:
        with stub_servers.recorder(listing(WAN, codecs=["jxl"])) as stub:
            described = describe_model(stub.url + "wan_2.1_vae", tokens=TokenStore())
            known = catalog.known_model(stub.url + "wan_2.1_vae", tokens=TokenStore())
        assert known == described and known.codecs == ("jxl",)
        assert [r.path for r in stub.requests] == ["/v1/models"]
    finally:
        catalog.forget_known_models()


def test_a_model_the_server_does_not_host_is_named_with_the_hosted_ones():
    with stub_servers.recorder(listing(OLD_SD15, WAN)) as stub, pytest.raises(RemoteVAEError) as caught:
        describe_model(stub.url + "flux", tokens=TokenStore())
    assert caught.value.status == 404
    assert "model 'flux' is not hosted there; hosted models: /sd15, /wan_2.1_vae" in str(caught.value)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (
            stub_servers.json_error(404, "POST /v1/models: Not Found"),
            "answered 404: POST /v1/models: Not Found",
        ),
        (Canned(200, [], b"Ok"), "answered 200 with something that is not a JSON model list"),
        (Canned(200, [], b'{"data": []}'), "answered 200 without a model list"),
        (Canned(200, [], b"[" * 2_000_000), "answered more than 1048576 bytes: not a model list"),
    ],
)
def test_an_endpoint_without_a_model_list_says_it_needs_our_server(answer, message):
    with stub_servers.recorder(answer) as stub, pytest.raises(RemoteVAEError, match=message) as caught:
        describe_model(stub.url + "sd15", tokens=TokenStore())
    assert caught.value.status in (200, 404)
    assert catalog.NEEDS_OUR_SERVER in str(caught.value)


def test_an_entry_without_a_usable_geometry_is_an_error():
    broken = {**WAN, "geometry": {**WAN["geometry"], "latent_channels": 0}}
    with (
        stub_servers.recorder(listing(broken)) as stub,
        pytest.raises(RemoteVAEError, match="usable geometry"),
    ):
        describe_model(stub.url + "wan_2.1_vae", tokens=TokenStore())


def test_the_token_bound_to_the_server_is_sent_and_a_refusal_says_how_to_bind_one(monkeypatch):
    refused = stub_servers.json_error(401, "missing or wrong bearer token")
    with stub_servers.recorder(refused) as stub:
        with pytest.raises(
            RemoteVAEError, match=r"answered 401.*Settings > Remote VAE|answered 401.*REMOTE_VAE_TOKENS"
        ):
            describe_model(stub.url + "sd15", tokens=TokenStore())
        monkeypatch.setenv(tokens.TOKENS_ENV, f"{stub.url.rstrip('/')}=s3cret-token")
        with pytest.raises(RemoteVAEError, match="refused the token"):
            describe_model(stub.url + "sd15", tokens=TokenStore.load())
    assert stub.requests[0].header("Authorization") is None
    assert stub.requests[1].header("Authorization") == "Bearer s3cret-token"


def test_several_endpoints_the_first_that_answers_describes_the_model():
    with stub_servers.recorder(listing(WAN)) as stub:
        model = describe_model(
            f"{stub_servers.refused_url()}wan_2.1_vae, {stub.url}wan_2.1_vae", tokens=TokenStore()
        )
    assert model.server == stub.url.rstrip("/")


def test_no_server_at_all_is_a_connection_error():
    url = stub_servers.refused_url() + "sd15"
    with pytest.raises(RemoteVAEError, match="refused the connection.*is the server running at") as caught:
        describe_model(url, tokens=TokenStore())
    assert caught.value.status is None
