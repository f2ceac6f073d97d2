"""The preset table against ComfyUI's latent formats (comfyui-and-peers.md section 4c) and the HF
endpoints (hf-protocol.md section 5), transcribed here independently of remote/presets.py."""

from __future__ import annotations

import ast
import inspect

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.utils import constants

from remote_vae.remote.presets import PRESETS, PresetError, check_latent, detect_preset, get_preset

# name: (latent channels, dims, spatial, temporal, ComfyUI scale_factor, shift_factor, mean/std format)
COMFY = {
    "sd15": (4, 2, 8, 1, 0.18215, None, None),
    "sdxl": (4, 2, 8, 1, 0.13025, None, None),
    "sd3": (16, 2, 8, 1, 1.5305, 0.0609, None),
    "flux": (16, 2, 8, 1, 0.3611, 0.1159, None),
    "hunyuan_video": (16, 3, 8, 4, 0.476986, None, None),
    "wan21": (16, 3, 8, 4, 1.0, None, "Wan21"),
    "wan22": (48, 3, 16, 4, 1.0, None, "Wan22"),
    "qwen_image": (16, 3, 8, 4, 1.0, None, "Wan21"),
}
# ComfyUI format class per preset (for the optional check against a ComfyUI source tree).
COMFY_CLASS = {"sd15": "SD15", "sdxl": "SDXL", "sd3": "SD3", "flux": "Flux", "hunyuan_video": "HunyuanVideo",
               "wan21": "Wan21", "wan22": "Wan22", "qwen_image": "Wan21"}  # fmt: skip

HF = "https://{}.us-east-1.aws.endpoints.huggingface.cloud/"
HF_ENDPOINTS = {  # (decode, encode), hf-protocol.md section 5.1; Wan's endpoint never shipped
    "sd15": (HF.format("q1bj3bpq6kzilnsu"), HF.format("qc6479g0aac6qwy9")),
    "sdxl": (HF.format("x2dmsqunjd6k9prw"), HF.format("xjqqhmyn62rog84g")),
    "flux": (HF.format("whhx50ex1aryqvw6"), HF.format("ptccx55jz97f9zgo")),
    "hunyuan_video": (HF.format("o7ywnmrahorts457"), None),
}

WAN22_MEAN_HEAD_TAIL = (-0.2289, -0.0052, -0.0667)
WAN22_STD_HEAD_TAIL = (0.4765, 1.0364, 0.7744)


def test_table_has_exactly_the_tested_rows():
    assert set(PRESETS) == set(COMFY)
    assert all(name == preset.name for name, preset in PRESETS.items())


@pytest.mark.parametrize("name", sorted(COMFY))
def test_row_matches_comfyui(name):
    channels, dims, spatial, temporal, scale, shift, stats = COMFY[name]
    preset = get_preset(name)
    assert (preset.latent_channels, preset.dims, preset.spatial_compression, preset.temporal_compression) == (
        channels, dims, spatial, temporal,
    )  # fmt: skip
    assert preset.scaling_factor == scale
    assert preset.shift_factor == shift
    assert preset.uses_mean_std == (stats is not None)
    if stats:
        assert len(preset.latents_mean) == len(preset.latents_std) == channels


def test_wan21_stats_match_diffusers_defaults():
    params = inspect.signature(AutoencoderKLWan.__init__).parameters
    for name in ("wan21", "qwen_image"):
        assert list(PRESETS[name].latents_mean) == params["latents_mean"].default
        assert list(PRESETS[name].latents_std) == params["latents_std"].default


def test_wan22_stats_spot_values():
    preset = PRESETS["wan22"]
    assert (preset.latents_mean[0], preset.latents_mean[1], preset.latents_mean[-1]) == WAN22_MEAN_HEAD_TAIL
    assert (preset.latents_std[0], preset.latents_std[1], preset.latents_std[-1]) == WAN22_STD_HEAD_TAIL
    assert preset.config["latents_mean"] == list(preset.latents_mean)


