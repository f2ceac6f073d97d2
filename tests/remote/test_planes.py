"""remote/planes.py: packed uploads round-trip byte for byte, and a payload that does not hold its
declared tensor is refused without being inflated past it."""

import pytest
import torch

from remote_vae.remote import planes, protocol
from remote_vae.remote.planes import PlanesError


def latent(dtype: torch.dtype, shape: tuple[int, ...] = (2, 16, 5, 12, 20)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(3)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_packed_bytes_come_back_exactly(dtype):
    raw = protocol.tensor_to_bytes(latent(dtype))
    packed = planes.pack(raw, dtype.itemsize)
    assert len(packed) < len(raw)
    assert bytes(planes.unpack(packed, len(raw), dtype.itemsize)) == raw


def test_byte_planes_are_what_compresses():
    """Plane k holds byte k of every value: a bfloat16 latent's sign-and-exponent plane is what shrinks
    (a 1 MB latent, 5 Wan latent frames of 480x832: 0.69x packed, 0.78x compressed as it is)."""
    raw = protocol.tensor_to_bytes(latent(torch.bfloat16, (1, 16, 5, 60, 104)))
    import imagecodecs

    as_is = len(imagecodecs.zstd_encode(raw, level=planes.LEVEL))
    assert len(planes.pack(raw, 2)) < 0.92 * as_is
    assert len(planes.pack(raw, 2)) < 0.72 * len(raw)


def test_a_packed_request_names_its_coding_and_keeps_the_rest():
    wire = protocol.build_decode_request(latent(torch.bfloat16), output_type="pt", do_scaling=False)
    packed = planes.packed(wire, 2)
    assert packed.params == wire.params
    assert packed.headers == {**wire.headers, "Content-Encoding": "x-remote-vae-zstd-planes"}
    assert bytes(planes.unpack(packed.body, len(wire.body), 2)) == wire.body


def test_a_body_that_packing_would_not_shrink_goes_as_it_is():
    wire = protocol.build_decode_request(torch.ones(1, 4, 1, 1), output_type="pt", do_scaling=False)
    assert planes.packed(wire, 4) is wire  # 16 bytes: zstd's frame alone is about as large


def test_more_bytes_than_declared_are_refused_at_the_declared_size():
    bomb = planes.pack(bytes(64 << 20), 2)  # 64 MiB of zeros in a few KiB
    with pytest.raises(PlanesError, match=r"does not decode to the 4096 bytes its shape and dtype declare"):
        planes.unpack(bomb, 4096, 2)


def test_fewer_bytes_than_declared():
    with pytest.raises(PlanesError, match=r"^the x-remote-vae-zstd-planes body decodes to 4096 bytes, but"):
        planes.unpack(planes.pack(bytes(4096), 2), 8192, 2)


def test_bytes_that_are_not_zstd():
    with pytest.raises(PlanesError, match=r"^the x-remote-vae-zstd-planes body of 9 bytes does not decode"):
        planes.unpack(b"not zstd!", 8, 2)


@pytest.mark.parametrize("nbytes", [0, 7])
def test_sizes_that_are_not_whole_values(nbytes):
    with pytest.raises(PlanesError, match=rf"not {nbytes} bytes; send an empty tensor without"):
        planes.unpack(planes.pack(bytes(8), 2), nbytes, 2)
