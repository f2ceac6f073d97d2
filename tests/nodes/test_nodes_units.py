"""The nodes' library modules on their own: chunk planning, ordered parallel runs, conversions, settings."""

from __future__ import annotations

import logging
import threading
from dataclasses import replace

import pytest
import torch

from remote_vae.nodes import comfy_runtime, convert, resolve, ui_events
from remote_vae.nodes.chunking import plan_chunks, run_in_order
from remote_vae.remote import protocol
from remote_vae.remote.errors import RemoteVAEError
from remote_vae.remote.presets import PRESETS, PresetError
from remote_vae.remote.reply import Reply, Transfer
from remote_vae.testing import encoder_input, image_of

# --------------------------------------------------------------------------- chunking


def test_plan_chunks_respects_the_pixel_budget():
    assert plan_chunks(5, 100, pixel_budget=250) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert plan_chunks(3, 100, pixel_budget=10_000) == [slice(0, 3)]
    assert plan_chunks(2, 1000, pixel_budget=10) == [slice(0, 1), slice(1, 2)]  # one item even over budget
    assert plan_chunks(4, 1, pixel_budget=100, max_items=1) == [slice(i, i + 1) for i in range(4)]


def test_plan_chunks_refuses_an_empty_batch():
    with pytest.raises(ValueError, match="batch of 0 items"):
        plan_chunks(0, 100)


def test_run_in_order_returns_results_in_job_order_whatever_finishes_first():
    # Job i may only finish after job i+1 has: completion order is the reverse of job order.
    finished = [threading.Event() for _ in range(4)]
    finished.append(threading.Event())
    finished[-1].set()

    def job(i):
        def run(stop):
            assert finished[i + 1].wait(10)
            finished[i].set()
            return f"result {i}"

        return run

    calls = []
    results = run_in_order([job(i) for i in range(4)], parallel=4, on_done=lambda: calls.append(1))
    assert results == ["result 0", "result 1", "result 2", "result 3"]
    assert len(calls) == 4


def test_run_in_order_raises_the_first_failure_and_stops_the_others():
    started, seen_stop = threading.Event(), threading.Event()

    def failing(stop):
        assert started.wait(10)  # fail only while the sibling is in flight
        raise RuntimeError("chunk 0 failed")

    def waiting(stop):
        started.set()
        if stop.wait(10):
            seen_stop.set()
        return "late"

    with pytest.raises(RuntimeError, match="chunk 0 failed"):
        run_in_order([failing, waiting], parallel=2)
    assert seen_stop.is_set()  # the sibling was told to stop (and the pool waited for it)


def test_run_in_order_stops_jobs_when_on_done_raises():
    started, stopped = threading.Event(), threading.Event()

    def quick(stop):
        assert started.wait(10)
        return 1

    def slow(stop):
        started.set()
        if stop.wait(10):
            stopped.set()
        return 2

    def interrupt():
        raise KeyboardInterrupt("cancel pressed")

    with pytest.raises(KeyboardInterrupt):
        run_in_order([quick, slow], parallel=2, on_done=interrupt)
    assert stopped.is_set()


# --------------------------------------------------------------------------- settings


def test_decode_preset_explicit_and_checked():
    assert resolve.decode_preset("sd15", [1, 4, 8, 8], has_endpoint=False).name == "sd15"
    with pytest.raises(
        PresetError, match="latent has 16 channels but preset sd15 expects 4; pick the sd3 or flux"
    ):
        resolve.decode_preset("sd15", [1, 16, 8, 8], has_endpoint=False)
    with pytest.raises(PresetError, match="unknown preset 'sd99'"):
        resolve.decode_preset("sd99", [1, 4, 8, 8], has_endpoint=False)


def test_decode_preset_auto():
    # unambiguous
    assert resolve.decode_preset("auto", [1, 48, 2, 4, 4], has_endpoint=False).name == "wan22"
    # several fit: fine with a URL (same output size), an error listing the choices without one
    assert resolve.decode_preset("auto", [1, 4, 8, 8], has_endpoint=True).name in ("sd15", "sdxl")
    with pytest.raises(PresetError, match=r"fits several presets \(sd15, sdxl\); pick one explicitly"):
        resolve.decode_preset("auto", [1, 4, 8, 8], has_endpoint=False)
    with pytest.raises(PresetError, match="no preset fits a latent of shape"):
        resolve.decode_preset("auto", [1, 7, 8, 8], has_endpoint=True)