def _comfy_formats(source: str) -> dict[str, dict[str, object]]:
    """Literal class attributes and __init__ assignments of ComfyUI's latent formats, read with ast."""
    formats: dict[str, dict[str, object]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        values: dict[str, object] = {}
        for base in node.bases:
            if isinstance(base, ast.Name) and base.id in formats:
                values.update(formats[base.id])
        defaults: dict[
            str, ast.expr
        ] = {}  # __init__(self, scale_factor=0.18215): self.scale_factor = scale_factor
        for stmt in ast.walk(node):
            if isinstance(stmt, ast.FunctionDef) and stmt.name == "__init__":
                args = stmt.args.args[len(stmt.args.args) - len(stmt.args.defaults) :]
                defaults.update({arg.arg: default for arg, default in zip(args, stmt.args.defaults)})
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
                target = stmt.targets[0]
                key = target.id if isinstance(target, ast.Name) else getattr(target, "attr", None)
                value = stmt.value
                if isinstance(value, ast.Name) and value.id in defaults:
                    value = defaults[value.id]
                if (
                    isinstance(value, ast.Call)
                    and isinstance(value.func, ast.Attribute)
                    and value.func.attr == "view"
                ):
                    value = value.func.value  # torch.tensor([...]).view(...)
                if isinstance(value, ast.Call) and value.args:
                    value = value.args[0]  # torch.tensor([...])
                try:
                    values[key] = ast.literal_eval(value)
                except ValueError:
                    continue
        formats[node.name] = values
    return formats


@pytest.fixture(scope="module")
def comfy_formats() -> dict:
    """ComfyUI 0.3.75's latent formats, read from its source (the integration tests' copy)."""
    from support.comfyui_harness import comfyui_dir

    return _comfy_formats((comfyui_dir() / "comfy" / "latent_formats.py").read_text())


@pytest.mark.parametrize("name", sorted(COMFY))
def test_row_matches_comfyui_source(name, comfy_formats):
    fmt = comfy_formats[COMFY_CLASS[name]]
    preset = PRESETS[name]
    assert fmt.get("latent_channels", 4) == preset.latent_channels
    assert fmt.get("latent_dimensions", 2) == preset.dims
    assert fmt.get("scale_factor", 1.0) == preset.scaling_factor
    assert fmt.get("shift_factor") == preset.shift_factor
    if preset.uses_mean_std:
        assert tuple(fmt["latents_mean"]) == preset.latents_mean
        assert tuple(fmt["latents_std"]) == preset.latents_std


@pytest.mark.parametrize("name", sorted(COMFY))
def test_hf_endpoints(name):
    preset = PRESETS[name]
    assert (preset.hf_decode_endpoint, preset.hf_encode_endpoint) == HF_ENDPOINTS.get(name, (None, None))


def test_hf_endpoints_match_diffusers_constants():
    assert PRESETS["sd15"].hf_decode_endpoint == constants.DECODE_ENDPOINT_SD_V1
    assert PRESETS["sdxl"].hf_decode_endpoint == constants.DECODE_ENDPOINT_SD_XL
    assert PRESETS["flux"].hf_decode_endpoint == constants.DECODE_ENDPOINT_FLUX
    assert PRESETS["hunyuan_video"].hf_decode_endpoint == constants.DECODE_ENDPOINT_HUNYUAN_VIDEO
    assert PRESETS["sd15"].hf_encode_endpoint == constants.ENCODE_ENDPOINT_SD_V1
    assert PRESETS["sdxl"].hf_encode_endpoint == constants.ENCODE_ENDPOINT_SD_XL
    assert PRESETS["flux"].hf_encode_endpoint == constants.ENCODE_ENDPOINT_FLUX


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("sd15", {"scaling_factor": 0.18215}),
        ("flux", {"scaling_factor": 0.3611, "shift_factor": 0.1159}),
        ("hunyuan_video", {"scaling_factor": 0.476986}),
        ("wan21", {}),
    ],
)
def test_hf_scaling(name, expected):
    assert PRESETS[name].hf_scaling() == expected


def _latent(preset, seed=0):
    shape = [2, preset.latent_channels, 3, 4, 5] if preset.is_video else [2, preset.latent_channels, 4, 5]
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _comfy_process_in(name, raw):
    """ComfyUI's process_in written out per format class (raw VAE space -> model space)."""
    channels, dims, _, _, scale, shift, stats = COMFY[name]
    if stats:
        view = [1, channels] + [1] * (raw.ndim - 2)
        mean = torch.tensor(PRESETS[name].latents_mean, dtype=raw.dtype).view(view)
        std = torch.tensor(PRESETS[name].latents_std, dtype=raw.dtype).view(view)
        return (raw - mean) * scale / std
    if shift is not None:
        return (raw - shift) * scale
    return raw * scale


@pytest.mark.parametrize("name", sorted(COMFY))
def test_from_raw_is_process_in_and_to_raw_is_its_inverse(name):
    preset = PRESETS[name]
    raw = _latent(preset)
    model_space = preset.from_raw(raw)
    assert torch.allclose(model_space, _comfy_process_in(name, raw), rtol=0, atol=1e-12)
    assert torch.allclose(preset.to_raw(model_space), raw, rtol=0, atol=1e-12)
    assert torch.allclose(preset.from_raw(preset.to_raw(raw)), raw, rtol=0, atol=1e-12)


