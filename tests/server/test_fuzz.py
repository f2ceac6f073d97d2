"""Property-based fuzzing of the server's input: malformed requests get a 4xx JSON answer, never a
5xx, a crash or a hang, and the server keeps answering /health afterwards."""

import math
import struct

import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

DTYPES = ["float16", "bfloat16", "float32", "uint8", "float64", "int8", "", "FLOAT16", "bool"]
CONTENT_TYPES = [
    None,
    "tensor/binary",
    "application/octet-stream",
    "image/png",
    "text/plain",
    "application/json",
    "tensor/base64",
    "multipart/form-data",
]
KEYS = ["shape", "dtype", "output_type", "image_format", "partial_postprocess", "scaling_factor", "shift_factor",
        "do_scaling", "height", "width", "output_dtype", "fps", "jpeg_quality", "tile", "tile_size", "junk"]  # fmt: skip
VALUES = st.one_of(
    st.integers(-(2**40), 2**40).map(str),
    st.sampled_from(
        ["True", "false", "nan", "inf", "-1", "0", "1e400", "pt", "pil", "mp4", "png", "jpg", "latent", ""]
    ),
    st.text(max_size=12),
)

settings.register_profile(
    "server-fuzz", deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def shape_params(draw_shape):
    return [("shape", str(d)) for d in draw_shape]


@st.composite
def requests_(draw):
    shape = draw(st.lists(st.integers(-4, 70000), min_size=0, max_size=6))
    dtype = draw(st.sampled_from(DTYPES))
    params = shape_params(shape) + ([("dtype", dtype)] if dtype else [])
    params += draw(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=6))
    count = math.prod(d for d in shape if d > 0) if shape else 0
    size_hint = count * (2 if "16" in dtype else 4) if 0 < count < 4096 else draw(st.integers(0, 4096))
    length = draw(st.sampled_from([size_hint, max(0, size_hint - 1), size_hint + 3, 0]))
    fill = draw(st.sampled_from([b"\x00", b"\xff", struct.pack("<f", float("nan")), b"\x3c\x00"]))
    body = (fill * (length // len(fill) + 1))[:length]
    headers = {}
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    if content_type:
        headers["Content-Type"] = content_type
    headers["Accept"] = draw(
        st.sampled_from(["tensor/binary", "image/jpeg", "image/png", "text/plain", "*/*", "application/xml"])
    )
    path = draw(
        st.sampled_from(
            [
                "/",
                "/sd15",
                "/flux",
                "/hunyuan_video",
                "/wan21",
                "/predict",
                "/sd15/decode",
                "/sd15/encode",
                "/nope",
            ]
        )
    )
    return path, params, headers, body


@settings(settings.get_profile("server-fuzz"), max_examples=250)
@given(request=requests_())
def test_malformed_requests_get_a_client_error(server, request):
    path, params, headers, body = request
    response = requests.post(server + path, params=params, headers=headers, data=body, timeout=60)
    assert response.status_code < 500, (
        response.status_code,
        response.text[:300],
        path,
        params,
        headers,
        len(body),
    )
    if response.status_code >= 400:
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"]


@settings(settings.get_profile("server-fuzz"), max_examples=60)
@given(
    body=st.binary(max_size=2048),
    with_magic=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF"]),
)
def test_garbage_encode_bodies_get_a_client_error(server, body, with_magic):
    response = requests.post(server + "/sd15/encode", data=with_magic + body, timeout=60)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert response.json()["error"]


def test_server_still_healthy_after_fuzzing(server):
    assert requests.get(server + "/health", timeout=10).status_code == 200
