"""Audio VAEs over the wire: latents [B,C,L] in, raw audio [B,channels,samples] out, and back.

A Stable Audio VAE file made by ComfyUI 0.3.75's own model class (support/comfy_vaes.py) is hosted through
the comfy backend on a real server on 127.0.0.1. Its answers must be exactly what ComfyUI's VAE.decode /
VAE.encode give on the same file (float32 on the CPU, bit for bit); every other request gets a 400 or 413
naming what to send, before its body is read where the query decides it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch

from remote_vae.local_server.app import Settings, create_app
from remote_vae.local_server.comfy_models import build_comfy_registry
from remote_vae.local_server.limits import Limits
from remote_vae.remote import protocol, remote_decode, remote_encode
from remote_vae.remote.protocol import Extensions
from support.comfy_vaes import (
    FAMILIES,
    imported_test_comfyui,
    save_vae_file,
)
from support.serving import error_of, post_decode, post_encode, serve, tensor_of

pytestmark = pytest.mark.timeout(300)

STEP = 2048  # samples per latent step of Stable Audio's VAE
EXACT = Extensions(output_dtype="float32")


@pytest.fixture(scope="module")
def comfy(tmp_path_factory) -> Iterator:
    with imported_test_comfyui(tmp_path_factory.mktemp("comfyui")) as imported:
        yield imported


@pytest.fixture(scope="module")
def files(comfy, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("vaes")
    return {name: save_vae_file(comfy, FAMILIES[name], folder / f"{name}.safetensors", seed=seed)
            for seed, name in enumerate(("stable_audio", "taesd"), start=1)}  # fmt: skip


@pytest.fixture(scope="module")
def reference(comfy, files):
    """What ComfyUI's VAELoader makes of the audio file."""
    state_dict, metadata = comfy.utils.load_torch_file(str(files["stable_audio"]), return_metadata=True)
    return comfy.sd.VAE(sd=state_dict, metadata=metadata)


@contextlib.contextmanager
def serving(comfy, files, limits: Limits | None = None, *, preload: bool = False) -> Iterator[str]:
    specs = [f"audio={files['stable_audio']}", f"taesd={files['taesd']}"]
    registry = build_comfy_registry(comfy.directory, specs, device="cpu", dtype="auto")
    try:
        if preload:  # loading draws no random numbers in the middle of a seeded encode
            registry.preload()
        with serve(create_app(registry, Settings(limits=limits or Limits()))) as url:
            yield url
    finally:
        registry.close()


@pytest.fixture(scope="module")
def url(comfy, files) -> Iterator[str]:
    with serving(comfy, files, preload=True) as served:
        yield served


def seeded(shape: tuple[int, ...], seed: int = 7) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


Z = seeded((1, 64, 3))


@pytest.fixture(scope="module")
def decoded(reference) -> torch.Tensor:
    """ComfyUI's VAE.decode of Z: [B,samples,channels] (no clamp: its process_output is the identity)."""
    with torch.inference_mode():
        return reference.decode(Z)


# --------------------------------------------------------------------------- decode and encode equal ComfyUI's


def test_decode_answers_comfyuis_audio(url, decoded):
    want = decoded.movedim(-1, 1)  # the wire's layout: [B,channels,samples]
    assert want.shape == (1, 2, 3 * STEP) and want.dtype == torch.float32
    exact = post_decode(f"{url}/audio/decode", Z, output_type="pt", do_scaling=False, extensions=EXACT)
    assert torch.equal(tensor_of(exact), want)
    plain = post_decode(f"{url}/audio", Z, output_type="pt", do_scaling=False)  # the HF route, no extension
    assert plain.headers["dtype"] == "float32" and plain.headers["shape"] == "[1,2,6144]"
    assert torch.equal(tensor_of(plain), want)  # audio answers float32 unless output_dtype says otherwise
    half = post_decode(
        f"{url}/audio/decode", Z, output_type="pt", extensions=Extensions(output_dtype="float16")
    )
    assert torch.equal(tensor_of(half), want.half())


def test_the_client_returns_the_audio_tensor(url, decoded):
    got = remote_decode(f"{url}/audio/decode", Z, output_type="pt", return_type="pt", do_scaling=False)
    assert torch.equal(got, decoded.movedim(-1, 1))


def test_encode_answers_comfyuis_latents(url, reference, decoded):
    """Stable Audio's encode samples its posterior (ComfyUI's VAE.encode does): the same seed, the same
    draw. Audio that is not whole latent steps is centre-cropped first, as ComfyUI does."""
    audio = torch.cat([seeded((1, 37, 2), 1), decoded, seeded((1, 60, 2), 2)], dim=1)  # [B,samples,channels]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        got = tensor_of(post_encode(f"{url}/audio/encode", audio.movedim(-1, 1).contiguous()))
        torch.manual_seed(3)
        with torch.inference_mode():
            want = reference.encode(audio)
        torch.manual_seed(3)
        client = remote_encode(f"{url}/audio/encode", audio.movedim(-1, 1).contiguous())
    assert got.shape == (1, 64, 3) and got.dtype == torch.float32
    assert torch.equal(got, want) and torch.equal(client, want)