def test_decode_preset_layout_errors():
    with pytest.raises(resolve.NodeInputError, match=r"neither images \[B,C,H,W\] nor videos"):
        resolve.decode_preset("auto", [64, 64], has_endpoint=True)
    with pytest.raises(
        resolve.NodeInputError, match="Remote Video Decode takes video latents.*use Remote VAE Decode"
    ):
        resolve.decode_preset("auto", [1, 16, 8, 8], has_endpoint=True, video_only=True)


def test_encode_preset():
    assert resolve.encode_preset("flux", has_endpoint=False).name == "flux"
    assert resolve.encode_preset("auto", has_endpoint=True) is None
    with pytest.raises(PresetError, match="'auto' cannot tell from pixels which VAE"):
        resolve.encode_preset("auto", has_endpoint=False)


def test_endpoint_url():
    sd15 = PRESETS["sd15"]
    assert resolve.endpoint_url("", sd15, "decode") == sd15.hf_decode_endpoint
    assert resolve.endpoint_url("  ", sd15, "encode") == sd15.hf_encode_endpoint
    assert resolve.endpoint_url(" http://h:8190/sd15 ", sd15, "decode") == "http://h:8190/sd15"
    with pytest.raises(
        resolve.NodeInputError,
        match=r"preset wan21 has no public Hugging Face decode endpoint: "
        r"enter your server's URL in `endpoint`, such as http://127.0.0.1:8190/wan21",
    ):
        resolve.endpoint_url("", PRESETS["wan21"], "decode")
    with pytest.raises(
        resolve.NodeInputError, match="hunyuan_video has no public Hugging Face encode endpoint"
    ):
        resolve.endpoint_url("", PRESETS["hunyuan_video"], "encode")
    with pytest.raises(resolve.NodeInputError, match="preset sd15 has no public"):
        resolve.endpoint_url("", None, "encode")
    for bad in ("ftp://h/sd15", "127.0.0.1:8190/sd15", "http://", "http://a:1/sd15, b:2/sd15"):
        with pytest.raises(resolve.NodeInputError, match="is not an http\\(s\\) URL"):
            resolve.endpoint_url(bad, sd15, "decode")
    several = "http://a:8190/sd15, http://b:8190/sd15"
    assert resolve.endpoint_url(several, sd15, "decode") == several


# --------------------------------------------------------------------------- conversions


def _params(wire: protocol.WireRequest) -> dict[str, list[str]]:
    return protocol.parse_query(wire.params)


def test_decode_requests_send_raw_latents_without_scaling():
    latent = torch.randn(2, 4, 3, 5)
    lossless = convert.decode_request(latent, "lossless")
    assert lossless.params == [
        ("image_format", "jpg"), ("output_type", "pt"), ("partial_postprocess", "True"),
        ("shape", "2"), ("shape", "4"), ("shape", "3"), ("shape", "5"), ("dtype", "float32"),
        ("reference", "comfyui"),
    ]  # fmt: skip
    assert lossless.headers == {"Content-Type": "tensor/binary", "Accept": "tensor/binary"}
    assert lossless.body == protocol.tensor_to_bytes(latent)
    exact = _params(convert.decode_request(latent, "exact"))
    assert exact["output_type"] == ["pt"] and exact["partial_postprocess"] == ["False"]
    assert exact["output_dtype"] == ["float32"]
    compact = convert.decode_request(latent, "compact")
    assert _params(compact)["output_type"] == ["pil"] and compact.headers["Accept"] == "image/jpeg"
    for wire in (lossless, compact):
        assert not {"scaling_factor", "shift_factor", "do_scaling"} & set(_params(wire))
    assert exact["reference"] == ["comfyui"] and _params(compact)["reference"] == ["comfyui"]
    doubles = convert.decode_request(latent.double(), "exact")
    assert _params(doubles)["dtype"] == ["float32"]  # float64 is not on the wire: sent as float32
    with pytest.raises(ValueError, match="transfer 'png' is not one of"):
        convert.decode_request(latent, "png")


