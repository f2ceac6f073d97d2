"""The node classes and their operations against our real VAE server on 127.0.0.1 (tiny random models).

References are computed in-process with the very modules the server hosts (the `models` and `server`
fixtures of conftest.py), the way ComfyUI's VAEDecode / VAEEncode define the result (`comfy_decode` /
`comfy_encode` of remote_vae.testing, run ComfyUI's way where it differs from diffusers', as the nodes ask
the server to).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from remote_vae.nodes import operations
from remote_vae.nodes.convert import crop_pixels
from remote_vae.nodes.operations import NodeRequest, RunOptions
from remote_vae.nodes.resolve import NodeInputError
from remote_vae.nodes.vae_nodes import RemoteVAEDecode, RemoteVAEEncode, RemoteVideoDecode
from remote_vae.remote import tokens
from remote_vae.remote.client import RemoteVAECancelled, RemoteVAEError
from remote_vae.remote.presets import PresetError
from remote_vae.testing import comfy_decode, comfy_encode
from support import stub_servers

# lossless = the server's uint8 rounding of (x*0.5+0.5) computed in float16: at most 0.5 LSB for the rounding
# plus 2**-11 * 255 = 0.125 LSB for float16. Measured: 0.59 / 255.
LOSSLESS_ATOL = 0.63 / 255
# exact = the same float32 model; only batch-size dependent kernel choices differ (measured <= 6e-6).
EXACT_ATOL = 1e-5


class DiffusersAsComfyVAE:
    """A diffusers VAE behind ComfyUI's VAE interface (`decode` / `encode`), to exercise the fallback path."""

    def __init__(self, model):
        self.model = model
        self.calls = 0

    def decode(self, samples):
        self.calls += 1
        # [B,H,W,3], or [B,F,H,W,3] for videos: what comfy.sd.VAE.decode returns
        return comfy_decode(self.model, samples, frames_as_batch=False)

    def encode(self, pixels):
        self.calls += 1
        return comfy_encode(self.model, crop_pixels(pixels, 8))


def latent(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def pixels(*shape: int, seed: int = 0) -> torch.Tensor:
    """8-bit pixels as LoadImage gives them (k / 255 in float32)."""
    values = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))
    return values.float() / 255.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1.0 / ((a - b) ** 2).mean().item())


# --------------------------------------------------------------------------- decode


def test_decode_lossless_matches_vaedecode(server, models):
    samples = latent(2, 4, 8, 6)
    (images,) = RemoteVAEDecode().decode({"samples": samples}, "sd15", f"{server}/sd15", "lossless", 300)
    assert images.shape == (2, 64, 48, 3) and images.dtype == torch.float32
    assert torch.equal(images, (images * 255).round() / 255)  # 8-bit values
    assert (images - comfy_decode(models["sd15"], samples)).abs().max() <= LOSSLESS_ATOL


def test_decode_fails_over_to_the_next_of_several_endpoints(server, models):
    from support.stub_servers import refused_url

    samples = latent(1, 4, 8, 6, seed=5)
    endpoints = f"{refused_url()}/sd15, {server}/sd15"
    (images,) = RemoteVAEDecode().decode({"samples": samples}, "sd15", endpoints, "exact", 300)
    torch.testing.assert_close(images, comfy_decode(models["sd15"], samples), atol=EXACT_ATOL, rtol=0)


def test_decode_exact_matches_vaedecode(server, models):
    samples = latent(2, 4, 8, 6, seed=1)
    (images,) = RemoteVAEDecode().decode({"samples": samples}, "sd15", f"{server}/sd15", "exact", 300)
    torch.testing.assert_close(images, comfy_decode(models["sd15"], samples), atol=EXACT_ATOL, rtol=0)


def test_decode_compact_is_close(server, models):
    samples = latent(2, 4, 8, 8, seed=2)
    (images,) = RemoteVAEDecode().decode({"samples": samples}, "sd15", f"{server}/sd15", "compact", 300)
    assert images.shape == (2, 64, 64, 3)
    assert psnr(images, comfy_decode(models["sd15"], samples)) > 30  # JPEG q95; measured 36 dB


