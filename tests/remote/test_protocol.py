"""The wire codec: golden requests (hf-protocol.md sections 2.4 and 3.1), byte-for-byte parity with
diffusers' own client, tensor bytes, response headers and the server-side query coercions."""

from __future__ import annotations

import io
import json
import re
import warnings

import numpy as np
import pytest
import requests
import safetensors.torch
import torch
from diffusers.utils import remote_utils
from diffusers.video_processor import VideoProcessor
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from remote_vae.remote import client, protocol
from remote_vae.remote.protocol import ProtocolError
from support.compare import assert_same
from support.stub_servers import Canned, recorder, tensor_answer

pytestmark = pytest.mark.timeout(120)

HF = "https://{}.us-east-1.aws.endpoints.huggingface.cloud/"
SD15, FLUX, HUNYUAN = (
    HF.format("q1bj3bpq6kzilnsu"),
    HF.format("whhx50ex1aryqvw6"),
    HF.format("o7ywnmrahorts457"),
)
SD15_ENCODE = HF.format("qc6479g0aac6qwy9")


def latent(shape, dtype, seed=13):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def jpeg_bytes(size=(8, 8), fmt="JPEG"):
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(buffer, format=fmt)
    return buffer.getvalue()


MP4 = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + b"\x00" * 64

# (id, endpoint, shape, dtype, build_decode_request kwargs, golden query, Accept, body bytes)
GOLDEN_DECODE = [
    (
        "sd15-defaults",
        SD15,
        (1, 4, 64, 64),
        torch.float16,
        {"scaling_factor": 0.18215},
        "image_format=jpg&output_type=pil&partial_postprocess=False&shape=1&shape=4&shape=64&shape=64"
        "&dtype=float16&scaling_factor=0.18215",
        "image/jpeg",
        32768,
    ),
    (
        "flux-packed-pt",
        FLUX,
        (1, 4096, 64),
        torch.bfloat16,
        {
            "output_type": "pt",
            "partial_postprocess": True,
            "scaling_factor": 0.3611,
            "shift_factor": 0.1159,
            "height": 1024,
            "width": 1024,
        },
        "image_format=jpg&output_type=pt&partial_postprocess=True&shape=1&shape=4096&shape=64&dtype=bfloat16"
        "&scaling_factor=0.3611&shift_factor=0.1159&height=1024&width=1024",
        "tensor/binary",
        524288,
    ),
    (
        "hunyuan-mp4-do-scaling",
        HUNYUAN,
        (1, 16, 3, 40, 64),
        torch.float16,
        {"output_type": "mp4"},
        "image_format=jpg&output_type=mp4&partial_postprocess=False&shape=1&shape=16&shape=3&shape=40&shape=64"
        "&dtype=float16&do_scaling=True",
        "text/plain",
        245760,
    ),
    (
        "no-scaling-pt",
        SD15,
        (1, 4, 64, 64),
        torch.float16,
        {"output_type": "pt", "do_scaling": False},
        "image_format=jpg&output_type=pt&partial_postprocess=False&shape=1&shape=4&shape=64&shape=64&dtype=float16",
        "tensor/binary",
        32768,
    ),
    (
        "video-pil-processor-flag",
        HUNYUAN,
        (1, 16, 3, 40, 64),
        torch.float16,
        {"scaling_factor": 0.476986, "processor_flag": True},
        "image_format=jpg&output_type=pil&partial_postprocess=False&shape=1&shape=16&shape=3&shape=40&shape=64"
        "&dtype=float16&scaling_factor=0.476986",
        "tensor/binary",
        245760,
    ),
]

ENCODE_GOLDEN_QUERY = "scaling_factor=0.18215&shape=1&shape=3&shape=512&shape=512&dtype=float16"


def url_of(endpoint: str, wire: protocol.WireRequest) -> str:
    """The URL requests builds from our params (what goes on the request line)."""
    return requests.Request("POST", endpoint, params=wire.params).prepare().url


# --------------------------------------------------------------------------- golden requests


