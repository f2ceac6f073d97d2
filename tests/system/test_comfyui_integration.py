"""The pack inside a real ComfyUI 0.3.75 (headless, CPU) next to our real VAE server.

One ComfyUI and one VAE server per module. Both load the same VAE files, random VAEs in the single-file
layout of ComfyUI's models/vae (remote_vae.testing): ComfyUI through VAELoader, our server through its
single-file loader. Prompts go through /prompt in API format and results come back through /history,
the output folder (SaveImage, SaveLatent, and a float32 probe node the harness installs) and the
websocket. Every comparison is remote node vs ComfyUI's own VAEDecode / VAEEncode on the same file (for
HunyuanVideo, where ComfyUI's model code and diffusers' differ, also vs diffusers on the same file).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from remote_vae.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from remote_vae.testing import comfy_decode, random_vae, save_comfy_single_file
from support import stub_servers
from support.comfyui_harness import EventListener, error_of, running_vae_server, status_of
from support.comfyui_harness import Prompt as HarnessPrompt

pytestmark = pytest.mark.timeout(900)

FILES = {
    "sd15": "sd15_random.safetensors",
    "hunyuan_video": "hunyuan_random.safetensors",
    "wan21": "wan21_random.safetensors",
}
IMAGE = "frames.png"  # 3 frames of 70x52: a batch of 3, not a multiple of 8 (cropped to 64x48)
VIDEO_FRAMES = "video.png"  # 5 frames of 32x24: one video for the video VAEs
LATENTS = {"hunyuan_video": "hunyuan.latent", "wan21": "wan21.latent"}

# ComfyUI 0.3.75's HunyuanVideo VAE attends over all frames in its mid blocks; diffusers' (like the original
# HunyuanVideo code) masks that attention causally in time: 0.14 apart on these random weights. Our nodes send
# `reference=comfyui`, and the server then runs that attention unmasked (local_server/parity.py).
VIDEO_PRESETS = ["hunyuan_video", "wan21"]

# Max |remote - ComfyUI| (CPU, float32, ComfyUI 0.3.75's VAE code vs diffusers' on the same weights), measured:
# decode exact 4.6e-6 (SD) / 1.4e-6 (Wan); encode 1.2e-5 (SD) / 3.6e-7 (Wan); lossless 0.577 / 255. Lossless is
# bounded by the server's 8-bit rounding (0.5 / 255) plus float16 in its (x * 0.5 + 0.5) (0.125 / 255).
EXACT_LIMIT = 1e-5
LOSSLESS_LIMIT = 0.65 / 255
DECODE_LIMIT = {"lossless": LOSSLESS_LIMIT, "exact": EXACT_LIMIT}
ENCODE_LIMIT = 3e-5
VIDEO_LIMIT = DECODE_LIMIT


# --------------------------------------------------------------------------- fixtures


def _smooth_frames(count: int, width: int, height: int, seed: int) -> list[Image.Image]:
    """Smooth colour fields (an image a VAE meets in practice, unlike noise), one per frame."""
    generator = torch.Generator().manual_seed(seed)
    frames = []
    for _ in range(count):
        coarse = torch.rand(1, 3, 4, 4, generator=generator)
        field = torch.nn.functional.interpolate(
            coarse, size=(height, width), mode="bicubic", align_corners=True
        )
        pixels = (field.clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        frames.append(Image.fromarray(pixels))
    return frames


def _save_frames(frames: list[Image.Image], path: Path) -> None:
    frames[0].save(path, save_all=True, append_images=frames[1:], format="PNG")


def _save_latent(tensor: torch.Tensor, path: Path) -> None:
    """A `.latent` file as ComfyUI's SaveLatent writes it (LoadLatent reads it back unscaled)."""
    save_file({"latent_tensor": tensor.contiguous(), "latent_format_version_0": torch.tensor([])}, str(path))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("comfyui")
    (root / "models" / "vae").mkdir(parents=True)
    (root / "input").mkdir()
    for seed, (preset, name) in enumerate(FILES.items(), start=1):
        model = random_vae(preset, seed, size="comfy")
        save_comfy_single_file(model, preset, root / "models" / "vae" / name)
    _save_frames(_smooth_frames(3, 70, 52, seed=0), root / "input" / IMAGE)
    _save_frames(_smooth_frames(5, 32, 24, seed=1), root / "input" / VIDEO_FRAMES)
    for seed, name in enumerate(LATENTS.values(), start=10):
        # two videos of 2 latent frames (5 frames each) of 3x4 latents: a fixed, non-zero latent
        _save_latent(
            torch.randn(2, 16, 2, 3, 4, generator=torch.Generator().manual_seed(seed)), root / "input" / name
        )
    return root


