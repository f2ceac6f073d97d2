"""Encode image files of every mode Pillow opens them in: the encoder gets what the image shows (16-bit
greyscale scaled to 8 bits, EXIF orientation applied, alpha dropped as ComfyUI's LoadImage drops it),
or the request gets a 4xx naming the mode."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from remote_vae.local_server.postprocess import as_rgb
from remote_vae.remote.protocol import ProtocolError
from remote_vae.testing import random_vae
from support.hooked import Wrapped
from support.serving import hosting, post_encode, tensor_of

pytestmark = pytest.mark.timeout(120)

PALETTE = [0, 0, 0, 10, 20, 30, 40, 50, 60, 200, 100, 50]


def saved(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def palette(index: int) -> Image.Image:
    image = Image.new("P", (16, 16), index)
    image.putpalette(PALETTE)
    return image


def exif_rotated() -> bytes:
    """32x16, red left half, blue right half, stored with EXIF orientation 6 (shown rotated 90 deg clockwise)."""
    image = Image.new("RGB", (32, 16), (255, 0, 0))
    image.paste((0, 0, 255), (16, 0, 32, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    return saved(image, "JPEG", quality=100, subsampling=0, exif=exif)


FLAT = {
    "I;16 PNG": (saved(Image.new("I;16", (16, 16), 32896), "PNG"), "I;16", (128, 128, 128)),
    "I;16 PNG white": (saved(Image.new("I;16", (16, 16), 65535), "PNG"), "I;16", (255, 255, 255)),
    "1 PNG": (saved(Image.new("1", (16, 16), 1), "PNG"), "1", (255, 255, 255)),
    "L PNG": (saved(Image.new("L", (16, 16), 77), "PNG"), "L", (77, 77, 77)),
    "LA PNG": (saved(Image.new("LA", (16, 16), (100, 0)), "PNG"), "LA", (100, 100, 100)),
    "P PNG": (saved(palette(3), "PNG"), "P", (200, 100, 50)),
    "P PNG with transparency": (saved(palette(3), "PNG", transparency=3), "P", (200, 100, 50)),
    "RGBA PNG": (saved(Image.new("RGBA", (16, 16), (10, 20, 30, 0)), "PNG"), "RGBA", (10, 20, 30)),
    "RGBA WebP": (
        saved(Image.new("RGBA", (16, 16), (10, 20, 30, 128)), "WEBP", lossless=True),
        "RGBA",
        (10, 20, 30),
    ),
    "CMYK JPEG": (
        saved(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=100),
        "CMYK",
        (255, 0, 0),
    ),
    "YCbCr JPEG": (
        saved(Image.new("YCbCr", (16, 16), (128, 128, 255)), "JPEG", quality=100),
        "RGB",
        (255, 37, 128),
    ),
}


@pytest.fixture(scope="module")
def served():
    model = Wrapped(random_vae("sd15", 3, size="micro"))
    with hosting({"sd15": ("sd15", model)}) as (url, _host):
        yield url, model


def encoder_saw(served, body: bytes) -> np.ndarray:
    """The pixels the model's encoder received for `body`, as H x W x 3 values 0..255."""
    url, model = served
    model.encoded.clear()
    assert tensor_of(post_encode(url + "/sd15/encode", body)).shape[1] == 4
    (x,) = model.encoded
    return ((x[0].permute(1, 2, 0) + 1) / 2 * 255).round().to(torch.int16).numpy()


@pytest.mark.parametrize("case", list(FLAT))
def test_each_image_mode_encodes_what_the_image_shows(served, case):
    body, mode, colour = FLAT[case]
    assert Image.open(io.BytesIO(body)).mode == mode  # the mode the server's Pillow opens it in
    pixels = encoder_saw(served, body)
    tolerance = 2 if "JPEG" in case else 0
    assert pixels.shape == (16, 16, 3)
    assert np.abs(pixels - np.array(colour)).max() <= tolerance, (case, pixels[0, 0])


def test_exif_orientation_is_applied(served):
    pixels = encoder_saw(served, exif_rotated())
    assert pixels.shape == (32, 16, 3)  # shown 16 wide and 32 high
    assert np.abs(pixels[4, 8] - (255, 0, 0)).max() <= 2  # the left half is now on top
    assert np.abs(pixels[28, 8] - (0, 0, 255)).max() <= 2


@pytest.mark.parametrize(
    ("image", "colour"),
    [
        (Image.new("I", (4, 4), 32896), (128, 128, 128)),  # 32-bit integer grey: the 16-bit range, like I;16
        (Image.new("I", (4, 4), 70000), (255, 255, 255)),
        (Image.new("I;16B", (4, 4), 257), (1, 1, 1)),
        (Image.new("YCbCr", (4, 4), (128, 128, 255)), (255, 37, 128)),
    ],
)
def test_modes_no_accepted_file_format_opens_in_convert_too(image, colour):
    assert (as_rgb(image) == np.array(colour, dtype=np.uint8)).all()


def test_float_images_are_refused_naming_the_mode():
    with pytest.raises(ProtocolError, match="encode image has mode F"):
        as_rgb(Image.new("F", (4, 4), 0.5))