def test_encode_requests():
    pixels = torch.tensor([[[[0.0, 0.5, 1.0], [0.25, 2.0, -1.0]]]])  # [1,1,2,3], two out of range
    lossless = convert.encode_request(pixels, "lossless", as_video=False)
    assert _params(lossless)["shape"] == ["1", "1", "2", "3"] and _params(lossless)["dtype"] == ["uint8"]
    assert list(lossless.body) == [0, 128, 255, 64, 255, 0]
    assert lossless.headers == {}  # like diffusers' encode: no Content-Type
    exact = convert.encode_request(pixels, "exact", as_video=False)
    assert _params(exact)["shape"] == ["1", "3", "1", "2"]
    sent = protocol.tensor_from_bytes(exact.body, [1, 3, 1, 2], "float32")
    assert torch.equal(sent, encoder_input(pixels))
    frames = torch.rand(5, 8, 16, 3)
    video = convert.encode_request(frames, "exact", as_video=True)
    assert _params(video)["shape"] == ["1", "3", "5", "8", "16"]
    sent = protocol.tensor_from_bytes(video.body, [1, 3, 5, 8, 16], "float32")
    assert torch.equal(sent[0, :, 2], encoder_input(frames, video=True)[0, :, 2])
    with pytest.raises(ValueError, match="transfer 'compact' is not one of lossless, exact"):
        convert.encode_request(frames, "compact", as_video=False)


def test_png_encode_requests_for_hugging_face_endpoints():
    import io

    import numpy as np
    from PIL import Image

    assert resolve.is_hugging_face(PRESETS["sd15"].hf_encode_endpoint)
    assert not resolve.is_hugging_face("http://127.0.0.1:8190/sd15")
    image = torch.randint(0, 256, (1, 8, 16, 3)).float() / 255
    wire = convert.encode_request(image, "lossless", as_video=False, as_png=True)
    assert wire.params == [] and wire.headers == {}  # as diffusers sends a PIL image: a bare PNG body
    assert wire.body.startswith(protocol.PNG_MAGIC)
    decoded = np.asarray(Image.open(io.BytesIO(wire.body)))
    assert np.array_equal(decoded, (image[0] * 255).round().to(torch.uint8).numpy())
    exact = convert.encode_request(image, "exact", as_video=False, as_png=True)
    assert _params(exact)["dtype"] == ["float32"]  # exact stays float: PNG is 8-bit
    with pytest.raises(ValueError, match="a PNG holds one image, not a batch of 2"):
        convert.encode_request(image.repeat(2, 1, 1, 1), "lossless", as_video=False, as_png=True)


def test_crop_pixels_centres_like_comfyui():
    pixels = torch.arange(1 * 37 * 45 * 3, dtype=torch.float32).reshape(1, 37, 45, 3)
    cropped = convert.crop_pixels(pixels, 8)
    # ComfyUI keeps (size // 8) * 8 starting at (size % 8) // 2: rows 2..33, columns 2..41
    assert torch.equal(cropped, pixels[:, 2:34, 2:42])
    assert convert.crop_pixels(pixels[:, :32, :40], 8).shape == (1, 32, 40, 3)


def _reply(tensor: torch.Tensor | None, body: bytes = b"") -> Reply:
    headers = {}
    if tensor is not None:
        body, headers = protocol.tensor_response(tensor)
    return Reply(body, headers, Transfer("http://h:8190/sd15", 200, 0, len(body), 0.0, 1))


def _pixels_received(reply: Reply, preset, latent_shape: list[int]) -> torch.Tensor:
    """The IMAGE of a uint8 reply taken as the node takes it: through its receiver, in chunks."""
    receiver = convert.pixel_receiver(preset, latent_shape)(reply)
    for start in range(0, len(reply.body), 1000):
        receiver.feed(reply.body[start : start + 1000])
    receiver.finish()
    return convert.image_from_reply(replace(reply, receiver=receiver), "lossless", preset, latent_shape)