@pytest.fixture(scope="module")
def vae_server(base) -> str:
    models = {preset: base / "models" / "vae" / name for preset, name in FILES.items()}
    with running_vae_server(models, base / "vae_server.log") as url:
        yield url


# --------------------------------------------------------------------------- prompt building


class Prompt(HarnessPrompt):
    """An API-format prompt (support.comfyui_harness.Prompt) with this file's shorthand."""

    def remote(self, class_type: str, source: str, preset: str, endpoint: str, transfer: str, **extra) -> str:
        first = "pixels" if class_type == "RemoteVAEEncode" else "samples"
        return self.add(
            class_type, **{first: [source, 0]}, preset=preset, endpoint=endpoint, transfer=transfer, timeout=120,
            **extra,
        )  # fmt: skip


def probe(comfy, name: str) -> torch.Tensor:
    return load_file(str(comfy.output_dir / f"{name}.safetensors"))["images"]


def saved_latent(comfy, entry: dict, node_id: str) -> torch.Tensor:
    item = entry["outputs"][node_id]["latents"][0]
    return load_file(str(comfy.output_dir / item["subfolder"] / item["filename"]))["latent_tensor"]


def run_ok(comfy, prompt: Prompt) -> dict:
    entry = comfy.run(prompt.nodes)
    assert status_of(entry) == "success", json.dumps(entry["status"])[:3000]
    return entry


# --------------------------------------------------------------------------- the nodes as ComfyUI sees them


def test_object_info_lists_our_nodes(comfy):
    info = comfy.object_info()
    assert set(NODE_CLASS_MAPPINGS) <= set(info)
    loader = info["RemoteVAELoader"]
    assert loader["display_name"] == "Remote VAE Loader" and loader["category"] == "latent/remote"
    assert loader["input_order"] == {"required": ["endpoint", "transfer", "timeout"]} and loader[
        "output"
    ] == ["VAE"]
    for node_type in ("RemoteVAEDecode", "RemoteVAEEncode", "RemoteVideoDecode"):
        node = info[node_type]
        assert node["display_name"] == NODE_DISPLAY_NAME_MAPPINGS[node_type]
        assert node["category"] == "latent/remote"
        assert node["input_order"]["required"][1:] == ["preset", "endpoint", "transfer", "timeout"]
        assert node["input_order"]["optional"] == ["vae"]
        assert node["input"]["hidden"] == {"unique_id": "UNIQUE_ID"}
    assert info["RemoteVAEDecode"]["input"]["required"]["transfer"][0] == [
        "auto",
        "lossless",
        "exact",
        "compact",
    ]
    assert info["RemoteVideoDecode"]["input"]["required"]["preset"][0] == [
        "auto",
        "hunyuan_video",
        "wan21",
        "wan22",
    ]
    assert info["RemoteVAEEncode"]["output"] == ["LATENT"]
    assert info["RemoteVideoDecode"]["output"] == ["IMAGE"]


def test_example_workflows_are_listed_and_their_core_widgets_fit(comfy):
    templates = comfy.get("/workflow_templates").json()
    examples = sorted(Path(__file__).resolve().parents[2].glob("example_workflows/*.json"))
    assert sorted(templates["remote-vae"]) == [p.stem for p in examples]
    info = comfy.object_info()
    for path in examples:
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] in info:
                _check_widgets(path.stem, node, info[node["type"]])


