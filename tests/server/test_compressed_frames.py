"""Decode answers as compressed frames (our `codec` extension) through the real server over HTTP: jxl
byte-identical to the raw uint8 answer, h264rgb within its bound, every refusal, /v1/models."""

import math

import numpy as np
import pytest
import requests
import torch
from skimage import data

from remote_vae.local_server import answers
from remote_vae.local_server.app import Settings
from remote_vae.local_server.registry import Tuning
from remote_vae.remote import frames, protocol
from remote_vae.remote.presets import PRESETS
from support.photos import CPU_THREADS, PIXELS, PhotoVAE, hosting_photos, pan_clip, photos, uint8_decode
from support.serving import error_of, post_decode, post_encode

SD15, WAN = PRESETS["sd15"], PRESETS["wan21"]


def decoded(response: requests.Response) -> tuple[np.ndarray, dict[str, float]]:
    """A compressed-frames answer read as a client reads it: the frames and the server's stats."""
    assert response.status_code == 200, response.text
    shape = protocol.parse_shape_header(response.headers["shape"])
    codec = response.headers[frames.CODEC_HEADER]
    reader = frames.RecordReader(shape[0], frames.max_payload(*shape[1:3]))
    out = np.empty(shape, np.uint8)
    for record in reader.feed(response.content):
        frames.decode_into(codec, record.payload, out[record.first : record.first + record.count])
    return out, reader.finish()


def raw(response: requests.Response) -> np.ndarray:
    return protocol.parse_tensor_response(response.content, response.headers).numpy()


def both(
    url: str, model: str, latent: torch.Tensor, codec: str
) -> tuple[np.ndarray, np.ndarray, requests.Response]:
    """The raw uint8 answer, and the `codec` answer decoded (and the compressed response itself)."""
    exact = raw(uint8_decode(url, model, latent))
    response = uint8_decode(url, model, latent, codec)
    return exact, decoded(response)[0], response


def test_jxl_is_byte_identical_for_a_batch_of_photographs():
    with hosting_photos(PhotoVAE(photos(256, 320)), SD15) as url:
        exact, back, response = both(url, "sd15", torch.zeros(4, 4, 32, 40), "jxl")
        _, stats = decoded(response)
    assert back.tobytes() == exact.tobytes() and exact.shape == (4, 256, 320, 3)
    headers = response.headers
    assert headers["content-type"] == "application/x-remote-vae-frames"
    assert (headers["shape"], headers["dtype"], headers["x-remote-vae-codec"]) == (
        "[4,256,320,3]",
        "uint8",
        "jxl",
    )
    assert "content-length" not in headers and headers["transfer-encoding"] == "chunked"
    assert (
        set(stats) == {"render_seconds", "encode_seconds", "encode_threads"}
        and stats["encode_threads"] == CPU_THREADS
    )
    assert len(response.content) < exact.nbytes  # photographs compress


def test_jxl_is_byte_identical_for_video_frames():
    """Two videos of 9 frames each: 18 records, frames of the second video after the first's."""
    with hosting_photos(PhotoVAE(pan_clip(9, 96, 160)), WAN) as url:
        exact, back, _ = both(url, "wan21", torch.zeros(2, 16, 3, 12, 20), "jxl")
    assert exact.shape == (18, 96, 160, 3) and np.array_equal(back, exact)


@pytest.mark.parametrize("batch", [1, 3])
def test_jxl_is_byte_identical_at_odd_sizes(batch):
    with hosting_photos(PhotoVAE(photos(37, 53), scale=1), PIXELS) as url:
        exact, back, _ = both(url, "pixels", torch.zeros(batch, 4, 37, 53), "jxl")
    assert exact.shape == (batch, 37, 53, 3) and np.array_equal(back, exact)


def test_jxl_of_one_large_photograph():
    """A lone image is one record, encoded on every thread."""
    with hosting_photos(PhotoVAE(data.astronaut()[None]), SD15) as url:
        exact, back, response = both(url, "sd15", torch.zeros(1, 4, 64, 64), "jxl")
        _, stats = decoded(response)
    assert exact.shape == (1, 512, 512, 3) and np.array_equal(back, exact)
    assert stats["encode_threads"] == CPU_THREADS


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def test_h264rgb_is_near_lossless_on_a_pan():
    """17 frames: a record of 16 and a last one of 1."""
    with hosting_photos(PhotoVAE(pan_clip(17, 96, 160)), WAN) as url:
        exact, back, response = both(url, "wan21", torch.zeros(1, 16, 5, 12, 20), "h264rgb")
    assert response.headers["x-remote-vae-codec"] == "h264rgb" and exact.shape == (17, 96, 160, 3)
    assert frames.max_error(back, exact) <= frames.NEAR_LOSSLESS_MAX_ERROR
    assert psnr(back, exact) >= 45
    assert len(response.content) < exact.nbytes


def test_h264rgb_falls_back_to_a_lower_quantiser_on_content_beyond_the_bound(monkeypatch):
    """libx264rgb at qp 12 holds even noise within 5/255, so a coarse first quantiser stands in for
    content it would not hold: each record must still come back within the bound."""
    monkeypatch.setattr(frames, "H264_QP", (36, 8, 0))
    noise = np.random.default_rng(3).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    with hosting_photos(PhotoVAE(noise), SD15) as url:
        exact, back, _ = both(url, "sd15", torch.zeros(4, 4, 8, 8), "h264rgb")
    first_try = np.empty_like(exact)
    frames.decode_into("h264rgb", frames._h264_encode(exact, qp=frames.H264_QP[0], threads=1), first_try)
    assert frames.max_error(first_try, exact) > frames.NEAR_LOSSLESS_MAX_ERROR
    assert frames.max_error(back, exact) <= frames.NEAR_LOSSLESS_MAX_ERROR