@pytest.mark.parametrize("case", GOLDEN_DECODE, ids=[c[0] for c in GOLDEN_DECODE])
def test_golden_decode_request(case):
    _, endpoint, shape, dtype, kwargs, query, accept, nbytes = case
    tensor = latent(shape, dtype)
    wire = protocol.build_decode_request(tensor, **kwargs)
    assert url_of(endpoint, wire) == f"{endpoint}?{query}"
    assert wire.headers == {"Content-Type": "tensor/binary", "Accept": accept}
    assert len(wire.body) == nbytes
    assert wire.body == protocol.tensor_to_bytes(tensor)


@pytest.mark.parametrize(
    ("output_type", "image_format", "flag", "accept"),
    [
        ("pil", "jpg", False, "image/jpeg"),
        ("pil", "png", False, "image/png"),
        ("pil", "jpg", True, "tensor/binary"),
        ("pil", "png", True, "tensor/binary"),
        ("pt", "jpg", False, "tensor/binary"),
        ("pt", "png", True, "tensor/binary"),
        ("mp4", "jpg", False, "text/plain"),
        ("mp4", "png", True, "text/plain"),
    ],
)
def test_accept_table(output_type, image_format, flag, accept):
    assert protocol.decode_accept(output_type, image_format, flag) == accept


def test_golden_encode_request_tensor():
    image = latent((1, 3, 512, 512), torch.float16)
    wire = protocol.build_encode_request(image, scaling_factor=0.18215)
    assert url_of(SD15_ENCODE, wire) == f"{SD15_ENCODE}?{ENCODE_GOLDEN_QUERY}"
    assert wire.headers == {}
    assert len(wire.body) == 1 * 3 * 512 * 512 * 2


def test_encode_request_image_bytes_has_no_shape():
    png = jpeg_bytes(fmt="PNG")
    wire = protocol.build_encode_request(png, scaling_factor=0.3611, shift_factor=0.1159)
    assert wire.params == [("scaling_factor", "0.3611"), ("shift_factor", "0.1159")]
    assert wire.body == png and wire.headers == {}


def test_decode_edge_case_shift_without_scale_sends_both():
    wire = protocol.build_decode_request(latent((1, 16, 8, 8), torch.float32), shift_factor=0.1159)
    assert wire.params[-2:] == [("shift_factor", "0.1159"), ("do_scaling", "True")]


def test_decode_height_width_only_when_both_given():
    tensor = latent((1, 4, 8, 8), torch.float32)
    assert "height" not in dict(protocol.build_decode_request(tensor, height=64).params)
    params = protocol.build_decode_request(tensor, height=64, width=32).params
    assert params[-2:] == [("height", "64"), ("width", "32")]


def test_extension_params_come_after_hf_ones_and_drop_defaults():
    tensor = latent((1, 4, 8, 8), torch.float32)
    wire = protocol.build_decode_request(
        tensor, do_scaling=False, extensions=protocol.Extensions(output_dtype="float32", tile="on", fps=None)
    )
    assert wire.params[-3:] == [("dtype", "float32"), ("output_dtype", "float32"), ("tile", "on")]
    assert protocol.build_decode_request(tensor, extensions=protocol.Extensions()).params == (
        protocol.build_decode_request(tensor).params
    )


def test_extensions_round_trip_in_field_order():
    ext = protocol.Extensions("bfloat16", 12, 90, "off", 32, "comfyui")
    assert ext.params() == [
        ("output_dtype", "bfloat16"), ("fps", "12"), ("jpeg_quality", "90"),
        ("tile", "off"), ("tile_size", "32"), ("reference", "comfyui"),
    ]  # fmt: skip
    assert protocol.Extensions.parse(protocol.parse_query(ext.params())) == ext
    assert protocol.Extensions.parse({"tile": [" ON "], "reference": ["ComfyUI"]}) == protocol.Extensions(
        tile="on", reference="comfyui"
    )


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"output_dtype": ["uint8"]}, "output_dtype='uint8' is not one of float16, bfloat16, float32"),
        ({"tile": ["True"]}, "tile='True' is not one of auto, on, off"),
        ({"tile_size": ["-3"]}, "tile_size=-3 must be between 16 and 1024 latent pixels"),
        ({"fps": ["0"]}, "fps=0 must be at least 1"),
        ({"reference": ["blender"]}, "reference='blender' is not one of diffusers, comfyui"),
    ],
)
def test_bad_extension_values_name_the_value(query, message):
    with pytest.raises(protocol.ProtocolError, match=re.escape(message)):
        protocol.Extensions.parse(query)