def _check_widgets(workflow: str, node: dict, spec: dict) -> None:
    """widgets_values as the frontend stores them: one per widget input in order (+1 after a seed's
    control_after_generate, +1 for an image upload button); combo values must be offered, except file
    names (this ComfyUI has none of the models)."""
    widgets = []
    for section in ("required", "optional"):
        for name in spec["input_order"].get(section, []):
            kind, options = (spec["input"][section][name] + [{}])[:2]
            if isinstance(kind, list) or kind == "COMBO" or kind in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                widgets.append((name, kind, options, section))
                if options.get("control_after_generate"):
                    widgets.append(("control_after_generate", "CONTROL", {}, section))
                if options.get("image_upload"):
                    widgets.append(("upload", "UPLOAD", {}, section))
    values = node["widgets_values"]
    required = sum(1 for w in widgets if w[3] == "required")
    where = f"{workflow}: {node['type']}"
    assert required <= len(values) <= len(widgets), (
        f"{where}: {len(values)} values for {len(widgets)} widgets"
    )
    for (name, kind, options, _), value in zip(widgets, values):
        choices = kind if isinstance(kind, list) else options.get("options") if kind == "COMBO" else None
        if choices is not None and not (isinstance(value, str) and "." in value):
            assert value in choices, f"{where}: {name}={value!r} not in {choices}"
        elif kind == "INT":
            assert isinstance(value, int) and options.get("min", value) <= value <= options.get(
                "max", value
            ), where
        elif kind == "FLOAT":
            assert isinstance(value, (int, float)) and options.get("min", value) <= value <= options.get(
                "max", value
            )
        elif kind == "STRING":
            assert isinstance(value, str), where
        elif kind == "BOOLEAN":
            assert isinstance(value, bool), where
        elif kind == "CONTROL":
            assert value in ("fixed", "increment", "decrement", "randomize"), where


# --------------------------------------------------------------------------- decode and encode vs ComfyUI's own nodes


@pytest.mark.parametrize("transfer", ["lossless", "exact"])
def test_remote_decode_equals_vaedecode(comfy, vae_server, transfer):
    p = Prompt()
    image = p.add("LoadImage", image=IMAGE)
    vae = p.add("VAELoader", vae_name=FILES["sd15"])
    latent = p.add("VAEEncode", pixels=[image, 0], vae=[vae, 0])
    # An API prompt saved before tokens were bound to servers still runs: its token_env input is ignored.
    remote = p.remote(
        "RemoteVAEDecode", latent, "sd15", f"{vae_server}/sd15", transfer, token_env="AWS_SECRET_KEY"
    )
    local = p.add("VAEDecode", samples=[latent, 0], vae=[vae, 0])
    p.add("RemoteVAETestSaveTensor", images=[remote, 0], name=f"decode_remote_{transfer}")
    p.add("RemoteVAETestSaveTensor", images=[local, 0], name=f"decode_local_{transfer}")
    save = p.add("SaveImage", images=[remote, 0], filename_prefix=f"remote_{transfer}")
    with EventListener(comfy) as events:
        entry = run_ok(comfy, p)
    ours, theirs = probe(comfy, f"decode_remote_{transfer}"), probe(comfy, f"decode_local_{transfer}")
    assert ours.shape == theirs.shape == (3, 48, 64, 3)
    assert theirs.std() > 0.05  # a meaningful image, not a flat field
    difference = (ours - theirs).abs().max().item()
    print(f"decode {transfer}: max |remote - VAEDecode| = {difference:.3g} ({difference * 255:.3f} / 255)")
    assert difference <= DECODE_LIMIT[transfer]
    [png] = entry["outputs"][save]["images"][:1]
    saved = np.asarray(Image.open(comfy.output_dir / png["subfolder"] / png["filename"]))
    assert np.array_equal(
        saved, np.clip(ours[0].numpy() * 255.0, 0, 255).astype(np.uint8)
    )  # SaveImage's rounding
    [transfer_event] = [e for e in events.of_type("remote_vae.transfer") if e["node"] == remote]
    assert transfer_event["requests"] == 1 and transfer_event["endpoint"] == f"{vae_server}/sd15"
    assert transfer_event["bytes_sent"] == 3 * 4 * 6 * 8 * 4  # the float32 latent
    per_pixel = 3 if transfer == "lossless" else 3 * 4
    assert transfer_event["bytes_received"] == 3 * 48 * 64 * per_pixel
    assert [e for e in events.of_type("progress") if e["node"] == remote] == [
        {"value": 1, "max": 1, "prompt_id": entry["prompt"][1], "node": remote}
    ]