def test_decode_flux_latents_and_extra_latent_keys_are_ignored(server, models):
    samples = latent(1, 16, 4, 4, seed=3)
    extra = {"samples": samples, "batch_index": [7], "noise_mask": torch.ones(1, 1, 32, 32)}
    (images,) = RemoteVAEDecode().decode(extra, "flux", f"{server}/flux", "exact", 300)
    torch.testing.assert_close(images, comfy_decode(models["flux"], samples), atol=EXACT_ATOL, rtol=0)


def test_decode_auto_with_endpoint(server, models):
    samples = latent(1, 4, 4, 4, seed=4)
    (images,) = RemoteVAEDecode().decode({"samples": samples}, "auto", f"{server}/sdxl", "exact", 300)
    torch.testing.assert_close(images, comfy_decode(models["sdxl"], samples), atol=EXACT_ATOL, rtol=0)


def test_large_batches_are_split_sent_in_parallel_and_reassembled_in_order(server, models):
    samples = latent(5, 4, 4, 4, seed=5)
    outcome = operations.decode_latent(
        samples,
        NodeRequest(preset="sd15", endpoint=f"{server}/sd15", transfer="exact"),
        RunOptions(pixel_budget=2 * 32 * 32, parallel=3),
    )
    assert len(outcome.transfers) == 3  # 2 + 2 + 1 images under a budget of two 32x32 images
    assert [t.bytes_sent for t in outcome.transfers] == [2 * 256, 2 * 256, 256]  # 4x4x4 float32 latents
    assert [t.bytes_received for t in outcome.transfers] == [2 * 3 * 32 * 32 * 4] * 2 + [3 * 32 * 32 * 4]
    torch.testing.assert_close(outcome.value, comfy_decode(models["sd15"], samples), atol=EXACT_ATOL, rtol=0)


@pytest.mark.parametrize("preset", ["hunyuan_video", "wan21"])
@pytest.mark.parametrize("transfer", ["lossless", "exact"])
def test_video_decode_returns_every_frame_of_every_video_in_order(server, models, preset, transfer):
    samples = latent(2, 16, 2, 3, 4, seed=6)  # two videos of 2 latent frames -> 5 frames each
    outcome = operations.decode_latent(
        samples, NodeRequest(preset=preset, endpoint=f"{server}/{preset}", transfer=transfer, video_only=True)
    )
    assert len(outcome.transfers) == 2  # one request per video
    expected = torch.cat([comfy_decode(models[preset], samples[i : i + 1]) for i in range(2)])
    assert outcome.value.shape == (10, 24, 32, 3)
    atol = LOSSLESS_ATOL if transfer == "lossless" else EXACT_ATOL
    assert (outcome.value - expected).abs().max() <= atol


def test_video_node_class(server, models):
    samples = latent(1, 16, 2, 2, 2, seed=7)
    (frames,) = RemoteVideoDecode().decode({"samples": samples}, "auto", f"{server}/wan21", "exact", 300)
    torch.testing.assert_close(frames, comfy_decode(models["wan21"], samples), atol=EXACT_ATOL, rtol=0)