def test_tiled_requests_run_comfyuis_1d_tiling(url, reference, decoded):
    tiles = Extensions(tile="on", tile_size=16)  # 16 latent steps a tile, overlapping by 4
    with torch.inference_mode():
        want = reference.decode_tiled(Z, tile_x=16, tile_y=16, overlap=4).movedim(-1, 1)
    got = tensor_of(
        post_decode(f"{url}/audio/decode", Z, output_type="pt", do_scaling=False, extensions=tiles)
    )
    assert torch.equal(got, want)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        got = tensor_of(
            post_encode(f"{url}/audio/encode", decoded.movedim(-1, 1).contiguous(), extensions=tiles)
        )
        torch.manual_seed(5)
        with torch.inference_mode():
            want = reference.encode_tiled(decoded, tile_x=16 * STEP, tile_y=16 * STEP, overlap=16 * STEP // 8)
    assert torch.equal(got, want)


# --------------------------------------------------------------------------- what does not fit: 400s


def test_decode_answers_only_raw_audio(url):
    says = "model audio decodes audio, which it answers only as a raw tensor [B,channels,samples]: "
    cases = {
        "output_type=pil": {"output_type": "pil"},
        "output_type=pt with partial_postprocess=True": {"output_type": "pt", "partial_postprocess": True},
        "output_type=mp4": {"output_type": "mp4"},
    }
    for asked, options in cases.items():
        message = error_of(post_decode(f"{url}/audio/decode", Z, **options), 400)
        assert message == says + f"send output_type=pt without partial_postprocess (not {asked})"
    as_floats = post_decode(f"{url}/audio/decode", Z, output_type="pil", headers={"Accept": "tensor/binary"})
    assert error_of(as_floats, 400).endswith("(not output_type=pil)")


def test_latents_that_do_not_fit_the_audio_model(url):
    message = error_of(post_decode(f"{url}/audio/decode", seeded((1, 16, 3)), output_type="pt"), 400)
    assert (
        message
        == "latent has 16 channels but model audio expects 64; model audio serves stable_audio.safetensors (ComfyUI VAE)"
    )
    message = error_of(post_decode(f"{url}/audio/decode", seeded((1, 4, 8, 8)), output_type="pt"), 400)
    assert message == (
        "latent of shape [1, 4, 8, 8] has 4 dimensions but model audio expects [B,64,L]; "
        "model audio serves stable_audio.safetensors (ComfyUI VAE); hosted models that fit: /taesd"
    )
    sized = post_decode(f"{url}/audio/decode", Z, output_type="pt", height=64, width=64)
    assert error_of(sized, 400) == (
        "model audio decodes audio: its latents [B,64,L] take no `height` or `width` (those size packed "
        "image latents); drop them"
    )


def test_an_image_model_still_reads_a_3d_latent_as_packed(url):
    message = error_of(post_decode(f"{url}/taesd/decode", Z, output_type="pt"), 400)
    assert message == "packed (3-D) latents need both `height` and `width` parameters"
    message = error_of(post_decode(f"{url}/taesd/decode", Z, output_type="pt", height=128, width=128), 400)
    assert message.startswith("packed latent of shape [1, 64, 3] does not fit height=128 width=128")
    assert message.endswith("; hosted models that fit: /audio")  # the latent as sent is an audio one


def test_encode_takes_only_float_audio(url):
    want = "send a raw float tensor [B,2,samples] (44100 Hz) with `shape` and `dtype`"
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 64
    assert (
        error_of(post_encode(f"{url}/audio/encode", png), 400)
        == f"model audio encodes audio, not images: {want}"
    )
    for audio, named in [
        (torch.zeros(1, 1, 4096), "[1, 1, 4096] (float32)"),
        (torch.zeros(2, 4096), "[2, 4096] (float32)"),
        (torch.zeros(1, 2, 4096, dtype=torch.uint8), "[1, 2, 4096] (uint8)"),
    ]:
        message = error_of(post_encode(f"{url}/audio/encode", audio), 400)
        assert message == f"encode input of shape {named} is not audio model audio takes: {want}"
    short = error_of(post_encode(f"{url}/audio/encode", torch.zeros(1, 2, 2000)), 400)
    assert short == "audio of 2000 samples is shorter than model audio's latent step of 2048 samples"


# --------------------------------------------------------------------------- limits, before the body


def test_audio_counts_against_the_pixel_limits_before_the_body(comfy, files):
    """A clip's values count as an image's (3 a pixel); the query decides, so a body that does not even
    match the declared shape is refused by the limit."""
    limits = Limits(max_pixels=4 * STEP, max_batch_pixels=8 * STEP, max_request_memory=1 << 40)
    with serving(comfy, files, limits) as url:
        within = protocol.build_decode_request(seeded((1, 64, 6)), output_type="pt")
        response = requests.post(
            f"{url}/audio/decode", params=within.params, headers=within.headers, data=b"\0", timeout=60
        )
        assert error_of(response, 400).startswith("body has 1 bytes but shape [1, 64, 6]")  # past the limits
        long = protocol.build_decode_request(seeded((1, 64, 7)), output_type="pt")
        response = requests.post(
            f"{url}/audio/decode", params=long.params, headers=long.headers, data=b"\0", timeout=60
        )
        assert error_of(response, 413) == (
            "a clip of 2 channels x 14336 samples = 28672 values exceeds the server's limit of 24576 values per "
            "clip (3 x --max-pixels, an image's worth); send shorter clips"
        )
        many = protocol.build_encode_request(torch.zeros(5, 2, 4 * STEP))
        response = requests.post(f"{url}/audio/encode", params=many.params, data=b"\0", timeout=60)
        assert error_of(response, 413) == (
            "a batch of 5 clips of 2 channels x 8192 samples exceeds the server's limit of 49152 values per "
            "request (3 x --max-batch-pixels); send fewer clips per request"
        )
    with serving(comfy, files, Limits(max_request_memory=1 << 20)) as url:
        message = error_of(post_decode(f"{url}/audio/decode", Z, output_type="pt"), 413)
        assert (
            "(12288 audio sample values and their conversions), over the server's limit of 0.00 GiB"
            in message
        )
