"""Every limit is checked from what is known first, before the work it would cost: the query's shape and
dtype before the body is read, an image's declared size before its pixels are decoded, the memory a
request needs at its peak, the sizes the mp4 encoder takes; and factors that would make the latents
non-finite are a 400, not an answer full of NaN."""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
import zlib
from urllib.parse import urlencode, urlsplit

import psutil
import pytest
import torch
from PIL import Image

from remote_vae.local_server import postprocess
from remote_vae.local_server.app import Settings
from remote_vae.local_server.latents import check_scaling, preset_factors
from remote_vae.local_server.limits import LimitExceeded, Limits
from remote_vae.local_server.memory import decode_footprint, encode_footprint, host_total_bytes
from remote_vae.remote import protocol
from remote_vae.remote.presets import PRESETS
from remote_vae.remote.protocol import ProtocolError, Scaling
from remote_vae.testing import random_vae
from support.hooked import Wrapped
from support.serving import error_of, hosting, post_decode, post_encode, tensor_of

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def models():
    return {
        "sd15": ("sd15", Wrapped(random_vae("sd15", 1, size="micro"))),
        "hunyuan_video": ("hunyuan_video", Wrapped(random_vae("hunyuan_video", 2))),
    }


@pytest.fixture
def limited(models):
    """A server with the given limits, and its models' decode calls (none may run for a refusal)."""

    def start(**limits):
        for _, model in models.values():
            model.batches.clear()
        return hosting(models, Settings(limits=Limits(**limits)))

    return start