@pytest.mark.parametrize(
    ("content_type", "operation"),
    [
        ("tensor/binary", "decode"),
        ("application/octet-stream; x=1", "decode"),
        (None, "encode"),
        ("image/png", "encode"),
    ],
)
def test_operation_follows_content_type(content_type, operation):
    assert protocol.operation_for(content_type) == operation


def test_unknown_content_type_is_refused():
    with pytest.raises(protocol.ProtocolError, match="Content-Type 'text/html' is not supported"):
        protocol.operation_for("text/html")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"output_type": "latent"}, "output_type 'latent' is not one of pil, pt, mp4"),
        ({"image_format": "webp"}, "image_format 'webp' is not one of jpg, png"),
    ],
)
def test_build_decode_rejects_bad_options(kwargs, message):
    with pytest.raises(ProtocolError, match=message):
        protocol.build_decode_request(latent((1, 4, 8, 8), torch.float32), **kwargs)


def test_build_rejects_unsendable_dtype():
    with pytest.raises(
        ProtocolError, match=r"dtype torch.float64 cannot be sent; supported: float16, bfloat16"
    ):
        protocol.build_decode_request(torch.zeros(1, 4, 8, 8, dtype=torch.float64))


# --------------------------------------------------------------------------- parity with diffusers' client


def _diffusers_decode_kwargs(kwargs):
    out = {k: v for k, v in kwargs.items() if k != "processor_flag"}
    if kwargs.get("processor_flag"):
        out["processor"] = VideoProcessor()
    return out


def _answer_for(case_id):
    if case_id == "sd15-defaults":
        return Canned(200, [("Content-Type", "image/jpeg")], jpeg_bytes())
    if case_id == "flux-packed-pt":
        return tensor_answer(torch.randint(0, 256, (1, 8, 8, 3), dtype=torch.uint8))
    if case_id == "hunyuan-mp4-do-scaling":
        return Canned(200, [("Content-Type", "text/plain; charset=utf-8")], MP4)
    if case_id == "no-scaling-pt":
        return tensor_answer(latent((1, 3, 8, 8), torch.float16))
    return tensor_answer(torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)).half())


@pytest.mark.parametrize("case", GOLDEN_DECODE, ids=[c[0] for c in GOLDEN_DECODE])
def test_decode_bytes_identical_to_diffusers(case):
    """Same request line, same headers in the same order, same body; and the same result."""
    case_id, _, shape, dtype, kwargs, query, _, _ = case
    tensor = latent(shape, dtype)
    call = _diffusers_decode_kwargs(kwargs)
    if kwargs.get("output_type") == "mp4":
        call["return_type"] = "mp4"  # diffusers crashes on the default return_type (tested in test_client)
    if kwargs.get("output_type") == "pt" and not kwargs.get("partial_postprocess"):
        call["return_type"] = "pt"
    with recorder(_answer_for(case_id)) as stub:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # diffusers' do_scaling deprecation
            theirs = remote_utils.remote_decode(stub.url, tensor, **call)
        ours = client.remote_decode(stub.url, tensor, **call, retries=0)
        assert len(stub.requests) == 2
        diffusers_request, our_request = stub.requests
    assert our_request.method == diffusers_request.method == "POST"
    assert our_request.target == diffusers_request.target == f"/?{query}"
    assert our_request.headers == diffusers_request.headers
    assert our_request.body == diffusers_request.body
    assert_same(theirs, ours)


def test_decode_headers_are_requests_defaults():
    with recorder(tensor_answer(torch.zeros(1, 3, 8, 8, dtype=torch.float16))) as stub:
        client.remote_decode(
            stub.url, latent((1, 4, 1, 1), torch.float16), output_type="pt", return_type="pt"
        )
    headers = stub.requests[0].headers
    assert [k for k, _ in headers] == [
        "Host", "User-Agent", "Accept-Encoding", "Accept", "Connection", "Content-Type", "Content-Length",
    ]  # fmt: skip
    values = dict(headers)
    assert values["User-Agent"] == f"python-requests/{requests.__version__}"
    assert values["Connection"] == "keep-alive"
    assert values["Accept"] == values["Content-Type"] == "tensor/binary"
    assert values["Content-Length"] == "8"