def test_image_from_reply_layouts():
    sd15, wan = PRESETS["sd15"], PRESETS["wan21"]
    raw = torch.linspace(-1.5, 1.5, 2 * 3 * 16 * 8).reshape(2, 3, 16, 8)
    image = convert.image_from_reply(_reply(raw), "exact", sd15, [2, 4, 2, 1])
    assert torch.equal(image, image_of(raw))
    pixels = torch.randint(0, 256, (2, 16, 8, 3), dtype=torch.uint8)
    assert torch.equal(_pixels_received(_reply(pixels), sd15, [2, 4, 2, 1]), pixels / 255.0)
    # video: [B,3,F,H,W] -> frames of video 0, then video 1
    video = torch.randn(1, 3, 5, 8, 16)
    frames = convert.image_from_reply(_reply(video), "exact", wan, [1, 16, 2, 1, 2])
    assert frames.shape == (5, 8, 16, 3)
    assert torch.equal(frames[3], image_of(video)[0, 3])


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)  # NaNs compare equal by their bit patterns


def test_image_from_reply_gives_exactly_the_torch_formulas():
    sd15 = PRESETS["sd15"]
    every_byte = torch.arange(256, dtype=torch.uint8).repeat(3 * 2).view(2, 16, 16, 3)
    reply = _reply(every_byte)
    image = _pixels_received(reply, sd15, [2, 4, 2, 2])
    assert image.is_contiguous() and torch.equal(_bits(image), _bits(every_byte.float() / 255.0))
    image[:] = 0  # the IMAGE is ours to change: the reply's bytes were read in place, not handed out
    assert torch.equal(_pixels_received(reply, sd15, [2, 4, 2, 2]), every_byte / 255.0)
    specials = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, -1.0, 1.0, 1e-45, -1e-45, 3e38, -3e38]
    raw = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)).mul(1.2)
    raw.view(-1)[: len(specials)] = torch.tensor(specials)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        sent = raw.to(dtype)
        want = torch.clamp((sent.float() + 1.0) / 2.0, min=0.0, max=1.0).movedim(1, -1).reshape(-1, 16, 16, 3)
        image = convert.image_from_reply(_reply(sent), "exact", sd15, [2, 4, 2, 2])
        assert image.is_contiguous() and torch.equal(_bits(image), _bits(want)), dtype


def test_one_chunk_is_returned_without_a_copy():
    from remote_vae.nodes import operations

    value = torch.zeros(1, 8, 8, 3)
    transfer = Transfer("http://h:8190/sd15", 200, 0, 0, 0.0, 1)
    outcome = operations._run([lambda stop: (value, transfer)], operations.RunOptions())
    assert outcome.value is value
    two = operations._run([lambda stop: (value, transfer)] * 2, operations.RunOptions())
    assert two.value.shape == (2, 8, 8, 3)


def test_image_from_reply_refuses_what_does_not_fit():
    sd15 = PRESETS["sd15"]
    with pytest.raises(
        RemoteVAEError,
        match=r"it holds \[1, 3, 8, 8\] float32 where a latent of shape "
        r"\[1, 4, 2, 2\] decodes to \[1, 3, 16, 16\] float with preset sd15",
    ):
        convert.image_from_reply(_reply(torch.zeros(1, 3, 8, 8)), "exact", sd15, [1, 4, 2, 2])
    with pytest.raises(RemoteVAEError, match=r"decodes to \[1, 16, 16, 3\] uint8"):
        _pixels_received(_reply(torch.zeros(1, 16, 16, 3)), sd15, [1, 4, 2, 2])
    with pytest.raises(RemoteVAEError, match="it holds uint8 values where floats were asked for"):
        convert.image_from_reply(
            _reply(torch.zeros(1, 3, 16, 16, dtype=torch.uint8)), "exact", sd15, [1, 4, 2, 2]
        )
    with pytest.raises(RemoteVAEError, match=r"not a readable JPEG image \(5 bytes\)"):
        convert.image_from_reply(_reply(None, b"hello"), "compact", sd15, [1, 4, 2, 2])