def test_decode_input_errors_before_any_request(server):
    node = RemoteVAEDecode()
    with pytest.raises(PresetError, match="latent has 16 channels but preset sd15 expects 4"):
        node.decode({"samples": latent(1, 16, 4, 4)}, "sd15", f"{server}/sd15", "lossless", 300)
    with pytest.raises(PresetError, match=r"fits several presets \(sd15, sdxl\)"):
        node.decode({"samples": latent(1, 4, 4, 4)}, "auto", "", "lossless", 300)
    with pytest.raises(
        NodeInputError, match="no public Hugging Face decode endpoint.*http://127.0.0.1:8190/wan21"
    ):
        node.decode({"samples": latent(1, 16, 2, 4, 4)}, "wan21", "", "lossless", 300)
    with pytest.raises(NodeInputError, match=r"'compact' \(JPEG\) needs image latents \[B,C,H,W\]"):
        node.decode({"samples": latent(1, 16, 2, 4, 4)}, "wan21", f"{server}/wan21", "compact", 300)
    with pytest.raises(NodeInputError, match="Remote Video Decode takes video latents"):
        RemoteVideoDecode().decode(
            {"samples": latent(1, 16, 4, 4)}, "auto", f"{server}/flux", "lossless", 300
        )
    with pytest.raises(
        NodeInputError, match="transfer 'compact' is not one of auto, lossless, near-lossless, exact"
    ):
        RemoteVideoDecode().decode(
            {"samples": latent(1, 16, 2, 4, 4)}, "auto", f"{server}/wan21", "compact", 300
        )
    with pytest.raises(NodeInputError, match="timeout 1 s is below the minimum of 5 s"):
        node.decode({"samples": latent(1, 4, 4, 4)}, "sd15", f"{server}/sd15", "lossless", 1)


# --------------------------------------------------------------------------- encode


@pytest.mark.parametrize("transfer", ["lossless", "exact"])
def test_encode_matches_vaeencode_with_crop_and_alpha_dropped(server, models, transfer):
    image = pixels(2, 37, 45, 4, seed=8)  # RGBA, not a multiple of 8
    (result,) = RemoteVAEEncode().encode(image, "sd15", f"{server}/sd15", transfer, 300)
    assert set(result) == {"samples"} and result["samples"].dtype == torch.float32
    expected = comfy_encode(models["sd15"], crop_pixels(image[..., :3], 8))
    assert result["samples"].shape == (2, 4, 4, 5)
    torch.testing.assert_close(result["samples"], expected, atol=EXACT_ATOL, rtol=0)


def test_png_encode_bodies_give_the_same_latent(server, models):
    # What the node sends the Hugging Face endpoints in lossless mode, checked against a server speaking the protocol.
    from remote_vae.nodes.convert import encode_request
    from remote_vae.remote import client

    image = pixels(1, 16, 24, 3, seed=15)
    latent_png = client.send(f"{server}/sd15", encode_request(image, "lossless", False, as_png=True)).tensor()
    torch.testing.assert_close(latent_png, comfy_encode(models["sd15"], image), atol=EXACT_ATOL, rtol=0)


def test_encode_exact_keeps_values_that_are_not_8_bit(server, models):
    image = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(9))
    (result,) = RemoteVAEEncode().encode(image, "flux", f"{server}/flux", "exact", 300)
    torch.testing.assert_close(
        result["samples"], comfy_encode(models["flux"], image), atol=EXACT_ATOL, rtol=0
    )


def test_encode_auto_with_endpoint_uses_the_servers_model(server, models):
    image = pixels(3, 16, 24, 3, seed=10)
    outcome = operations.encode_image(
        image,
        NodeRequest(preset="auto", endpoint=f"{server}/sdxl", transfer="lossless"),
        RunOptions(pixel_budget=16 * 24),
    )
    assert len(outcome.transfers) == 3
    torch.testing.assert_close(outcome.value, comfy_encode(models["sdxl"], image), atol=EXACT_ATOL, rtol=0)


@pytest.mark.parametrize("preset", ["hunyuan_video", "wan21"])
@pytest.mark.parametrize("transfer", ["lossless", "exact"])
def test_encode_video_frames_as_one_video(server, models, preset, transfer):
    frames = pixels(5, 16, 24, 3, seed=11)
    (result,) = RemoteVAEEncode().encode(frames, preset, f"{server}/{preset}", transfer, 300)
    expected = comfy_encode(
        models[preset], frames, video=True
    )  # one video [1,3,F,H,W], as ComfyUI's VAE.encode does
    assert result["samples"].shape == (1, 16, 2, 2, 3)
    torch.testing.assert_close(result["samples"], expected, atol=EXACT_ATOL, rtol=0)