@pytest.mark.parametrize("image_kind", ["tensor", "pil"])
def test_encode_bytes_identical_to_diffusers(image_kind):
    if image_kind == "tensor":
        image = latent((1, 3, 512, 512), torch.float16)
        expected_target = f"/?{ENCODE_GOLDEN_QUERY}"
    else:
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8))
        expected_target = "/?scaling_factor=0.18215"
    answer = tensor_answer(latent((1, 4, 4, 6), torch.float16))
    with recorder(answer) as stub:
        theirs = remote_utils.remote_encode(stub.url, image, scaling_factor=0.18215)
        ours = client.remote_encode(stub.url, image, scaling_factor=0.18215, retries=0)
        diffusers_request, our_request = stub.requests
    assert our_request.target == diffusers_request.target == expected_target
    assert our_request.headers == diffusers_request.headers
    assert "Content-Type" not in dict(our_request.headers)
    assert dict(our_request.headers)["Accept"] == "*/*"
    assert our_request.body == diffusers_request.body
    if image_kind == "pil":
        assert our_request.body.startswith(protocol.PNG_MAGIC)
    assert_same(theirs, ours)


# --------------------------------------------------------------------------- tensor bytes


@pytest.mark.parametrize(
    ("values", "dtype", "raw"),
    [
        ([1.0, -2.0], torch.bfloat16, b"\x80\x3f\x00\xc0"),
        ([1.0, -2.0], torch.float16, b"\x00\x3c\x00\xc0"),
        ([1.0, -2.0], torch.float32, b"\x00\x00\x80\x3f\x00\x00\x00\xc0"),
        ([1, 2, 255], torch.uint8, b"\x01\x02\xff"),
    ],
)
def test_exact_little_endian_bytes(values, dtype, raw):
    tensor = torch.tensor(values, dtype=dtype)
    assert protocol.tensor_to_bytes(tensor) == raw
    back = protocol.tensor_from_bytes(raw, [len(values)], protocol.dtype_name(dtype))
    assert back.dtype == dtype and torch.equal(back, tensor)