def test_pixels_rendered_by_the_device_job_are_the_same_bytes():
    """On CUDA the device job renders uint8 (`render_on_device`); forced here on the CPU, every pixel
    answer is byte-identical to the CPU render's."""
    vae, latent = PhotoVAE(photos(64, 96)), torch.zeros(2, 4, 8, 12)
    answers_of = []
    for options in (Tuning(), Tuning(render_on_device=True)):
        with hosting_photos(vae, SD15, options=options) as url:
            png = post_decode(f"{url}/sd15", latent[:1], image_format="png", do_scaling=False)
            answers_of.append(
                (
                    uint8_decode(url, "sd15", latent).content,
                    decoded(uint8_decode(url, "sd15", latent, "jxl"))[0].tobytes(),
                    png.content,
                )
            )
    assert answers_of[0] == answers_of[1]
    assert answers_of[0][0] == answers_of[0][1]


def test_video_pixels_rendered_by_the_device_job_are_the_same_bytes():
    vae, latent = PhotoVAE(pan_clip(5, 48, 64)), torch.zeros(2, 16, 2, 6, 8)
    bodies = []
    for options in (Tuning(), Tuning(render_on_device=True)):
        with hosting_photos(vae, WAN, options=options) as url:
            bodies.append(uint8_decode(url, "wan21", latent).content)
    assert bodies[0] == bodies[1] and len(bodies[0]) == 10 * 48 * 64 * 3


# --------------------------------------------------------------------------- what the server offers


def test_models_list_the_codecs_this_server_encodes():
    with hosting_photos(PhotoVAE(photos(8, 8)), SD15) as url:
        listed = requests.get(url + "/v1/models", timeout=10).json()["codecs"]
    assert listed == list(answers.offered_codecs()) == ["jxl", "h264rgb"]
    with hosting_photos(PhotoVAE(photos(8, 8)), SD15, Settings(codecs=("jxl",))) as url:
        assert requests.get(url + "/v1/models", timeout=10).json()["codecs"] == ["jxl"]


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("options", "asked"),
    [
        ({"output_type": "pt"}, "output_type=pt without partial_postprocess"),
        ({"output_type": "pil", "image_format": "png"}, "output_type=pil"),
        ({"output_type": "pil", "processor_flag": True}, "output_type=pil"),
    ],
)
def test_codec_with_another_answer_is_refused(options, asked):
    with hosting_photos(PhotoVAE(photos(64, 64)), SD15) as url:
        response = post_decode(
            f"{url}/sd15",
            torch.zeros(1, 4, 8, 8),
            do_scaling=False,
            extra_params=[("codec", "jxl")],
            **options,
        )
    assert error_of(response, 400) == (
        "codec=jxl compresses the uint8 pixels of output_type=pt with partial_postprocess=True only, "
        f"not the answer to {asked}: send those two parameters, or no codec"
    )


def test_codec_with_an_mp4_answer_is_refused():
    with hosting_photos(PhotoVAE(pan_clip(5, 48, 64)), WAN) as url:
        response = post_decode(
            f"{url}/wan21",
            torch.zeros(1, 16, 2, 6, 8),
            output_type="mp4",
            do_scaling=False,
            extra_params=[("codec", "h264rgb")],
        )
    assert error_of(response, 400) == (
        "codec=h264rgb compresses the uint8 pixels of output_type=pt with partial_postprocess=True only, "
        "not the answer to output_type=mp4: send those two parameters, or no codec"
    )


def test_unknown_codec_is_refused():
    with hosting_photos(PhotoVAE(photos(64, 64)), SD15) as url:
        response = uint8_decode(url, "sd15", torch.zeros(1, 4, 8, 8), "png")
    assert error_of(response, 400) == "codec='png' is not one of jxl, h264rgb"


@pytest.mark.parametrize(
    ("offered", "codec", "needs", "listed"),
    [
        (("jxl",), "h264rgb", "PyAV with libx264rgb", "jxl"),
        ((), "jxl", "imagecodecs with JPEG XL", "none"),
    ],
)
def test_codec_this_server_cannot_encode_is_refused(offered, codec, needs, listed):
    with hosting_photos(PhotoVAE(photos(64, 64)), SD15, Settings(codecs=offered)) as url:
        response = uint8_decode(url, "sd15", torch.zeros(1, 4, 8, 8), codec)
    assert error_of(response, 400) == (
        f"codec={codec} cannot be encoded by this server (it needs {needs}); "
        f"the codecs it offers (GET /v1/models): {listed}"
    )


def test_codec_on_an_encode_is_refused():
    with hosting_photos(PhotoVAE(photos(64, 64)), SD15) as url:
        response = post_encode(f"{url}/sd15", torch.zeros(1, 3, 64, 64), extra_params=[("codec", "jxl")])
    assert error_of(response, 400) == "codec=jxl compresses decode answers only; send encodes without it"


def test_h264rgb_wider_than_h264_allows_is_refused_before_decoding():
    with hosting_photos(PhotoVAE(photos(8, 8), scale=1), PIXELS) as url:
        response = uint8_decode(url, "pixels", torch.zeros(1, 4, 1, 16385), "h264rgb")
    assert error_of(response, 413) == (
        "codec=h264rgb of 16385x1 pixels per frame is over H.264's (libx264's) limit of 16384 pixels per "
        "side; use codec=jxl, or no codec"
    )
