"""Remote VAE Loader's VAE object against our real VAE server on 127.0.0.1 (tiny random models, conftest.py)
and, for what that server does not do, stub servers: what ComfyUI's core nodes read of a VAE, decode and
encode in ComfyUI's layouts, tiles asked of the server, audio, and the three nodes taking the server's
geometry for preset auto.

The reference is `comfy.sd.VAE`'s contract, computed with the very modules the server hosts (`comfy_decode`
/ `comfy_encode` of remote_vae.testing). The same object inside a real ComfyUI, through its core nodes and
against the server's comfy backend, is tests/system/test_comfyui_integration.py.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch

from remote_vae.nodes import comfy_runtime, operations
from remote_vae.nodes.convert import crop_pixels
from remote_vae.nodes.operations import NodeRequest
from remote_vae.nodes.remote_vae_object import RemoteVAE, load_remote_vae
from remote_vae.nodes.resolve import NodeInputError
from remote_vae.nodes.vae_nodes import RemoteVAEDecode, RemoteVAEEncode, RemoteVAELoader
from remote_vae.remote import protocol
from remote_vae.remote.errors import RemoteVAEError
from remote_vae.testing import comfy_decode, comfy_encode
from support import stub_servers
from support.stub_servers import Canned

EXACT_ATOL = 1e-5  # the same float32 model; batch-size dependent kernel choices only (tests/nodes/test_nodes_remote.py)


def latent(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def pixels(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- what core nodes read


def test_an_image_vae_answers_what_comfyui_nodes_ask(server):
    (vae,) = RemoteVAELoader().load(f"{server}/sd15", "exact", 300)
    assert isinstance(vae, RemoteVAE)
    assert (vae.latent_channels, vae.latent_dim, vae.output_channels) == (4, 2, 3)
    assert vae.downscale_ratio == vae.upscale_ratio == 8  # VAEEncodeForInpaint computes with it
    assert vae.spacial_compression_decode() == vae.spacial_compression_encode() == 8
    assert vae.temporal_compression_decode() is None  # VAEDecodeTiled: not a video VAE
    assert vae.upscale_index_formula is None and vae.downscale_index_formula is None
    assert vae.vae_encode_crop_pixels(torch.zeros(1, 70, 52, 3)).shape == (1, 64, 48, 3)
    vae.throw_exception_if_invalid()
    # no weights, no device memory
    assert (
        vae.model_size() == vae.get_ram_usage() == vae.memory_used_decode((1, 4, 64, 64), torch.float32) == 0
    )
    assert vae.device == vae.output_device == torch.device("cpu") and vae.vae_dtype == torch.float32
    with pytest.raises(AttributeError, match="has no 'first_stage_model': its weights stay on the server"):
        _ = vae.first_stage_model
    with pytest.raises(AttributeError, match="has no 'patcher'"):
        _ = vae.patcher
    with pytest.raises(RuntimeError, match="cannot be saved: its weights stay on the server"):
        vae.get_sd()
    assert "sd15: image, 4 channels, diffusers backend" in repr(vae)


def test_a_video_vae_has_comfyuis_frame_formulas(server):
    vae = load_remote_vae(f"{server}/wan21")
    assert (vae.latent_channels, vae.latent_dim) == (16, 3)
    assert vae.temporal_compression_decode() == vae.temporal_compression_encode() == 4
    frames, height, width = vae.upscale_ratio
    assert [frames(t) for t in (1, 2, 21)] == [1, 5, 81] and (height, width) == (8, 8)
    latent_frames = vae.downscale_ratio[0]
    assert [latent_frames(f) for f in (1, 5, 81, 84)] == [1, 2, 21, 21]
    assert vae.downscale_index_formula == vae.upscale_index_formula == (4, 8, 8)  # LTXVAddGuide reads it


# --------------------------------------------------------------------------- decode and encode


def test_decode_and_encode_equal_the_same_model_locally(server, models):
    vae = load_remote_vae(f"{server}/sd15")
    samples = latent(2, 4, 6, 5, seed=1)
    images = vae.decode(samples)
    assert images.shape == (2, 48, 40, 3) and images.dtype == torch.float32
    torch.testing.assert_close(images, comfy_decode(models["sd15"], samples), atol=EXACT_ATOL, rtol=0)
    image = pixels(2, 37, 45, 3, seed=2)  # cropped to 32x40 as comfy.sd.VAE.encode crops
    result = vae.encode(image)
    assert result.shape == (2, 4, 4, 5)
    expected = comfy_encode(models["sd15"], crop_pixels(image, 8))
    torch.testing.assert_close(result, expected, atol=EXACT_ATOL, rtol=0)


def test_video_decode_gives_frames_per_video_and_encode_one_video(server, models):
    vae = load_remote_vae(f"{server}/wan21")
    samples = latent(2, 16, 2, 3, 4, seed=3)
    videos = vae.decode(samples)
    assert videos.shape == (2, 5, 24, 32, 3)  # [B,F,H,W,C], what VAE.decode gives (VAEDecode flattens it)
    expected = torch.cat(
        [comfy_decode(models["wan21"], samples[i : i + 1], frames_as_batch=False) for i in range(2)]
    )
    torch.testing.assert_close(videos, expected, atol=EXACT_ATOL, rtol=0)
    frames = pixels(5, 16, 24, 3, seed=4)  # WanImageToVideo hands its frames so: one video
    torch.testing.assert_close(
        vae.encode(frames), comfy_encode(models["wan21"], frames, video=True), atol=EXACT_ATOL, rtol=0
    )
    two = vae.encode(torch.stack([frames, frames.flip(0)]))  # [B,F,H,W,C]: B videos
    assert two.shape == (2, 16, 2, 2, 3)


def test_lossless_transfer_is_8_bit_close(server, models):
    vae = load_remote_vae(f"{server}/sd15", "lossless")
    samples = latent(1, 4, 4, 4, seed=5)
    images = vae.decode(samples)
    assert torch.equal(images, (images * 255).round() / 255)
    assert (images - comfy_decode(models["sd15"], samples)).abs().max() <= 0.63 / 255


@contextmanager
def described_stub(entry: dict, answer: Canned):
    """A server that lists one model (GET) and gives `answer` to every POST."""
    body = json.dumps({"default": entry["name"], "models": [entry]}).encode()
    listing = Canned(200, [("Content-Type", "application/json")], body)
    with stub_servers.serve(lambda request, _: listing if request.method == "GET" else answer) as stub:
        yield stub


def geometry_entry(
    name: str, dims: str, channels: int, spatial: int, temporal: int = 1, output: int = 3
) -> dict:
    geometry = {"dims": dims, "latent_channels": channels, "spatial_compression": spatial,
                "temporal_compression": temporal, "output_channels": output, "sample_rate": None, "still_image": False}  # fmt: skip
    return {"name": name, "backend": "comfy", "geometry": geometry}


def test_tiled_calls_ask_the_server_for_tiles_of_the_given_size():
    answer = stub_servers.tensor_answer(torch.zeros(1, 3, 128, 128))
    with described_stub(geometry_entry("tiny", "image", 4, 8), answer) as stub:
        vae = load_remote_vae(stub.url + "tiny")
        vae.decode_tiled(
            latent(1, 4, 16, 16), tile_x=32, tile_y=24, overlap=8
        )  # VAEDecodeTiled: latent pixels
        vae.decode_tiled(latent(1, 4, 16, 16), tile_x=8, tile_y=8)  # below the protocol's smallest tile
        with pytest.raises(RemoteVAEError):  # the stub's answer is no latent; only the request matters here
            vae.encode_tiled(pixels(1, 128, 128, 3), tile_x=512, tile_y=512, overlap=64)  # image pixels
        vae.decode(latent(1, 4, 16, 16))
    posts = [dict(r.query_items) for r in stub.requests if r.method == "POST"]
    assert [(p.get("tile"), p.get("tile_size")) for p in posts] == [
        ("on", "32"),
        ("on", "16"),
        ("on", "64"),
        (None, None),
    ]
    assert all(p["output_dtype"] == "float32" and p["reference"] == "comfyui" for p in posts[:2])


def test_audio_decode_and_encode_travel_raw():
    entry = {**geometry_entry("stable_audio", "audio", 64, 2048, output=2)}
    entry["geometry"]["sample_rate"] = 44100
    audio = torch.linspace(-1, 1, 2 * 4096).reshape(1, 2, 4096)
    with described_stub(entry, stub_servers.tensor_answer(audio)) as stub:
        vae = load_remote_vae(stub.url + "stable_audio")
        assert (
            vae.latent_dim,
            vae.audio_sample_rate,
            vae.output_channels,
            vae.temporal_compression_decode(),
        ) == (1, 44100, 2, None)
        waves = vae.decode(latent(2, 64, 2))  # VAEDecodeAudio moves the channels back: [B,samples,channels]
    assert waves.shape == (2, 4096, 2) and torch.equal(waves[1], audio[0].movedim(0, -1))
    posts = [r for r in stub.requests if r.method == "POST"]
    assert (
        len(posts) == 2
        and ("shape", "64") in posts[0].query_items
        and ("output_dtype", "float32") in posts[0].query_items
    )
    with described_stub(entry, stub_servers.tensor_answer(torch.ones(1, 64, 2))) as stub:
        vae = load_remote_vae(stub.url + "stable_audio")
        longer = torch.linspace(-1, 1, 2 * 4100).reshape(1, 2, 4100)
        codes = vae.encode(longer.movedim(1, -1))  # VAEEncodeAudio: [B,samples,channels]
    assert codes.shape == (1, 64, 2)
    [post] = [r for r in stub.requests if r.method == "POST"]
    sent = protocol.parse_encode_request(post.query_items, {}, post.body).tensor
    assert torch.equal(
        sent, longer[:, :, 2:4098]
    )  # cropped to the compression, centred, as comfy.sd.VAE crops


# --------------------------------------------------------------------------- the three nodes and the server's geometry


def test_preset_auto_takes_the_geometry_the_server_describes():
    # 12 channels, 16x: no preset fits, so before the server described its models this was an error.
    answer = stub_servers.tensor_answer(torch.zeros(1, 64, 48, 3, dtype=torch.uint8))
    with described_stub(geometry_entry("odd", "image", 12, 16), answer) as stub:
        (images,) = RemoteVAEDecode().decode(
            {"samples": latent(1, 12, 4, 3)}, "auto", stub.url + "odd", "lossless", 300
        )
    assert images.shape == (1, 64, 48, 3)
    assert [r.method for r in stub.requests] == ["GET", "POST"]


def test_preset_auto_encodes_frames_as_one_video_for_a_described_video_model():
    answer = stub_servers.tensor_answer(torch.zeros(1, 16, 2, 2, 3))
    with described_stub(geometry_entry("wan", "video", 16, 8, 4), answer) as stub:
        (result,) = RemoteVAEEncode().encode(pixels(5, 16, 24, 3), "auto", stub.url + "wan", "exact", 300)
    assert result["samples"].shape == (1, 16, 2, 2, 3)
    post = stub.requests[-1]
    assert [v for k, v in post.query_items if k == "shape"] == ["1", "3", "5", "16", "24"]


def test_preset_auto_keeps_the_shape_guess_where_there_is_no_model_list(server, models):
    answer = stub_servers.tensor_answer(torch.zeros(1, 32, 32, 3, dtype=torch.uint8))
    with stub_servers.recorder(answer) as stub:  # answers the model list request with a tensor
        (images,) = RemoteVAEDecode().decode(
            {"samples": latent(1, 16, 4, 4)}, "auto", stub.url + "flux", "lossless", 300
        )
    assert images.shape == (1, 32, 32, 3)
    request = NodeRequest("auto", f"{server}/sd15")
    assert operations.with_server_model(request, "decode").model.name == "sd15"
    assert (
        operations.with_server_model(NodeRequest("sd15", f"{server}/sd15"), "decode").model is None
    )  # a preset picked


# --------------------------------------------------------------------------- errors


def test_loader_input_errors_say_what_to_enter(server):
    with pytest.raises(
        NodeInputError, match="needs the URL of a model on your server, such as http://127.0.0.1:8190/sd15"
    ):
        load_remote_vae("  ")
    with pytest.raises(NodeInputError, match="is not an http\\(s\\) URL"):
        load_remote_vae("gpu-box:8190/sd15")
    with pytest.raises(NodeInputError, match="Hugging Face endpoint, which does not describe its model"):
        load_remote_vae("https://q1bj3bpq6kzilnsu.us-east-1.aws.endpoints.huggingface.cloud/")
    with pytest.raises(NodeInputError, match="timeout 1 s is below the minimum of 5 s"):
        load_remote_vae(f"{server}/sd15", timeout=1)
    with pytest.raises(NodeInputError, match="transfer 'compact' is not one of exact, lossless"):
        load_remote_vae(f"{server}/sd15", "compact")
    with pytest.raises(RemoteVAEError, match="model 'nope' is not hosted there; hosted models: /sd15, /sdxl"):
        load_remote_vae(f"{server}/nope")
    with pytest.raises(RemoteVAEError, match="refused the connection"):
        load_remote_vae(stub_servers.refused_url() + "sd15")


def test_a_broken_token_configuration_is_a_loader_error(monkeypatch, server):
    monkeypatch.setenv("REMOTE_VAE_TOKENS", "s3cret-pasted-alone")
    with pytest.raises(NodeInputError, match="the server token configuration cannot be used") as info:
        load_remote_vae(f"{server}/sd15")
    assert "s3cret" not in str(info.value)


def test_what_the_server_cannot_do_is_said_by_the_vae(server):
    vae = load_remote_vae(f"{server}/sd15")
    with pytest.raises(NodeInputError, match="takes no vae_options \\(num_chunks\\)"):
        vae.decode(latent(1, 4, 4, 4), vae_options={"num_chunks": 8000})
    with pytest.raises(
        RemoteVAEError, match="answered 400"
    ) as caught:  # the server checks latents against its model
        vae.decode(latent(1, 16, 4, 4))
    assert "16 channels" in caught.value.server_message


def test_calls_are_reported_on_the_node_that_makes_them(server, monkeypatch):
    seen = []
    monkeypatch.setattr(comfy_runtime, "executing_node", lambda: "42")
    monkeypatch.setattr(
        "remote_vae.nodes.operations.report_transfer",
        lambda node, transfers, seconds: seen.append((node, len(transfers))),
    )
    load_remote_vae(f"{server}/sd15").decode(latent(1, 4, 4, 4))
    assert seen == [("42", 1)]