def test_bf16_is_the_upper_half_of_fp32():
    x = torch.randn(64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    fp32 = np.frombuffer(protocol.tensor_to_bytes(x.float()), dtype="<u4")
    bf16 = np.frombuffer(protocol.tensor_to_bytes(x), dtype="<u2")
    assert np.array_equal(fp32 >> 16, bf16.astype(np.uint32))
    assert np.all(fp32 & 0xFFFF == 0)


DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.uint8]


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=5),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_is_bit_exact(shape, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        tensor = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    else:
        tensor = (torch.randn(shape, generator=generator) * 100).to(dtype)
        tensor.view(-1)[0] = float("nan")  # NaN payloads survive too
    body, headers = protocol.tensor_response(tensor)
    back = protocol.parse_tensor_response(body, headers)
    assert back.dtype == dtype and list(back.shape) == shape
    assert torch.equal(back.view(torch.uint8), tensor.view(torch.uint8))
    assert body == safetensors.torch._to_ndarray(tensor)[0].tobytes()  # diffusers' serializer agrees


@pytest.mark.parametrize(
    "make",
    [
        lambda t: t.transpose(2, 3),
        lambda t: t[:, 1:3, ::2, 1:],
        lambda t: t.permute(0, 2, 3, 1),
        lambda t: t.expand(3, -1, -1, -1) if t.shape[0] == 1 else t,
    ],
    ids=["transposed", "sliced", "channels-last-view", "expanded"],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_non_contiguous_tensors_send_their_values(make, dtype):
    view = make(latent((1, 4, 6, 6), dtype))
    assert not view.is_contiguous()
    assert protocol.tensor_to_bytes(view) == protocol.tensor_to_bytes(view.contiguous())
    wire = protocol.build_decode_request(view, do_scaling=False)
    back = protocol.parse_decode_request(wire.params, wire.headers, wire.body).tensor
    assert torch.equal(back, view)


def test_channels_last_memory_format_sends_nchw_values():
    tensor = latent((1, 4, 6, 6), torch.float32).to(memory_format=torch.channels_last)
    assert protocol.tensor_to_bytes(tensor) == protocol.tensor_to_bytes(tensor.contiguous())


def test_length_mismatch_on_request_path():
    wire = protocol.build_decode_request(latent((1, 4, 8, 8), torch.float16), do_scaling=False)
    with pytest.raises(
        ProtocolError, match=r"body has 511 bytes but shape \[1, 4, 8, 8\] with dtype float16 needs 512"
    ):
        protocol.parse_decode_request(wire.params, wire.headers, wire.body[:-1])
    with pytest.raises(ProtocolError, match="body has 513 bytes"):
        protocol.parse_encode_request(wire.params, {}, wire.body + b"\x00")


def test_length_mismatch_on_response_path():
    body, headers = protocol.tensor_response(torch.zeros(1, 3, 2, 2))
    with pytest.raises(
        ProtocolError, match=r"body has 47 bytes but shape \[1, 3, 2, 2\] with dtype float32 needs 48"
    ):
        protocol.parse_tensor_response(body[:-1], headers)


def test_shape_header_is_compact_json():
    _, headers = protocol.tensor_response(torch.zeros(1, 3, 4, 5, dtype=torch.uint8))
    assert headers == {"content-type": "tensor/binary", "shape": "[1,3,4,5]", "dtype": "uint8"}


def test_response_headers_are_case_insensitive():
    body, _ = protocol.tensor_response(torch.ones(2, 2))
    back = protocol.parse_tensor_response(body, {"Shape": "[2, 2]", "DTYPE": "float32"})
    assert torch.equal(back, torch.ones(2, 2))


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"dtype": "float32"}, "response has no `shape` header"),
        ({"shape": "[4]"}, "response has no `dtype` header"),
        ({"shape": "4,4", "dtype": "float32"}, "`shape` header '4,4' is not a JSON array"),
        ({"shape": '{"a": 1}', "dtype": "float32"}, "is not a JSON array"),
        ({"shape": "[]", "dtype": "float32"}, "shape is empty"),
        ({"shape": "[4, 0]", "dtype": "float32"}, r"shape \[4, 0\] has an invalid dimension 0"),
        ({"shape": "[-4]", "dtype": "float32"}, "invalid dimension -4"),
        ({"shape": "[2.0, 2]", "dtype": "float32"}, "invalid dimension 2.0"),
        ({"shape": "[true, 4]", "dtype": "float32"}, "invalid dimension True"),
        ({"shape": "[1,1,1,1,1,1,4]", "dtype": "float32"}, "has 7 dimensions; at most 6 are allowed"),
        (
            {"shape": "[4]", "dtype": "int64"},
            "unsupported dtype 'int64'; supported: float16, bfloat16, float32, uint8",
        ),
    ],
)
def test_response_header_errors(headers, message):
    with pytest.raises(ProtocolError, match=message):
        protocol.parse_tensor_response(b"\x00" * 16, headers)


# --------------------------------------------------------------------------- server-side parsing


def decode_query(tensor: torch.Tensor, **overrides: str) -> list[tuple[str, str]]:
    items = [("shape", str(d)) for d in tensor.shape] + [("dtype", protocol.dtype_name(tensor.dtype))]
    return items + list(overrides.items())


TENSOR_HEADERS = {"Content-Type": "tensor/binary"}


def test_parse_decode_request_round_trips_a_built_request():
    tensor = latent((1, 4096, 64), torch.bfloat16)
    wire = protocol.build_decode_request(
        tensor, output_type="pt", partial_postprocess=True, scaling_factor=0.3611, shift_factor=0.1159,
        height=1024, width=1024, extensions=protocol.Extensions(output_dtype="float32"),
    )  # fmt: skip
    parsed = protocol.parse_decode_request(wire.params, wire.headers, wire.body)
    assert torch.equal(parsed.tensor, tensor)
    assert (parsed.output_type, parsed.image_format, parsed.partial_postprocess) == ("pt", "jpg", True)
    assert parsed.accept == "tensor/binary"
    assert parsed.scaling == protocol.Scaling(0.3611, 0.1159, use_model_defaults=False)
    assert (parsed.height, parsed.width) == (1024, 1024)
    assert parsed.extensions == protocol.Extensions(output_dtype="float32")