def test_to_raw_is_hf_server_scaling():
    # hf-protocol.md 4.1: the server computes latents / scaling_factor + shift_factor.
    flux = PRESETS["flux"]
    z = _latent(flux)
    assert torch.allclose(flux.to_raw(z), z / 0.3611 + 0.1159, rtol=0, atol=1e-12)


def test_still_image_marks_an_image_model_with_a_video_vae():
    qwen, wan = PRESETS["qwen_image"], PRESETS["wan21"]
    assert qwen.is_video and qwen.still_image and not qwen.is_video_model  # IMAGE batch: separate images
    assert wan.is_video and not wan.still_image and wan.is_video_model  # IMAGE batch: one video's frames
    assert [p.name for p in PRESETS.values() if p.still_image] == ["qwen_image"]
    assert not any(p.still_image for p in PRESETS.values() if not p.is_video)


def test_frames_for():
    assert PRESETS["hunyuan_video"].frames_for(3) == 9
    assert PRESETS["wan21"].frames_for(21) == 81
    assert PRESETS["wan21"].latent_frames_for(81) == 21
    assert PRESETS["sd15"].frames_for(1) == 1


@pytest.mark.parametrize(
    ("shape", "name"),
    [
        ([1, 4, 64, 64], None),  # ambiguous: sd15 / sdxl
        ([2, 16, 64, 64], None),  # ambiguous: sd3 / flux
        ([1, 4096, 64], "flux"),  # packed
        ([1, 16, 21, 60, 104], None),  # ambiguous: hunyuan_video / wan21
        ([1, 48, 21, 44, 80], "wan22"),
    ],
)
def test_detect_preset(shape, name):
    if name:
        assert detect_preset(shape).name == name
    else:
        with pytest.raises(PresetError, match="fits several presets"):
            detect_preset(shape)


def test_detect_preset_ambiguous_message_lists_choices():
    with pytest.raises(PresetError) as info:
        detect_preset([1, 4, 64, 64])
    assert str(info.value) == (
        "a latent of shape [1, 4, 64, 64] fits several presets (sd15, sdxl); pick one explicitly: "
        "sd15 = Stable Diffusion 1.x / 2.x; sdxl = Stable Diffusion XL"
    )
    with pytest.raises(PresetError, match=r"\(hunyuan_video, wan21\)"):
        detect_preset([1, 16, 21, 60, 104])  # several frames: Qwen-Image drops out, two video models remain


def test_detect_preset_single_frame_keeps_qwen_in_the_choices():
    with pytest.raises(PresetError, match=r"\(hunyuan_video, wan21, qwen_image\)"):
        detect_preset([1, 16, 1, 60, 104])


def test_detect_preset_no_fit_lists_layouts():
    with pytest.raises(
        PresetError, match=r"no preset fits a latent of shape \[1, 7, 8, 8\]; sd15: \[B,4,H,W\]"
    ):
        detect_preset([1, 7, 8, 8])
    with pytest.raises(PresetError, match="wan22: \\[B,48,T,H,W\\]"):
        detect_preset([1, 32, 8])


def test_get_preset_unknown():
    with pytest.raises(PresetError, match="unknown preset 'sd2'; known presets: sd15, sdxl, sd3, flux"):
        get_preset("sd2")


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [
        ("sd15", [1, 16, 64, 64], "latent has 16 channels but preset sd15 expects 4; pick the sd3 or flux preset"),
        ("flux", [1, 4, 64, 64], "latent has 4 channels but preset flux expects 16; pick the sd15 or sdxl preset"),
        ("sd15", [1, 7, 8, 8], "latent has 7 channels but preset sd15 expects 4; no preset fits this latent"),
        ("sdxl", [1, 16, 3, 8, 8], r"latent of shape \[1, 16, 3, 8, 8\] has 5 dimensions but preset sdxl expects "
         r"\[B,4,H,W\]; pick the hunyuan_video or wan21 or qwen_image preset"),
        ("wan21", [1, 16, 8, 8], r"has 4 dimensions but preset wan21 expects \[B,16,T,H,W\]; pick the sd3 or flux"),
        ("flux", [1, 4096, 16], "packed latent has 16 features but preset flux packs 16x4=64"),
        ("sd15", [1, 4096, 64], r"has 3 dimensions but preset sd15 expects \[B,4,H,W\]; pick the flux preset"),
    ],
)  # fmt: skip
def test_check_latent_messages(name, shape, message):
    with pytest.raises(PresetError, match=message):
        check_latent(PRESETS[name], shape)


@pytest.mark.parametrize(
    ("name", "shape"),
    [("sd15", [1, 4, 8, 8]), ("flux", [1, 16, 8, 8]), ("flux", [2, 256, 64]), ("wan22", [1, 48, 2, 4, 4])],
)
def test_check_latent_accepts(name, shape):
    check_latent(PRESETS[name], shape)