def test_encode_input_errors(server):
    node = RemoteVAEEncode()
    with pytest.raises(PresetError, match="'auto' cannot tell from pixels"):
        node.encode(pixels(1, 8, 8, 3), "auto", "", "lossless", 300)
    with pytest.raises(NodeInputError, match="hunyuan_video has no public Hugging Face encode endpoint"):
        node.encode(pixels(1, 8, 8, 3), "hunyuan_video", "", "lossless", 300)
    with pytest.raises(NodeInputError, match="smaller than 8 pixels"):
        node.encode(pixels(1, 7, 30, 3), "sd15", f"{server}/sd15", "lossless", 300)
    with pytest.raises(NodeInputError, match=r"IMAGE of shape \[8, 8, 3\] is not \[B,H,W,3\]"):
        node.encode(pixels(8, 8, 3), "sd15", f"{server}/sd15", "lossless", 300)
    with pytest.raises(NodeInputError, match="transfer 'compact' is not one of lossless, exact"):
        node.encode(pixels(1, 8, 8, 3), "sd15", f"{server}/sd15", "compact", 300)


# --------------------------------------------------------------------------- remote failures, fallback, cancel


def test_remote_error_carries_endpoint_status_and_server_message(server):
    with pytest.raises(RemoteVAEError) as caught:
        RemoteVAEDecode().decode({"samples": latent(1, 4, 4, 4)}, "sd15", f"{server}/nope", "lossless", 300)
    assert caught.value.status == 404
    assert str(caught.value).startswith(f"{server}/nope answered 404: ")
    assert "sd15" in caught.value.server_message  # the server lists the models it hosts
    assert "hint: wrong URL or model name" in str(caught.value)


def test_server_rejection_without_fallback(server):
    # The server checks the latent against its model: a flux latent sent to the sd15 model is refused.
    with pytest.raises(RemoteVAEError, match="answered 400") as caught:
        RemoteVAEDecode().decode({"samples": latent(1, 16, 4, 4)}, "auto", f"{server}/sd15", "lossless", 300)
    assert "16 channels" in caught.value.server_message


def test_connection_refused_says_whether_the_server_runs():
    with pytest.raises(RemoteVAEError, match="refused the connection.*is the server running at"):
        operations.decode_latent(
            latent(1, 4, 4, 4), NodeRequest(preset="sd15", endpoint=stub_servers.refused_url() + "sd15")
        )


def test_fallback_decode_uses_the_local_vae_with_a_warning(models, caplog):
    vae = DiffusersAsComfyVAE(models["sd15"])
    samples = latent(2, 4, 4, 4, seed=12)
    url = stub_servers.refused_url() + "sd15"
    with caplog.at_level(logging.WARNING, logger="remote_vae"):
        (images,) = RemoteVAEDecode().decode({"samples": samples}, "sd15", url, "lossless", 300, vae=vae)
    assert vae.calls == 1
    assert torch.equal(images, vae.decode(samples))
    warning = (
        f"Remote VAE decode failed, used the connected VAE locally instead: {url} refused the connection"
    )
    assert warning in caplog.text


def test_fallback_video_decode_returns_frames(models, server):
    vae = DiffusersAsComfyVAE(models["wan21"])
    samples = latent(2, 16, 2, 2, 2, seed=13)
    (frames,) = RemoteVideoDecode().decode(
        {"samples": samples}, "wan21", f"{server}/missing", "exact", 300, vae=vae
    )
    assert frames.shape == (10, 16, 16, 3)
    assert torch.equal(frames, comfy_decode(models["wan21"], samples))


def test_fallback_encode(models, server, caplog):
    vae = DiffusersAsComfyVAE(models["sd15"])
    image = pixels(1, 16, 16, 3, seed=14)
    with caplog.at_level(logging.WARNING, logger="remote_vae"):
        (result,) = RemoteVAEEncode().encode(image, "sd15", f"{server}/missing", "lossless", 300, vae=vae)
    assert torch.equal(result["samples"], comfy_encode(models["sd15"], image))
    assert "Remote VAE encode failed, used the connected VAE locally instead" in caplog.text


