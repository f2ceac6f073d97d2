"""Speed-up flags: they change the memory layout, never the result."""

import torch

from remote_vae.local_server.accel import Accel, apply, input_layout
from remote_vae.testing import random_vae


def test_channels_last_keeps_the_output():
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = random_vae("sd15", 3)
    fast = apply(random_vae("sd15", 3), torch.device("cpu"), Accel(channels_last=True), video=False)
    assert fast.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = plain.decode(latent).sample
        got = fast.decode(input_layout(latent, Accel(channels_last=True))).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_flags_off_change_nothing():
    model = random_vae("sd15")
    assert apply(model, torch.device("cpu"), Accel(), video=False) is model
    x = torch.zeros(1, 4, 2, 2)
    assert input_layout(x, Accel()) is x
    assert input_layout(torch.zeros(1, 4, 2, 2, 2), Accel(channels_last=True)).is_contiguous(
        memory_format=torch.channels_last_3d
    )