def test_image_from_jpeg():
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), (255, 0, 128)).save(buffer, format="JPEG", quality=100)
    image = convert.image_from_reply(
        _reply(None, buffer.getvalue()), "compact", PRESETS["sd15"], [1, 4, 1, 2]
    )
    assert image.shape == (1, 8, 16, 3)
    assert torch.allclose(image[0, 0, 0], torch.tensor([1.0, 0.0, 0.5]), atol=3 / 255)
    with pytest.raises(RemoteVAEError, match="it is a 16x8 image where the latent decodes to 16x16"):
        convert.image_from_reply(_reply(None, buffer.getvalue()), "compact", PRESETS["sd15"], [1, 4, 2, 2])


def test_latent_from_reply():
    sd15, hunyuan, qwen = PRESETS["sd15"], PRESETS["hunyuan_video"], PRESETS["qwen_image"]
    latent = torch.randn(2, 4, 2, 3).half()
    out = convert.latent_from_reply(_reply(latent), sd15, [2, 16, 24, 3], False, False)
    assert out.dtype == torch.float32 and torch.equal(out, latent.float())
    video = convert.latent_from_reply(
        _reply(torch.zeros(1, 16, 3, 2, 2)), hunyuan, [9, 16, 16, 3], True, False
    )
    assert video.shape == (1, 16, 3, 2, 2)  # 9 frames -> 3 latent frames
    still = convert.latent_from_reply(_reply(torch.zeros(1, 16, 1, 2, 2)), qwen, [1, 16, 16, 3], False, True)
    assert still.shape == (1, 16, 1, 2, 2)
    with pytest.raises(RemoteVAEError, match=r"where \[2, 16, 24, 3\] pixels encode to \[2, 4, 2, 3\]"):
        convert.latent_from_reply(_reply(torch.zeros(2, 16, 2, 3)), sd15, [2, 16, 24, 3], False, False)
    with pytest.raises(RemoteVAEError, match="where a float latent was expected"):
        convert.latent_from_reply(
            _reply(torch.zeros(2, 4, 2, 3, dtype=torch.uint8)), sd15, [2, 16, 24, 3], False, False
        )
    # no preset ("auto" with a URL): any latent batch of the right size
    anything = convert.latent_from_reply(_reply(torch.zeros(2, 7, 2, 3)), None, [2, 16, 24, 3], False, False)
    assert anything.shape == (2, 7, 2, 3)
    with pytest.raises(RemoteVAEError, match="not a latent batch of 2.*pick its preset"):
        convert.latent_from_reply(_reply(torch.zeros(1, 16, 1, 2, 3)), None, [2, 16, 24, 3], False, False)


# --------------------------------------------------------------------------- ComfyUI runtime and events outside ComfyUI


def test_runtime_services_are_no_ops_outside_comfyui():
    assert comfy_runtime.interrupted() is False
    assert comfy_runtime.raise_interrupt() is None
    assert comfy_runtime.prompt_server() is None
    bar = comfy_runtime.progress_bar(3, "7")
    bar.update(1)


def _transfer(sent, received, seconds, server="remote-vae/0.1"):
    return Transfer("http://h:8190/sd15", 200, sent, received, seconds, 1, server, None)


def test_transfer_summary_and_reports(caplog):
    transfers = [_transfer(100, 1000, 0.5), _transfer(50, 500, 0.25, server="other")]
    summary = ui_events.transfer_summary("12", transfers, seconds=0.6)
    assert summary == {
        "node": "12", "bytes_sent": 150, "bytes_received": 1500, "seconds": 0.6,
        "server": "other, remote-vae/0.1", "endpoint": "http://h:8190/sd15", "requests": 2,
    }  # fmt: skip
    assert ui_events.transfer_summary("12", transfers)["seconds"] == 0.75  # no wall time: the sum
    assert ui_events.report_transfer("12", transfers) is False  # no PromptServer here: nothing sent
    with caplog.at_level(logging.WARNING, logger="remote_vae"):
        assert ui_events.report_warning("12", "server down, decoded locally") is False
    assert "server down, decoded locally" in caplog.text