def z(*shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def headers_only(url: str, path: str, params, headers: dict[str, str]) -> tuple[int, bytes, float]:
    """POST the request line and headers, then wait for the answer without sending a byte of the body."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    head = f"POST {path}?{urlencode(params)} HTTP/1.1\r\nHost: {host}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
    started = time.perf_counter()
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(head.encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
    status = int(answer.split(b" ", 2)[1])
    return status, answer, time.perf_counter() - started


def declared(*shape: int, dtype: str = "float32") -> list[tuple[str, str]]:
    return [("shape", str(d)) for d in shape] + [("dtype", dtype)]


DECODE = {"Content-Type": "tensor/binary", "Accept": "tensor/binary"}


# --------------------------------------------------------------------------- 4a: the query before the body


@pytest.mark.parametrize(
    ("path", "params", "headers", "named"),
    [
        # pixels the latent decodes to: 1024x1024 > 64x64
        (
            "/sd15",
            declared(1, 4, 128, 128) + [("output_type", "pt")],
            {"Content-Length": "262144"},
            "--max-pixels",
        ),
        # request bytes = prod(shape) * itemsize, with a chunked body (no Content-Length to go by)
        (
            "/sd15",
            declared(640, 4, 8, 8) + [("output_type", "pt")],
            {"Transfer-Encoding": "chunked"},
            "--max-request-bytes",
        ),
        # encode pixels declared by a uint8 tensor
        (
            "/sd15/encode",
            declared(1, 256, 256, 3, dtype="uint8"),
            {"Content-Length": str(256 * 256 * 3)},
            "--max-pixels",
        ),
        # frames of a video
        (
            "/hunyuan_video",
            declared(1, 16, 5, 2, 2) + [("output_type", "pt")],
            {"Content-Length": "1280"},
            "--max-frames",
        ),
    ],
)
def test_limits_of_the_declared_tensor_are_checked_before_the_body_is_read(
    limited, path, params, headers, named
):
    with limited(max_pixels=64 * 64, max_request_bytes=600_000, max_frames=9) as (url, _host):
        status, answer, seconds = headers_only(url, path, params, {**DECODE, **headers})
    assert status == 413 and named.encode() in answer, answer[:400]
    assert seconds < 2


def test_a_content_length_that_cannot_match_the_shape_is_refused_before_the_body(limited):
    with limited() as (url, _host):
        status, answer, _ = headers_only(
            url, "/sd15", declared(1, 4, 8, 8), {**DECODE, "Content-Length": "999999"}
        )
    assert (
        status == 400
        and b"body has 999999 bytes but shape [1, 4, 8, 8] with dtype float32 needs 1024 bytes" in answer
    )


def test_absurd_shapes_are_a_400_not_a_crash(limited):
    with limited() as (url, _host):
        status, answer, _ = headers_only(
            url, "/sd15", declared(2**40, 2**40, 2**40, 4), {**DECODE, "Content-Length": "8"}
        )
    assert status == 400 and b"send a smaller tensor" in answer


# --------------------------------------------------------------------------- 4c: frames count as pixels


def test_frames_count_in_the_batch_pixel_limit(limited, models):
    with limited(max_batch_pixels=64 * 64) as (url, _host):
        two_images = post_decode(url + "/sd15", z(2, 4, 8, 8), output_type="pt", do_scaling=False)
        assert "a batch of 2 x 64x64 exceeds the server's limit of 4096 pixels" in error_of(two_images, 413)
        video = post_decode(url + "/hunyuan_video", z(1, 16, 5, 2, 2), output_type="pt", do_scaling=False)
        message = error_of(video, 413)
        assert (
            "a batch of 1 x 17 frames of 16x16 exceeds the server's limit of 4096 pixels per request"
            in message
        )
        assert "send fewer images or frames per request" in message
        assert models["hunyuan_video"][1].batches == []
        assert tensor_of(
            post_decode(url + "/sd15", z(1, 4, 8, 8), output_type="pt", do_scaling=False)
        ).shape == (1, 3, 64, 64)


# --------------------------------------------------------------------------- 4b: an image's declared size


def png_declaring(width: int, height: int) -> bytes:
    """A greyscale PNG of `width` x `height` black pixels: a few hundred KB that decode to width*height bytes."""
    squeeze = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    idat = b"".join(squeeze.compress(row) for _ in range(height)) + squeeze.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return protocol.PNG_MAGIC + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class PeakRSS:
    """The highest resident memory of this process (the server runs in it) while the block runs."""

    def __enter__(self) -> PeakRSS:
        self._process, self._done = psutil.Process(), threading.Event()
        self.start = self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.002):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    @property
    def grown(self) -> int:
        return self.peak - self.start


def test_an_image_declaring_more_pixels_than_allowed_is_refused_from_its_header(limited, models):
    bomb = png_declaring(12000, 12000)
    assert len(bomb) < 200_000
    with limited() as (url, _host):
        with PeakRSS() as rss:
            started = time.perf_counter()
            answer = post_encode(url + "/sd15/encode", bomb)
            seconds = time.perf_counter() - started
        message = error_of(answer, 413)
    assert (
        "12000x12000 = 144000000 pixels per image exceeds the server's limit of 16777216 pixels (--max-pixels)"
        in message
    )
    assert seconds < 1, seconds
    assert rss.grown < 100 << 20, rss.grown  # decoded, it would be 432 MB of RGB and 1.7 GB of float32
    assert models["sd15"][1].encoded == []


def test_pillow_refuses_far_bigger_images_itself_once_the_server_sets_its_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    postprocess.limit_pillow(64 * 64)
    assert Image.MAX_IMAGE_PIXELS == 64 * 64
    request = protocol.parse_encode_request([], {}, png_declaring(128, 128))
    with pytest.raises(
        LimitExceeded, match=r"far over the server's limit of 4096 pixels per image \(--max-pixels\)"
    ):
        postprocess.encoder_input(request, PRESETS["sd15"])


# --------------------------------------------------------------------------- 7: memory a request needs


def test_requests_whose_peak_memory_passes_the_budget_are_refused_before_work(limited, models):
    # On a CPU device the estimate holds the smallest plan's activations too: ~143 MB for sd15 in float32.
    with limited(max_request_memory=160 << 20) as (url, _host):
        # 512 KB of latents decode to 2 x 1024 x 1024 x 3 values: ~82 MB at the peak of their conversion.
        message = error_of(
            post_decode(url + "/sd15", z(2, 4, 128, 128), output_type="pt", do_scaling=False), 413
        )
        assert "of host memory at its peak (an answer of 6291456 pixel values and its conversions)" in message
        assert "over the server's limit of 0.16 GiB per request (--max-request-memory)" in message
        status, answer, _ = headers_only(
            url, "/sd15", declared(2, 4, 128, 128), {**DECODE, "Content-Length": "524288"}
        )
        assert status == 413 and b"--max-request-memory" in answer
        image = io.BytesIO()
        Image.new("RGB", (2048, 1024)).save(image, "PNG")
        assert "--max-request-memory" in error_of(post_encode(url + "/sd15/encode", image.getvalue()), 413)
        assert models["sd15"][1].batches == [] and models["sd15"][1].encoded == []
        assert tensor_of(
            post_decode(url + "/sd15", z(1, 4, 32, 32), output_type="pt", do_scaling=False)
        ).shape == (1, 3, 256, 256)


def test_the_footprint_counts_the_answer_the_input_and_the_smallest_plan():
    sd15, cpu = PRESETS["sd15"], torch.device("cpu")
    need = decode_footprint(sd15, (1, 4, 128, 128), torch.float32, cpu, body=262144)
    values = 3 * 1024 * 1024
    least = 2178 * 64 * 16 * 16 * 4  # the decoder's activations at one 16x16 latent tile, float32
    assert need.device == values * 8 + least
    assert need.host == 2 * 262144 + values * 13 + least  # on a CPU device the activations are the host's
    cuda = decode_footprint(sd15, (1, 4, 128, 128), torch.float16, torch.device("cuda"), body=262144)
    assert cuda.host == 2 * 262144 + values * 13 and cuda.device == values * 6 + least // 2
    video = decode_footprint(PRESETS["hunyuan_video"], (1, 16, 5, 8, 8), torch.float32, cpu, body=0)
    assert video.what == f"an answer of {3 * 17 * 64 * 64} pixel values and its conversions"
    pixels = encode_footprint(sd15, (1, 3, 512, 512), torch.float32, cpu, body=0)
    assert pixels.host == 3 * 512 * 512 * 13 + 1767 * 128 * 128 * 4  # tiles of 16 latent = 128 image pixels


def test_the_default_budget_is_an_eighth_of_the_machines_memory():
    assert Limits().max_request_memory == host_total_bytes() // 8
    assert host_total_bytes() <= psutil.virtual_memory().total


# --------------------------------------------------------------------------- 8: sizes the mp4 encoder takes


def test_mp4_wider_than_the_encoder_takes_is_refused_before_decoding(limited, models):
    with limited() as (url, _host):
        wide = post_decode(url + "/hunyuan_video", z(1, 16, 1, 1, 2050), output_type="mp4", do_scaling=False)
        assert (
            "mp4 of 16400x8 pixels per frame is over H.264's (libx264's) limit of 16384 pixels per side"
            in error_of(wide, 413)
        )
        tall = post_decode(url + "/hunyuan_video", z(1, 16, 1, 2050, 1), output_type="mp4", do_scaling=False)
        assert "of 8x16400 pixels" in error_of(tall, 413)
        assert models["hunyuan_video"][1].batches == []


def test_the_mp4_limit_is_libx264s_own():
    av = pytest.importorskip("av")
    assert postprocess.encode_mp4(
        torch.zeros(1, 2, postprocess.MAX_MP4_SIDE, 3, dtype=torch.uint8).numpy(), 24
    )
    with pytest.raises(av.error.ExternalError):
        postprocess.encode_mp4(
            torch.zeros(1, 2, postprocess.MAX_MP4_SIDE + 2, 3, dtype=torch.uint8).numpy(), 24
        )


# --------------------------------------------------------------------------- 10: factors that make NaN


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"scaling_factor": 1e-320}, "scaling_factor=1e-320 makes the latents infinite or NaN in float32"),
        ({"scaling_factor": 1e-40}, "scaling_factor=1e-40 makes"),
        (
            {"scaling_factor": 0.18215, "shift_factor": 1e39},
            "scaling_factor=0.18215 and shift_factor=1e+39 makes",
        ),
    ],
)
def test_decode_factors_that_make_the_latents_non_finite_are_a_400(limited, models, options, named):
    with limited() as (url, _host):
        message = error_of(post_decode(url + "/sd15", z(1, 4, 8, 8), output_type="pt", **options), 400)
        assert named in message and "send do_scaling=True or scaling_factor=0.18215" in message
        assert models["sd15"][1].batches == []
        assert (
            tensor_of(post_decode(url + "/sd15", z(1, 4, 8, 8), output_type="pt", scaling_factor=1e-3))
            .isfinite()
            .all()
        )


def test_encode_factors_that_make_the_latents_non_finite_are_a_400(limited):
    with limited() as (url, _host):
        pixels = torch.zeros(1, 64, 64, 3, dtype=torch.uint8)
        message = error_of(post_encode(url + "/sd15/encode", pixels, scaling_factor=1e39), 400)
        assert (
            "scaling_factor=1e+39 makes the latents infinite or NaN in float32 (x = (z - shift_factor) * scaling_factor)"
            in message
        )
        assert (
            tensor_of(post_encode(url + "/sd15/encode", pixels, scaling_factor=1e-320)).eq(0).all()
        )  # finite: z * 0


def test_the_scaling_check_is_exact_from_each_channels_extremes():
    sd15, factors = PRESETS["sd15"], preset_factors(PRESETS["sd15"])
    latent = torch.zeros(2, 4, 3, 3)
    latent[1, 2, 0, 1] = 1e38
    check_scaling(latent, Scaling(scaling_factor=0.5), factors, sd15)  # 2e38: still a float32
    latent[0, 3, 2, 2] = -2e38
    with pytest.raises(ProtocolError, match="scaling_factor=0.5 makes the latents infinite"):
        check_scaling(latent, Scaling(scaling_factor=0.5), factors, sd15)  # -4e38
    check_scaling(latent, Scaling(), factors, sd15)  # nothing sent: the latent is used as it is