def test_repeated_keys_last_scalar_wins_and_shape_accumulates():
    tensor = latent((1, 4, 2, 2), torch.float32)
    items = [("output_type", "pil"), ("output_type", "pt")] + decode_query(tensor)
    parsed = protocol.parse_decode_request(items, TENSOR_HEADERS, protocol.tensor_to_bytes(tensor))
    assert parsed.output_type == "pt"
    assert list(parsed.tensor.shape) == [1, 4, 2, 2]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("True", True),
        ("TRUE", True),
        ("tRuE", True),
        ("1", True),
        ("False", False),
        ("false", False),
        ("FALSE", False),
        ("0", False),
    ],
)
def test_booleans_any_case(text, value):
    tensor = latent((1, 4, 2, 2), torch.float32)
    items = decode_query(tensor, partial_postprocess=text, do_scaling=text)
    parsed = protocol.parse_decode_request(items, TENSOR_HEADERS, protocol.tensor_to_bytes(tensor))
    assert parsed.partial_postprocess is value
    assert parsed.scaling.use_model_defaults is value


def test_scaling_modes():
    tensor = latent((1, 4, 2, 2), torch.float32)
    body = protocol.tensor_to_bytes(tensor)

    def scaling(**params):
        return protocol.parse_decode_request(decode_query(tensor, **params), TENSOR_HEADERS, body).scaling

    assert scaling().is_identity
    assert scaling(do_scaling="False").is_identity
    assert scaling(do_scaling="True") == protocol.Scaling(None, None, use_model_defaults=True)
    assert scaling(do_scaling="True", scaling_factor="0.5") == protocol.Scaling(0.5, None, False)
    assert scaling(do_scaling="True", shift_factor="0.1") == protocol.Scaling(None, 0.1, True)
    assert scaling(scaling_factor="0.18215", shift_factor="-1e-3") == protocol.Scaling(0.18215, -0.001, False)


def test_unknown_params_are_ignored_and_extensions_kept():
    tensor = latent((1, 4, 2, 2), torch.float32)
    items = decode_query(tensor, input_tensor_type="binary", output_tensor_type="binary", whatever="1",
                         fps="12", tile="on")  # fmt: skip
    parsed = protocol.parse_decode_request(items, TENSOR_HEADERS, protocol.tensor_to_bytes(tensor))
    assert parsed.extensions == protocol.Extensions(fps=12, tile="on")


def test_height_width_ignored_for_4d_latents():
    tensor = latent((1, 4, 2, 2), torch.float32)
    items = decode_query(tensor, height="16", width="16")
    parsed = protocol.parse_decode_request(items, TENSOR_HEADERS, protocol.tensor_to_bytes(tensor))
    assert (parsed.height, parsed.width) == (None, None)


def test_decode_defaults_without_params():
    tensor = latent((1, 4, 2, 2), torch.float32)
    parsed = protocol.parse_decode_request(decode_query(tensor), {}, protocol.tensor_to_bytes(tensor))
    assert (parsed.output_type, parsed.image_format, parsed.partial_postprocess, parsed.accept) == (
        "pil", "jpg", False, "*/*",
    )  # fmt: skip


def test_image_format_jpeg_is_jpg_and_accept_is_normalised():
    tensor = latent((1, 4, 2, 2), torch.float32)
    parsed = protocol.parse_decode_request(
        decode_query(tensor, image_format="JPEG"),
        {"accept": "Image/PNG; q=1"},
        protocol.tensor_to_bytes(tensor),
    )
    assert parsed.image_format == "jpg" and parsed.accept == "image/png"


F32_4D = latent((1, 4, 2, 2), torch.float32)
F32_BODY = protocol.tensor_to_bytes(F32_4D)