def test_input_errors_are_not_hidden_by_the_fallback(models, server):
    vae = DiffusersAsComfyVAE(models["sd15"])
    with pytest.raises(PresetError, match="latent has 16 channels"):
        RemoteVAEDecode().decode(
            {"samples": latent(1, 16, 4, 4)}, "sd15", f"{server}/sd15", "exact", 300, vae=vae
        )
    assert vae.calls == 0


# --------------------------------------------------------------------------- stub servers for what ours never does


def test_reply_of_the_wrong_shape_is_an_error_and_falls_back(models):
    wrong = torch.zeros(1, 8, 8, 3, dtype=torch.uint8)  # a 4x4 latent decodes to 32x32, not 8x8
    with stub_servers.recorder(stub_servers.tensor_answer(wrong)) as stub:
        url = stub.url + "sd15"
        with pytest.raises(
            RemoteVAEError, match=r"answered 200 but it holds \[1, 8, 8, 3\] uint8 where a latent"
        ) as e:
            RemoteVAEDecode().decode({"samples": latent(1, 4, 4, 4)}, "sd15", url, "lossless", 300)
        assert "hint: check that the endpoint URL and the preset name the same model" in str(e.value)
        vae = DiffusersAsComfyVAE(models["sd15"])
        RemoteVAEDecode().decode({"samples": latent(1, 4, 4, 4)}, "sd15", url, "lossless", 300, vae=vae)
        assert vae.calls == 1


def test_the_token_bound_to_the_servers_origin_is_sent_and_no_other(monkeypatch):
    monkeypatch.setenv("MY_VAE_TOKEN", "never-sent")  # a variable a shared workflow might name: not read
    answer = stub_servers.tensor_answer(torch.zeros(1, 32, 32, 3, dtype=torch.uint8))
    with stub_servers.recorder(answer) as stub, stub_servers.recorder(answer) as other:
        monkeypatch.setenv(tokens.TOKENS_ENV, f"{stub.url.rstrip('/')}=s3cret-token")
        RemoteVAEDecode().decode({"samples": latent(1, 4, 4, 4)}, "sd15", stub.url + "sd15", "lossless", 300)
        RemoteVAEDecode().decode({"samples": latent(1, 4, 4, 4)}, "sd15", other.url + "sd15", "lossless", 300)
    assert stub.requests[0].header("Authorization") == "Bearer s3cret-token"
    assert other.requests[0].header("Authorization") is None


def test_a_broken_token_configuration_is_a_clear_node_error(monkeypatch, server):
    monkeypatch.setenv(tokens.TOKENS_ENV, "s3cret-pasted-alone")
    with pytest.raises(NodeInputError, match="the server token configuration cannot be used") as info:
        RemoteVAEDecode().decode({"samples": latent(1, 4, 4, 4)}, "sd15", f"{server}/sd15", "lossless", 300)
    assert "s3cret" not in str(info.value)


@pytest.mark.timeout(60)  # a broken cancel would wait for the 300 s read timeout: the test fails, never hangs
def test_cancel_ends_a_stalled_request_and_a_parallel_batch():
    with stub_servers.stalling() as stub:
        with pytest.raises(RemoteVAECancelled, match="request was cancelled"):
            operations.run_node(
                "5",
                lambda: operations.decode_latent(
                    latent(4, 4, 4, 4), NodeRequest(preset="sd15", endpoint=stub.url, transfer="lossless", timeout=300),
                    RunOptions(pixel_budget=32 * 32, interrupted=lambda: bool(stub.requests)),  # Cancel once one is in flight
                ),
                lambda: pytest.fail("a cancelled run must not fall back"),
                "decode",
            )  # fmt: skip
    assert 1 <= len(stub.requests) <= 3  # at most `parallel` requests were started before the cancel