@pytest.mark.parametrize("transfer", ["lossless", "exact"])
def test_remote_encode_equals_vaeencode(comfy, vae_server, transfer):
    p = Prompt()
    image = p.add("LoadImage", image=IMAGE)
    vae = p.add("VAELoader", vae_name=FILES["sd15"])
    remote = p.remote("RemoteVAEEncode", image, "sd15", f"{vae_server}/sd15", transfer)
    local = p.add("VAEEncode", pixels=[image, 0], vae=[vae, 0])
    save_remote = p.add("SaveLatent", samples=[remote, 0], filename_prefix=f"latents/remote_{transfer}")
    save_local = p.add("SaveLatent", samples=[local, 0], filename_prefix=f"latents/local_{transfer}")
    entry = run_ok(comfy, p)
    ours, theirs = saved_latent(comfy, entry, save_remote), saved_latent(comfy, entry, save_local)
    assert ours.shape == theirs.shape == (3, 4, 6, 8)
    difference = (ours - theirs).abs().max().item()
    print(f"encode {transfer}: max |remote - VAEEncode| = {difference:.3g} (latent std {theirs.std():.3g})")
    assert difference <= ENCODE_LIMIT


@pytest.mark.parametrize("preset", VIDEO_PRESETS)
@pytest.mark.parametrize("transfer", ["lossless", "exact"])
def test_remote_video_decode_equals_vaedecode(comfy, vae_server, preset, transfer):
    p = Prompt()
    latent = p.add("LoadLatent", latent=LATENTS[preset])
    vae = p.add("VAELoader", vae_name=FILES[preset])
    remote = p.remote("RemoteVideoDecode", latent, preset, f"{vae_server}/{preset}", transfer)
    local = p.add("VAEDecode", samples=[latent, 0], vae=[vae, 0])
    p.add("RemoteVAETestSaveTensor", images=[remote, 0], name=f"video_remote_{preset}_{transfer}")
    p.add("RemoteVAETestSaveTensor", images=[local, 0], name=f"video_local_{preset}_{transfer}")
    with EventListener(comfy) as events:
        run_ok(comfy, p)
    ours = probe(comfy, f"video_remote_{preset}_{transfer}")
    theirs = probe(comfy, f"video_local_{preset}_{transfer}")
    assert ours.shape == theirs.shape == (10, 24, 32, 3)  # 2 videos x 5 frames, in order
    difference = (ours - theirs).abs().max().item()
    print(
        f"video {preset} {transfer}: max |remote - VAEDecode| = {difference:.3g} ({difference * 255:.3f} / 255)"
    )
    assert difference <= VIDEO_LIMIT[transfer]
    [event] = [e for e in events.of_type("remote_vae.transfer") if e["node"] == remote]
    assert event["requests"] == 2  # one request per video


@pytest.mark.parametrize("preset", VIDEO_PRESETS)
def test_remote_video_encode_equals_vaeencode(comfy, vae_server, preset):
    p = Prompt()
    frames = p.add("LoadImage", image=VIDEO_FRAMES)
    vae = p.add("VAELoader", vae_name=FILES[preset])
    remote = p.remote("RemoteVAEEncode", frames, preset, f"{vae_server}/{preset}", "lossless")
    local = p.add("VAEEncode", pixels=[frames, 0], vae=[vae, 0])
    save_remote = p.add("SaveLatent", samples=[remote, 0], filename_prefix=f"latents/video_remote_{preset}")
    save_local = p.add("SaveLatent", samples=[local, 0], filename_prefix=f"latents/video_local_{preset}")
    entry = run_ok(comfy, p)
    ours, theirs = saved_latent(comfy, entry, save_remote), saved_latent(comfy, entry, save_local)
    assert ours.shape == theirs.shape == (1, 16, 2, 3, 4)  # 5 frames -> one video of 2 latent frames
    difference = (ours - theirs).abs().max().item()
    print(f"video encode {preset}: max |remote - VAEEncode| = {difference:.3g}")
    assert difference <= ENCODE_LIMIT