@pytest.mark.parametrize(
    ("items", "headers", "body", "message"),
    [
        ([("dtype", "float32")], TENSOR_HEADERS, F32_BODY, r"expected `shape` in query params \(one `shape=` per"),
        ([("shape", "1"), ("shape", "4"), ("shape", "2"), ("shape", "2")], TENSOR_HEADERS, F32_BODY,
         "expected `dtype` in query params"),
        (decode_query(F32_4D)[:-1] + [("dtype", "float64")], TENSOR_HEADERS, F32_BODY,
         "unsupported dtype 'float64'"),
        ([("shape", "x")] + decode_query(F32_4D)[1:], TENSOR_HEADERS, F32_BODY, "shape value 'x' is not an integer"),
        ([("shape", "0")] + decode_query(F32_4D)[1:], TENSOR_HEADERS, F32_BODY, "invalid dimension 0"),
        (decode_query(F32_4D, partial_postprocess="maybe"), TENSOR_HEADERS, F32_BODY,
         "partial_postprocess='maybe' is not a boolean; send True or False"),
        (decode_query(F32_4D, do_scaling="yes"), TENSOR_HEADERS, F32_BODY, "do_scaling='yes' is not a boolean"),
        (decode_query(F32_4D, scaling_factor="abc"), TENSOR_HEADERS, F32_BODY, "scaling_factor='abc' is not a number"),
        (decode_query(F32_4D, shift_factor="inf"), TENSOR_HEADERS, F32_BODY, "shift_factor='inf' must be a finite"),
        (decode_query(F32_4D, scaling_factor="nan"), TENSOR_HEADERS, F32_BODY, "scaling_factor='nan' must be a finite"),
        (decode_query(F32_4D, scaling_factor="0"), TENSOR_HEADERS, F32_BODY, "scaling_factor=0 would divide by zero"),
        (decode_query(F32_4D, output_type="latent"), TENSOR_HEADERS, F32_BODY,
         "output_type='latent' is not one of pil, pt, mp4"),
        (decode_query(F32_4D, image_format="gif"), TENSOR_HEADERS, F32_BODY, "image_format='gif' is not one of jpg, png"),
        (decode_query(F32_4D), {"Content-Type": "application/json"}, F32_BODY,
         "Content-Type 'application/json' is not supported for decode; send tensor/binary"),
        ([("shape", "16"), ("dtype", "float32")], TENSOR_HEADERS, b"\x00" * 64,
         r"latent shape \[16\] has 1 dimensions; expected 3 \(packed\), 4 \[B,C,H,W\] or 5"),
        ([("shape", "1"), ("shape", "4"), ("shape", "2"), ("shape", "2"), ("dtype", "uint8")], TENSOR_HEADERS,
         b"\x00" * 16, "latents must be float16, bfloat16 or float32, not uint8"),
        ([("shape", "1"), ("shape", "4"), ("shape", "4"), ("dtype", "float32"), ("height", "x"), ("width", "8")],
         TENSOR_HEADERS, b"\x00" * 64, "height='x' is not an integer"),
        ([("shape", "1"), ("shape", "4"), ("shape", "4"), ("dtype", "float32"), ("height", "8"), ("width", "0")],
         TENSOR_HEADERS, b"\x00" * 64, "width=0 must be at least 1"),
    ],
)  # fmt: skip
def test_parse_decode_request_errors(items, headers, body, message):
    with pytest.raises(ProtocolError, match=message):
        protocol.parse_decode_request(items, headers, body)


def test_a_3d_latent_without_height_and_width_is_left_to_the_server():
    """Packed image latents or audio [B,C,L]: the hosted model decides (packed ones without height and
    width are the server's 400, tests/server/test_server_errors.py)."""
    items = [("shape", "1"), ("shape", "4"), ("shape", "4"), ("dtype", "float32")]
    parsed = protocol.parse_decode_request(items, TENSOR_HEADERS, b"\x00" * 64)
    assert list(parsed.tensor.shape) == [1, 4, 4] and (parsed.height, parsed.width) == (None, None)
    parsed = protocol.parse_decode_request(
        items + [("height", "8"), ("width", "16")], TENSOR_HEADERS, b"\x00" * 64
    )
    assert (parsed.height, parsed.width) == (8, 16)


def test_parse_encode_request_image_and_tensor():
    png = jpeg_bytes(fmt="PNG")
    parsed = protocol.parse_encode_request(
        [("scaling_factor", "0.3611"), ("shift_factor", "0.1159")], {}, png
    )
    assert parsed.image_bytes == png and parsed.tensor is None
    assert parsed.scaling == protocol.Scaling(0.3611, 0.1159, False)
    jpeg = jpeg_bytes()
    assert protocol.parse_encode_request([], {}, jpeg).image_bytes == jpeg
    image = latent((1, 3, 8, 8), torch.float16)
    wire = protocol.build_encode_request(
        image, scaling_factor=0.18215, extensions=protocol.Extensions(tile="off")
    )
    parsed = protocol.parse_encode_request(wire.params, wire.headers, wire.body)
    assert torch.equal(parsed.tensor, image) and parsed.image_bytes is None
    assert parsed.extensions == protocol.Extensions(tile="off")


