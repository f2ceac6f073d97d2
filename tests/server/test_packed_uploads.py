"""Packed uploads (our content coding, remote/planes.py) through the real server over HTTP: the same
answer as the plain body, for decode and encode, in every float dtype; every refusal, and /v1/models."""

import io

import pytest
import requests
import torch
from PIL import Image

from remote_vae.local_server.app import Settings
from remote_vae.remote import planes, protocol
from support.serving import error_of, hosting, post

ENCODING = planes.ENCODING


def latent(dtype: torch.dtype = torch.float32, shape=(1, 4, 32, 32)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)


def decode_wire(z: torch.Tensor) -> protocol.WireRequest:
    return protocol.build_decode_request(z, output_type="pt", do_scaling=False)


def packed(wire: protocol.WireRequest, itemsize: int) -> protocol.WireRequest:
    out = planes.packed(wire, itemsize)
    assert out.headers["Content-Encoding"] == ENCODING and len(out.body) < len(wire.body)
    return out


@pytest.fixture(scope="module")
def url(vae):
    with hosting({"sd15": ("sd15", vae)}) as (base, _):
        yield base + "/sd15"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_packed_latent_decodes_as_the_plain_one(url, dtype):
    wire = decode_wire(latent(dtype))
    plain = post(url, wire)
    assert plain.status_code == 200, plain.text
    answer = post(url, packed(wire, dtype.itemsize))
    assert answer.status_code == 200, answer.text
    assert answer.content == plain.content and answer.headers["shape"] == plain.headers["shape"]


def test_packed_float_pixels_encode_as_the_plain_ones(url):
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    wire = protocol.build_encode_request(pixels)
    plain = post(url, wire)
    assert plain.status_code == 200, plain.text
    answer = post(url, packed(wire, 4))
    assert answer.status_code == 200, answer.text
    assert answer.content == plain.content


def test_identity_is_a_plain_body(url):
    wire = decode_wire(latent())
    assert post(url, wire, headers={"Content-Encoding": "identity"}).content == post(url, wire).content


def test_models_list_what_the_server_unpacks(vae):
    with hosting({"sd15": ("sd15", vae)}) as (base, _):
        assert requests.get(base + "/v1/models", timeout=10).json()["upload_encodings"] == [ENCODING]
    with hosting({"sd15": ("sd15", vae)}, Settings(upload_encodings=())) as (base, _):
        assert requests.get(base + "/v1/models", timeout=10).json()["upload_encodings"] == []


def test_an_unknown_coding_is_415_before_the_body_is_read(url):
    response = post(url, decode_wire(latent()), headers={"Content-Encoding": "gzip"})
    assert error_of(response, 415) == (
        f"Content-Encoding 'gzip' is not one this server unpacks; send the body as it is or packed as "
        f"{ENCODING} (GET /v1/models: upload_encodings)"
    )


def test_a_server_that_does_not_unpack(vae):
    wire = packed(decode_wire(latent()), 4)
    with hosting({"sd15": ("sd15", vae)}, Settings(upload_encodings=())) as (base, _):
        message = error_of(post(base + "/sd15", wire), 415)
    assert message == f"Content-Encoding '{ENCODING}' is not one this server unpacks; send the body as it is"


def png_wire() -> protocol.WireRequest:
    image = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(image, format="PNG")
    return protocol.build_encode_request(image.getvalue())


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        pytest.param(
            png_wire(),
            f"Content-Encoding {ENCODING} packs tensor bodies (shape and dtype in the query); "
            "send an image file as it is",
            id="an image file is never packed",
        ),
        pytest.param(
            decode_wire(latent()),
            f"a {ENCODING} body of 16384 bytes is no smaller than the 16384 bytes of shape [1, 4, 32, 32] with "
            "dtype float32; send it as it is",
            id="a packed body no smaller than its tensor",
        ),
    ],
)
def test_refused_from_the_headers(url, wire, message):
    assert error_of(post(url, wire, headers={"Content-Encoding": ENCODING}), 400) == message


def test_a_chunked_packed_body_no_smaller_than_the_tensor(url):
    """Without a Content-Length the size is checked once the body has arrived."""
    wire = decode_wire(latent())
    response = requests.post(
        url,
        params=wire.params,
        headers={**wire.headers, "Content-Encoding": ENCODING},
        data=iter([wire.body[:8192], wire.body[8192:]]),  # a generator: sent chunked
        timeout=60,
    )
    assert "content-length" not in {k.lower() for k in response.request.headers}
    assert error_of(response, 400).startswith(f"a {ENCODING} body of 16384 bytes is no smaller than")


def test_a_packed_body_that_is_not_zstd(url):
    wire = decode_wire(latent())
    response = post(
        url, protocol.WireRequest(wire.params, {**wire.headers, "Content-Encoding": ENCODING}, b"x" * 99)
    )
    assert error_of(response, 400).startswith(
        f"the {ENCODING} body of 99 bytes does not decode to the 16384 bytes its shape and dtype declare: "
    )


def test_a_packed_body_of_another_tensor(url):
    """Fewer bytes than declared, or more: a body that would inflate past the declared tensor stops there."""
    wire = decode_wire(latent())
    for size, message in (
        (8192, f"the {ENCODING} body decodes to 8192 bytes, but its shape and dtype declare 16384"),
        (64 << 20, f"the {ENCODING} body of "),
    ):
        body = planes.pack(bytes(size), 4)
        request = protocol.WireRequest(wire.params, {**wire.headers, "Content-Encoding": ENCODING}, body)
        assert error_of(post(url, request), 400).startswith(message)


def test_the_server_answers_after_refusals(url):
    wire = decode_wire(latent())
    assert post(url, packed(wire, 4)).content == post(url, wire).content