@pytest.mark.parametrize("transfer", ["lossless", "exact"])
def test_hunyuan_video_frames_are_the_servers_model_output(comfy, vae_server, base, transfer):
    """What the node returns inside ComfyUI is exactly what diffusers decodes from the same file, with the
    mid-block attention unmasked as the node's `reference=comfyui` asks."""
    from remote_vae.local_server.loading import load_vae
    from remote_vae.remote.presets import PRESETS

    p = Prompt()
    latent = p.add("LoadLatent", latent=LATENTS["hunyuan_video"])
    remote = p.remote("RemoteVideoDecode", latent, "hunyuan_video", f"{vae_server}/hunyuan_video", transfer)
    p.add("RemoteVAETestSaveTensor", images=[remote, 0], name=f"hunyuan_{transfer}")
    run_ok(comfy, p)
    model = load_vae(PRESETS["hunyuan_video"], str(base / "models" / "vae" / FILES["hunyuan_video"]))
    videos = load_file(str(base / "input" / LATENTS["hunyuan_video"]))["latent_tensor"]
    expected = torch.cat([comfy_decode(model, videos[i : i + 1]) for i in range(len(videos))])
    difference = (probe(comfy, f"hunyuan_{transfer}") - expected).abs().max().item()
    print(f"video hunyuan_video {transfer}: max |remote - diffusers on the same file| = {difference:.3g}")
    assert difference <= VIDEO_LIMIT[transfer]


# --------------------------------------------------------------------------- failures, fallback, cancel


def test_failing_endpoint_is_an_execution_error_with_our_message(comfy, vae_server):
    p = Prompt()
    latent = p.add("LoadLatent", latent=LATENTS["wan21"])
    remote = p.remote("RemoteVideoDecode", latent, "wan21", f"{vae_server}/not_hosted", "lossless")
    p.add("RemoteVAETestSaveTensor", images=[remote, 0], name="never_written")
    entry = comfy.run(p.nodes)
    assert status_of(entry) == "error"
    error = error_of(entry)
    assert error["node_id"] == remote and error["node_type"] == "RemoteVideoDecode"
    assert error["exception_type"].endswith("RemoteVAEError")
    assert error["exception_message"].startswith(f"{vae_server}/not_hosted answered 404: ")
    assert "hint: wrong URL or model name" in error["exception_message"]


def test_fallback_vae_gives_the_local_result_and_a_warning(comfy, vae_server):
    p = Prompt()
    image = p.add("LoadImage", image=IMAGE)
    vae = p.add("VAELoader", vae_name=FILES["sd15"])
    latent = p.add("VAEEncode", pixels=[image, 0], vae=[vae, 0])
    remote = p.remote("RemoteVAEDecode", latent, "sd15", f"{vae_server}/down", "lossless", vae=[vae, 0])
    local = p.add("VAEDecode", samples=[latent, 0], vae=[vae, 0])
    p.add("RemoteVAETestSaveTensor", images=[remote, 0], name="fallback_remote")
    p.add("RemoteVAETestSaveTensor", images=[local, 0], name="fallback_local")
    with EventListener(comfy) as events:
        run_ok(comfy, p)
    assert torch.equal(probe(comfy, "fallback_remote"), probe(comfy, "fallback_local"))
    [warning] = [e for e in events.of_type("remote_vae.warning") if e["node"] == remote]
    assert warning["message"].startswith(
        f"Remote VAE decode failed, used the connected VAE locally instead: {vae_server}/down answered 404"
    )
    assert warning["message"] in comfy.log_text()  # and in ComfyUI's log
    assert not [e for e in events.of_type("remote_vae.transfer") if e["node"] == remote]


def test_cancel_interrupts_a_waiting_request(comfy):
    with stub_servers.stalling() as stub:
        p = Prompt()
        latent = p.add("LoadLatent", latent=LATENTS["wan21"])
        remote = p.remote("RemoteVideoDecode", latent, "wan21", stub.url + "wan21", "lossless")
        p.add("RemoteVAETestSaveTensor", images=[remote, 0], name="cancelled")
        prompt_id = comfy.queue(p.nodes)
        while not stub.requests:  # press Cancel once the request waits on the stalled server
            time.sleep(0.1)
        comfy.interrupt()
        entry = comfy.wait(prompt_id, timeout=60)  # far below the node's 120 s read timeout
    assert status_of(entry) == "interrupted"
    assert not (comfy.output_dir / "cancelled.safetensors").exists()