def test_parse_encode_request_one_dim_shape_stays_a_list():
    # The HF toolkit's coercion would turn a single `shape` into a scalar; ours keeps it a 1-dim shape.
    parsed = protocol.parse_encode_request([("shape", "3"), ("dtype", "uint8")], {}, b"\x01\x02\x03")
    assert parsed.tensor.shape == (3,) and parsed.tensor.tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    ("items", "body", "message"),
    [
        ([], b"", "encode request has an empty body"),
        ([], b"GIF89a....", "encode body is neither a PNG/JPEG/WebP image nor a raw tensor"),
        ([("shape", "3")], b"\x00" * 3, "expected `dtype` in query params"),
        ([("dtype", "uint8")], b"\x00" * 3, "expected `shape` in query params"),
        (
            [("shape", "3"), ("dtype", "uint8")],
            b"\x00" * 4,
            r"body has 4 bytes but shape \[3\] with dtype uint8 needs 3",
        ),
        ([("scaling_factor", "x")], jpeg_bytes(), "scaling_factor='x' is not a number"),
    ],
)
def test_parse_encode_request_errors(items, body, message):
    with pytest.raises(ProtocolError, match=message):
        protocol.parse_encode_request(items, {}, body)


def test_error_body_is_hf_json():
    assert json.loads(protocol.error_body("bad `dtype`")) == {"error": "bad `dtype`"}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_tensors_are_refused_on_both_paths(bad):
    tensor = torch.zeros(1, 4, 2, 2, dtype=torch.float16)
    tensor[0, 1, 1, 0] = bad
    wire = protocol.build_decode_request(tensor, output_type="pt")
    with pytest.raises(protocol.ProtocolError, match="tensor contains NaN or infinite values"):
        protocol.parse_decode_request(wire.params, wire.headers, wire.body)
    wire = protocol.build_encode_request(tensor.float())
    with pytest.raises(protocol.ProtocolError, match="tensor contains NaN or infinite values"):
        protocol.parse_encode_request(wire.params, wire.headers, wire.body)


def test_the_query_alone_declares_the_tensor_as_a_meta_tensor():
    wire = protocol.build_decode_request(
        latent((1, 4096, 64), torch.bfloat16), output_type="pt", height=1024, width=1024
    )
    declared = protocol.parse_decode_request(wire.params, wire.headers, None)
    assert (
        declared.tensor.is_meta
        and declared.tensor.shape == (1, 4096, 64)
        and declared.tensor.dtype == torch.bfloat16
    )
    assert (declared.output_type, declared.height, declared.scaling) == (
        "pt",
        1024,
        protocol.Scaling(use_model_defaults=True),
    )
    encode = protocol.build_encode_request(torch.zeros(2, 8, 8, 3, dtype=torch.uint8))
    assert protocol.parse_encode_request(encode.params, {}, None).tensor.is_meta
    image = protocol.parse_encode_request([("scaling_factor", "0.5")], {}, None)
    assert image.tensor is None and image.image_bytes is None and image.scaling.scaling_factor == 0.5
    with pytest.raises(ProtocolError, match="latents must be float16, bfloat16 or float32, not uint8"):
        protocol.parse_decode_request([("shape", "1"), ("dtype", "uint8")], {}, None)


def test_a_declared_tensor_too_big_to_describe_is_refused():
    with pytest.raises(
        ProtocolError, match=r"shape \[1099511627776, 1099511627776\] with dtype float32 would need"
    ):
        protocol.declared_tensor({"shape": ["1099511627776"] * 2, "dtype": ["float32"]})


def test_body_length_checks_name_both_sizes():
    protocol.check_body_length(512, [1, 4, 8, 8], torch.float16)
    with pytest.raises(
        ProtocolError, match=r"body has 9 bytes but shape \[1, 4, 8, 8\] with dtype float16 needs 512 bytes"
    ):
        protocol.check_body_length(9, [1, 4, 8, 8], torch.float16)


@pytest.mark.parametrize(
    ("headers", "encoding"),
    [({}, "identity"), ({"content-encoding": ""}, "identity"), ({"content-encoding": " GZip "}, "gzip")],
)
def test_content_encoding_is_read_one_way(headers, encoding):
    assert protocol.content_encoding(headers) == encoding
