"""Model sources: hub checkpoints, diffusers folders and ComfyUI-style single files, all loaded offline.

Every preset's VAE (remote_vae.testing) is saved both ways and loaded back with `load_vae`; its decode and
encode must equal the original's. A real ComfyUI 0.3.75 loads the same single files and must decode and
encode them like diffusers does.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
from pathlib import Path

import diffusers
import huggingface_hub.constants
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, convert_wan_vae_to_diffusers
from safetensors.torch import load_file, save_file

from remote_vae.local_server import single_file
from remote_vae.local_server.errors import ModelLoadError
from remote_vae.local_server.loading import Source, load_vae, resolve_source
from remote_vae.local_server.single_file import detect_layout, infer_config, read_state_dict
from remote_vae.remote.presets import PRESETS
from remote_vae.testing import (
    PRESET_NAMES,
    TINY_WIDTHS,
    comfy_decode,
    comfy_encode,
    random_vae,
    save_comfy_single_file,
    save_diffusers_folder,
    wan_to_original,
)

ARCHITECTURE = (
    "in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
    "down_block_types", "up_block_types", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention",
    "norm_num_groups", "base_dim", "decoder_base_dim", "z_dim", "dim_mult", "num_res_blocks",
    "temperal_downsample", "input_channels",
)  # fmt: skip


# --------------------------------------------------------------------------- helpers and fixtures


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Offline hub mode with an empty cache, and any non-loopback connection recorded and refused."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return _refuse_connections(monkeypatch)


def _refuse_connections(monkeypatch) -> list:
    attempts: list = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(sock, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            attempts.append(address)
            raise OSError(f"test: network access to {address} refused")
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in ("127.0.0.1", "::1", "localhost", None):
            attempts.append(host)
            raise socket.gaierror(f"test: name lookup of {host} refused")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return attempts


def _inputs(preset_name: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A latent and an image in [-1, 1] of the preset's layout (video: 2 latent frames, 5 pixel frames)."""
    preset = PRESETS[preset_name]
    generator = torch.Generator().manual_seed(seed)
    if preset.is_video:
        latent_shape, pixel_shape = (1, preset.latent_channels, 2, 4, 4), (1, 3, 5, 32, 32)
    else:
        latent_shape, pixel_shape = (2, preset.latent_channels, 4, 6), (2, 3, 32, 48)
    latent = torch.randn(latent_shape, generator=generator)
    return latent, torch.rand(pixel_shape, generator=generator) * 2 - 1


@torch.no_grad()
def _outputs(model, latent: torch.Tensor, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return model.decode(latent).sample, model.encode(pixels).latent_dist.mode()


def _architecture(config) -> dict:
    config = dict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if k in ARCHITECTURE}


def _saved(tmp_path: Path, preset_name: str, seed: int = 0, **make) -> tuple[torch.nn.Module, Path, Path]:
    model = random_vae(preset_name, seed, **make)
    folder = save_diffusers_folder(model, tmp_path / f"{preset_name}-diffusers")
    single = save_comfy_single_file(model, preset_name, tmp_path / f"{preset_name}.safetensors")
    return model, folder, single


def _expect_error(match_parts: list[str], *args, **kwargs) -> str:
    with pytest.raises(ModelLoadError) as caught:
        load_vae(*args, **kwargs)
    message = str(caught.value)
    for part in match_parts:
        assert part in message, f"{part!r} not in {message!r}"
    return message


# --------------------------------------------------------------------------- round trips, every preset


@pytest.mark.parametrize("preset_name", PRESET_NAMES)
def test_folder_and_single_file_load_the_same_vae(preset_name, tmp_path, no_network):
    preset = PRESETS[preset_name]
    model, folder, single = _saved(tmp_path, preset_name, seed=3)
    latent, pixels = _inputs(preset_name)
    decoded, encoded = _outputs(model, latent, pixels)
    assert decoded.std() > 0.1 and encoded.std() > 0.1  # random weights that still carry a signal

    for source in (folder, single):
        loaded = load_vae(preset, str(source))
        assert type(loaded) is type(model)
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        assert {p.dtype for p in loaded.parameters()} == {torch.float32}
        got_decoded, got_encoded = _outputs(loaded, latent, pixels)
        torch.testing.assert_close(got_decoded, decoded, rtol=0, atol=1e-6)
        torch.testing.assert_close(got_encoded, encoded, rtol=0, atol=1e-6)
    assert no_network == []


@pytest.mark.parametrize("preset_name", PRESET_NAMES)
def test_inferred_config_is_the_original_architecture(preset_name, tmp_path):
    model, _folder, single = _saved(tmp_path, preset_name, seed=4)
    state_dict = read_state_dict(single)
    inferred = infer_config(PRESETS[preset_name], state_dict)
    original = _architecture(model.config)
    assert {k: v for k, v in _architecture(inferred).items() if k in original} == original


def test_single_file_dtype_and_device_are_applied_after_loading(tmp_path):
    _model, _folder, single = _saved(tmp_path, "sd15")
    loaded = load_vae(PRESETS["sd15"], str(single), device=torch.device("cpu"), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    assert not loaded.training


def test_bf16_single_file_loads_in_float32(tmp_path):
    model = random_vae("flux", 5)
    path = save_comfy_single_file(model.to(torch.bfloat16), "flux", tmp_path / "ae.sft")
    loaded = load_vae(PRESETS["flux"], str(path))
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    want = model.float().state_dict()
    assert all(torch.equal(t, want[k]) for k, t in loaded.state_dict().items())


def test_local_sources_never_touch_the_network_even_online(monkeypatch, tmp_path):
    attempts = _refuse_connections(monkeypatch)  # no HF_HUB_OFFLINE: only local_files_only keeps it local
    _model, folder, single = _saved(tmp_path, "wan21")
    load_vae(PRESETS["wan21"], str(folder))
    load_vae(PRESETS["wan21"], str(single))
    assert attempts == []


def test_full_checkpoint_with_a_vae_prefix_loads_its_vae(tmp_path):
    model = random_vae("sd15", 6)
    inner = load_file(str(save_comfy_single_file(model, "sd15", tmp_path / "vae.safetensors")))
    full = {f"first_stage_model.{k}": v for k, v in inner.items()}
    full["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(2, 2)
    save_file(full, str(tmp_path / "checkpoint.safetensors"))
    loaded = load_vae(PRESETS["sd15"], str(tmp_path / "checkpoint.safetensors"))
    latent, pixels = _inputs("sd15")
    torch.testing.assert_close(
        _outputs(loaded, latent, pixels), _outputs(model, latent, pixels), rtol=0, atol=1e-6
    )


# --------------------------------------------------------------------------- where the config comes from


def _grouped_kl(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    """A KL VAE whose GroupNorm group count (8) the weights cannot show, saved as a single file."""
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(
        block_out_channels=(16, 16, 32, 32), norm_num_groups=8, layers_per_block=1, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    ).eval()  # fmt: skip
    return model, save_comfy_single_file(model, "sd15", tmp_path / "grouped.safetensors")


def test_widths_that_hide_the_group_count_ask_for_a_config(tmp_path):
    _model, path = _grouped_kl(tmp_path)
    _expect_error(
        ["[16, 16, 32, 32]", "norm_num_groups=32", "grouped.config.json"], PRESETS["sd15"], str(path)
    )


@pytest.mark.parametrize("sidecar", ["grouped.config.json", "grouped.json", "grouped.safetensors.json"])
def test_sidecar_config_next_to_the_file_is_used(tmp_path, sidecar):
    model, path = _grouped_kl(tmp_path)
    (tmp_path / sidecar).write_text(json.dumps(dict(model.config)))
    loaded = load_vae(PRESETS["sd15"], str(path))
    assert loaded.config.norm_num_groups == 8
    latent, pixels = _inputs("sd15")
    torch.testing.assert_close(
        _outputs(loaded, latent, pixels), _outputs(model, latent, pixels), rtol=0, atol=1e-6
    )


def test_explicit_config_beats_the_sidecar(tmp_path):
    model, path = _grouped_kl(tmp_path)
    (tmp_path / "grouped.config.json").write_text(json.dumps({**model.config, "norm_num_groups": 4}))
    folder = save_diffusers_folder(model, tmp_path / "as-folder")
    for config in (dict(model.config), str(folder), str(folder / "config.json")):
        assert load_vae(PRESETS["sd15"], str(path), config=config).config.norm_num_groups == 8


def test_unknown_variant_falls_back_to_the_presets_architecture():
    # A diffusers-layout Wan VAE with nested (Wan 2.2 residual) blocks: the reader leaves it to the preset.
    state_dict = {
        "decoder.mid_block.resnets.0.norm1.gamma": torch.ones(4, 1, 1, 1),
        "encoder.down_blocks.0.resnets.0.conv1.weight": torch.ones(4, 4, 3, 3, 3),
    }
    assert infer_config(PRESETS["wan22"], state_dict) == PRESETS["wan22"].config


# --------------------------------------------------------------------------- the hub


def _fake_hub_snapshot(cache: Path, repo_id: str) -> Path:
    """A Hugging Face cache entry as a past download leaves it: refs/main -> snapshots/<commit>/."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    return repo / "snapshots" / ("0" * 40)


def test_default_source_is_the_presets_checkpoint_and_subfolder(tmp_path, no_network):
    model = random_vae("flux", 7)
    snapshot = _fake_hub_snapshot(tmp_path / "hf-cache", "black-forest-labs/FLUX.1-schnell")
    save_diffusers_folder(model, snapshot / "vae")
    loaded = load_vae(PRESETS["flux"])
    latent, pixels = _inputs("flux")
    torch.testing.assert_close(
        _outputs(loaded, latent, pixels), _outputs(model, latent, pixels), rtol=0, atol=1e-6
    )
    assert no_network == []


def test_offline_hub_checkpoint_error_names_the_repo_and_the_local_alternative(no_network):
    message = _expect_error(
        ["'black-forest-labs/FLUX.1-schnell'", "subfolder 'vae'", "Hugging Face hub", "offline",
         "--model flux=/path/to/vae.safetensors", "diffusers-folder"],
        PRESETS["flux"],
    )  # fmt: skip
    assert message.startswith("could not load ")
    _expect_error(["'stabilityai/sd-vae-ft-mse' from the Hugging Face hub", "--model sd15="], PRESETS["sd15"])
    assert no_network == []


def test_resolve_source_kinds(tmp_path):
    sd15, flux = PRESETS["sd15"], PRESETS["flux"]
    assert resolve_source(sd15, None) == Source("hub", "stabilityai/sd-vae-ft-mse", None)
    assert resolve_source(flux, None) == Source("hub", "black-forest-labs/FLUX.1-schnell", "vae")
    assert resolve_source(flux, "black-forest-labs/FLUX.1-schnell") == Source(
        "hub", "black-forest-labs/FLUX.1-schnell", "vae"
    )
    assert resolve_source(flux, "black-forest-labs/FLUX.1-dev/vae") == Source(
        "hub", "black-forest-labs/FLUX.1-dev", "vae"
    )
    assert resolve_source(sd15, "madebyollin/sdxl-vae-fp16-fix") == Source(
        "hub", "madebyollin/sdxl-vae-fp16-fix"
    )
    (tmp_path / "pipeline" / "vae").mkdir(parents=True)
    (tmp_path / "pipeline" / "vae" / "config.json").write_text("{}")
    assert resolve_source(sd15, str(tmp_path / "pipeline")) == Source(
        "folder", str(tmp_path / "pipeline"), "vae"
    )
    assert resolve_source(sd15, str(tmp_path / "pipeline" / "vae")) == Source(
        "folder", str(tmp_path / "pipeline" / "vae")
    )
    (tmp_path / "vae.sft").write_bytes(b"")
    assert resolve_source(sd15, str(tmp_path / "vae.sft")) == Source("single_file", str(tmp_path / "vae.sft"))
    assert str(Source("hub", "a/b", "vae")) == "hub repo a/b (subfolder vae)"


# --------------------------------------------------------------------------- what goes wrong


def test_missing_paths(tmp_path):
    for missing in (
        tmp_path / "nope.safetensors",
        tmp_path / "nope",
        "./relative/vae.safetensors",
        "~/nope.sft",
    ):
        _expect_error(
            ["no such file or folder", "--model sd15=/path/to/vae.safetensors"], PRESETS["sd15"], str(missing)
        )


def test_folder_without_config(tmp_path):
    (tmp_path / "weights").mkdir()
    _expect_error(
        ["has no config.json (nor vae/config.json)", "--model sd15="],
        PRESETS["sd15"],
        str(tmp_path / "weights"),
    )


@pytest.mark.parametrize("name", ["vae.ckpt", "vae.pt", "diffusion_pytorch_model.bin", "vae.pth"])
def test_pickle_checkpoints_are_refused_without_being_read(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x80\x04 not even read")
    _expect_error(
        [name, "pickle checkpoint", "safetensors.torch.save_file", "diffusers folder"],
        PRESETS["sd15"],
        str(path),
    )


def test_folder_with_only_pickled_weights_is_refused(tmp_path):
    folder = save_diffusers_folder(random_vae("sd15"), tmp_path / "vae")
    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "diffusion_pytorch_model.bin")
    _expect_error(
        [f"could not load the diffusers folder {folder}", "pickled .bin weights are refused"],
        PRESETS["sd15"],
        str(folder),
    )


def test_files_that_are_not_safetensors(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    _expect_error(["notes.txt is not a .safetensors file"], PRESETS["sd15"], str(tmp_path / "notes.txt"))
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    _expect_error(
        ["broken.safetensors is not a readable safetensors file"],
        PRESETS["sd15"],
        str(tmp_path / "broken.safetensors"),
    )


def test_unknown_key_layout(tmp_path):
    save_file({"model.layer.weight": torch.zeros(2, 2)}, str(tmp_path / "lora.safetensors"))
    _expect_error(
        ["lora.safetensors has an unknown key layout", "1 tensors: model.layer.weight"],
        PRESETS["sd15"],
        str(tmp_path / "lora.safetensors"),
    )


def test_wrong_latent_channel_count(tmp_path):
    _model, folder, single = _saved(tmp_path, "flux")
    _expect_error(
        ["flux.safetensors has 16 latent channels but preset sd15 expects 4: pick the sd3 or flux preset"],
        PRESETS["sd15"],
        str(single),
    )
    _expect_error(
        [f"folder {folder} has 16 latent channels but preset sdxl expects 4"], PRESETS["sdxl"], str(folder)
    )
    _model, _folder, single = _saved(tmp_path, "sd15")
    _expect_error(
        ["has 4 latent channels but preset flux expects 16: pick the sd15 or sdxl preset"],
        PRESETS["flux"],
        str(single),
    )


def test_wrong_model_family(tmp_path):
    _model, folder, single = _saved(tmp_path, "wan21")
    _expect_error(
        ["wan21.safetensors holds a Wan 2.1 VAE in the original layout but preset sd15 uses AutoencoderKL"],
        PRESETS["sd15"],
        str(single),
    )
    _expect_error(
        [
            "holds a AutoencoderKLWan but preset hunyuan_video uses AutoencoderKLHunyuanVideo: pick the wan21 or wan22 preset"
        ],
        PRESETS["hunyuan_video"],
        str(folder),
    )


def test_incomplete_file(tmp_path):
    for preset_name in ("sd15", "hunyuan_video"):  # diffusers' converter and our own key mapping
        _model, _folder, single = _saved(tmp_path, preset_name)
        state_dict = load_file(str(single))
        del state_dict[
            "decoder.mid.block_1.conv1.weight"
            if preset_name == "sd15"
            else "decoder.mid.block_1.conv1.conv.weight"
        ]
        save_file(state_dict, str(tmp_path / "cut.safetensors"))
        _expect_error(
            ["lacks 1 of the", "not a complete VAE"], PRESETS[preset_name], str(tmp_path / "cut.safetensors")
        )


def test_weights_that_do_not_fit_the_given_config(tmp_path):
    for preset_name, wider, tensor in (
        (
            "sd15",
            {"block_out_channels": [64, 64, 128, 128]},
            "encoder.conv_in.weight is [32, 3, 3, 3] in the file but [64, 3, 3, 3]",
        ),
        (
            "hunyuan_video",
            {"block_out_channels": [64, 64, 128, 128]},
            "encoder.conv_in.conv.weight is [32, 3, 3, 3, 3]",
        ),
        (
            "wan21",
            {"base_dim": 32},
            "encoder.conv_in.weight is [16, 3, 3, 3, 3] in the file but [32, 3, 3, 3, 3]",
        ),
    ):
        model, _folder, single = _saved(tmp_path, preset_name)
        _expect_error(
            [f"{single.name} does not fit the architecture", tensor, f"{single.stem}.config.json"],
            PRESETS[preset_name], str(single), config={**model.config, **wider},
        )  # fmt: skip


def test_config_that_does_not_build(tmp_path):
    model, _folder, single = _saved(tmp_path, "sd15")
    config = {**model.config, "down_block_types": ["NoSuchBlock2D"] * 4}
    _expect_error(
        [f"{single.name}: the config", "does not build", "NoSuchBlock2D"],
        PRESETS["sd15"],
        str(single),
        config=config,
    )


def test_leftover_tensors_are_ignored_with_a_warning(tmp_path, caplog):
    model = random_vae("hunyuan_video", 8)
    state_dict = load_file(str(save_comfy_single_file(model, "hunyuan_video", tmp_path / "hv.safetensors")))
    state_dict["loss.logvar"] = torch.zeros(())
    save_file(state_dict, str(tmp_path / "hv-extra.safetensors"))
    with caplog.at_level("WARNING", logger="remote_vae.local_server.loading"):
        loaded = load_vae(PRESETS["hunyuan_video"], str(tmp_path / "hv-extra.safetensors"))
    assert (
        "hv-extra.safetensors: ignoring 1 tensors the model does not use, e.g. ['loss.logvar']" in caplog.text
    )
    latent, pixels = _inputs("hunyuan_video")
    torch.testing.assert_close(
        _outputs(loaded, latent, pixels), _outputs(model, latent, pixels), rtol=0, atol=1e-6
    )


def test_unconvertible_and_misplaced_configs(tmp_path):
    _model, folder, single = _saved(tmp_path, "sd15")
    _expect_error(
        ["config= only applies to single .safetensors files"], PRESETS["sd15"], str(folder), config={}
    )
    (tmp_path / "bad.json").write_text("{oops")
    _expect_error(
        ["could not read the config", "bad.json"],
        PRESETS["sd15"],
        str(single),
        config=str(tmp_path / "bad.json"),
    )
    (tmp_path / "list.json").write_text("[1, 2]")
    _expect_error(["is not a JSON object"], PRESETS["sd15"], str(single), config=str(tmp_path / "list.json"))
    (tmp_path / "empty").mkdir()
    _expect_error(
        ["config folder", "has no config.json"], PRESETS["sd15"], str(single), config=str(tmp_path / "empty")
    )
    _expect_error(
        ["holds a AutoencoderKLWan but preset sd15"],
        PRESETS["sd15"],
        str(single),
        config={"_class_name": "AutoencoderKLWan"},
    )


def test_wan22_single_files_point_at_the_diffusers_folder(tmp_path):
    marker = {
        "decoder.middle.0.residual.0.gamma": torch.ones(4, 1, 1, 1),
        "decoder.upsamples.0.upsamples.0.residual.2.weight": torch.ones(4, 4, 3, 3, 3),
    }
    save_file(marker, str(tmp_path / "wan2.2_vae.safetensors"))
    _expect_error(
        ["Wan 2.2", "cannot convert", "Wan-AI/Wan2.2-TI2V-5B-Diffusers"],
        PRESETS["wan22"],
        str(tmp_path / "wan2.2_vae.safetensors"),
    )


def test_folder_missing_a_tensor(tmp_path):
    folder = save_diffusers_folder(random_vae("sd15"), tmp_path / "vae")
    weights = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    del weights["decoder.conv_in.weight"]
    save_file(weights, str(folder / "diffusion_pytorch_model.safetensors"))
    _expect_error(
        [f"folder {folder} lacks 1 of the AutoencoderKL's", "decoder.conv_in.weight"],
        PRESETS["sd15"],
        str(folder),
    )


def test_preset_without_checkpoint_or_class(tmp_path):
    no_checkpoint = dataclasses.replace(PRESETS["sd15"], checkpoint="")
    _expect_error(["preset sd15 has no default checkpoint", "--model sd15="], no_checkpoint)
    _model, folder, _single = _saved(tmp_path, "sd15")
    no_class = dataclasses.replace(PRESETS["sd15"], diffusers_class="AutoencoderFromTheFuture")
    _expect_error(["needs diffusers.AutoencoderFromTheFuture", "upgrade diffusers"], no_class, str(folder))


def test_config_with_a_channel_count_no_preset_has(tmp_path):
    model, _folder, single = _saved(tmp_path, "sd15")
    _expect_error(
        ["has 8 latent channels but preset sd15 expects 4: no AutoencoderKL preset has that many"],
        PRESETS["sd15"], str(single), config={**model.config, "latent_channels": 8},
    )  # fmt: skip
    _expect_error(
        ["holds a AutoencoderTiny but preset sd15 uses AutoencoderKL: no preset uses that class"],
        PRESETS["sd15"],
        str(single),
        config={"_class_name": "AutoencoderTiny"},
    )


def test_infer_config_needs_a_known_layout():
    with pytest.raises(ModelLoadError, match="cannot infer an architecture: unknown key layout"):
        infer_config(PRESETS["sd15"], {"text_model.weight": torch.zeros(1)})


# --------------------------------------------------------------------------- the key tables themselves


@pytest.mark.parametrize("preset_name", ["sd15", "flux", "hunyuan_video"])
def test_ldm_key_table_round_trips_and_agrees_with_diffusers(preset_name):
    model = random_vae(preset_name, size="comfy" if preset_name == "sd15" else "tiny")
    state_dict = model.state_dict()
    ldm = single_file.diffusers_to_ldm(state_dict)
    assert "decoder.mid.attn_1.q.weight" in ldm and "encoder.down.0.block.0.norm1.weight" in ldm
    assert ldm["decoder.mid.attn_1.q.weight"].ndim == (
        5 if preset_name == "hunyuan_video" else 4
    )  # 1x1 convs
    back = single_file.ldm_to_diffusers(ldm)
    assert back.keys() == state_dict.keys() and all(torch.equal(back[k], state_dict[k]) for k in state_dict)
    if preset_name != "hunyuan_video":  # diffusers' own LDM converter reads our files the same way
        converted = convert_ldm_vae_checkpoint(ldm, dict(model.config))
        assert converted.keys() == state_dict.keys() and all(
            torch.equal(converted[k], state_dict[k]) for k in state_dict
        )


def test_wan_reverse_table_is_the_inverse_of_diffusers_converter():
    state_dict = random_vae("wan21").state_dict()
    original = wan_to_original(state_dict)
    assert {
        "decoder.head.0.gamma",
        "conv1.weight",
        "conv2.weight",
        "decoder.upsamples.4.shortcut.weight",
    } <= original.keys()
    assert detect_layout(original).name == "wan21"
    back = convert_wan_vae_to_diffusers(original)
    assert back.keys() == state_dict.keys() and all(torch.equal(back[k], state_dict[k]) for k in state_dict)


def test_factory_is_seeded_and_sized():
    a, b, c = (random_vae("sd15", seed) for seed in (1, 1, 2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.decoder.conv_in.weight, c.decoder.conv_in.weight)
    assert list(a.config.block_out_channels) == list(TINY_WIDTHS) and a.config.layers_per_block == 1
    full = random_vae("sdxl", size="comfy")
    assert list(full.config.block_out_channels) == [128, 256, 512, 512] and full.config.layers_per_block == 2
    assert not a.training


# --------------------------------------------------------------------------- ComfyUI loads the same files

COMFY_PRESETS = ("sd15", "sdxl", "flux", "sd3", "hunyuan_video", "wan21")
COMFY_LIMIT = 1e-4  # float32 on CPU; measured differences are ~1e-6 (see the report in the test output)

# Runs inside ComfyUI's tree with `--cpu`: loads each file with comfy.sd.VAE, decodes the "latent*" and
# encodes the "pixels*" tensors of its inputs file, and reports what it loaded.
COMFY_JOB = r"""
import gc, json, sys
args = json.loads(sys.argv[1])
sys.argv = [sys.argv[0], "--cpu"]
sys.path.insert(0, args["comfy_dir"])
import comfy.options
comfy.options.enable_args_parsing()
import comfy.sd, comfy.utils
from safetensors.torch import load_file, save_file
report = {}
for job in args["jobs"]:
    sd = comfy.utils.load_torch_file(job["vae"], safe_load=True)
    vae = comfy.sd.VAE(sd=sd)
    keys = set(vae.first_stage_model.state_dict())
    out = {}
    for name, tensor in load_file(job["inputs"]).items():
        out[name] = (vae.decode(tensor) if name.startswith("latent") else vae.encode(tensor)).contiguous()
    save_file(out, job["outputs"])
    report[job["name"]] = {
        "dtype": str(vae.vae_dtype), "latent_channels": vae.latent_channels,
        "missing": sorted(keys - set(sd)), "unexpected": sorted(set(sd) - keys),
    }
    del vae, sd
    gc.collect()
json.dump(report, open(args["report"], "w"))
"""


def _comfyui_dir() -> Path:
    from support import comfyui_harness

    return comfyui_harness.comfyui_dir()  # a missing ComfyUI is a failure here, not a skip


def _comfy_inputs(preset_name: str) -> dict[str, torch.Tensor]:
    """ComfyUI-side tensors: raw latents, and IMAGE batches [B,H,W,3] in [0,1] (video: frames)."""
    preset = PRESETS[preset_name]
    generator = torch.Generator().manual_seed(11)
    if not preset.is_video:
        return {
            "latent": torch.randn(2, preset.latent_channels, 6, 8, generator=generator),
            "pixels": torch.rand(2, 48, 64, 3, generator=generator),
        }
    return {
        "latent_1frame": torch.randn(1, 16, 1, 4, 4, generator=generator),
        "latent_3frames": torch.randn(1, 16, 3, 4, 4, generator=generator),
        "pixels_1frame": torch.rand(1, 32, 32, 3, generator=generator),
        "pixels_5frames": torch.rand(5, 32, 32, 3, generator=generator),
    }


def _diffusers_like_comfy(model, preset_name: str, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """What ComfyUI's VAE.decode / VAE.encode return, computed with the diffusers model as diffusers runs it."""
    if name.startswith("latent"):
        return comfy_decode(model, tensor, reference="diffusers", frames_as_batch=False)
    return comfy_encode(model, tensor, reference="diffusers", video=PRESETS[preset_name].is_video)


@pytest.fixture(scope="module")
def comfy_results(tmp_path_factory):
    comfy_dir = _comfyui_dir()
    root = tmp_path_factory.mktemp("comfy-vae")
    jobs = []
    for seed, preset_name in enumerate(COMFY_PRESETS, start=20):
        model = random_vae(preset_name, seed, size="comfy")
        vae = save_comfy_single_file(model, preset_name, root / f"{preset_name}.safetensors")
        del model
        save_file(_comfy_inputs(preset_name), str(root / f"{preset_name}-in.safetensors"))
        jobs.append({
            "name": preset_name, "vae": str(vae),
            "inputs": str(root / f"{preset_name}-in.safetensors"), "outputs": str(root / f"{preset_name}-out.safetensors"),
        })  # fmt: skip
    args = {"comfy_dir": str(comfy_dir), "jobs": jobs, "report": str(root / "report.json")}
    done = subprocess.run(
        [sys.executable, "-c", COMFY_JOB, json.dumps(args)],
        cwd=comfy_dir,
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert done.returncode == 0, f"ComfyUI run failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return root, json.loads((root / "report.json").read_text())


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("preset_name", COMFY_PRESETS)
def test_comfyui_decodes_and_encodes_our_single_files_like_diffusers(preset_name, comfy_results, monkeypatch):
    root, report = comfy_results
    preset = PRESETS[preset_name]
    loaded = report[preset_name]
    assert loaded == {
        "dtype": "torch.float32",
        "latent_channels": preset.latent_channels,
        "missing": [],
        "unexpected": [],
    }

    model = load_vae(preset, str(root / f"{preset_name}.safetensors"))
    inputs = load_file(str(root / f"{preset_name}-in.safetensors"))
    outputs = load_file(str(root / f"{preset_name}-out.safetensors"))
    differences = {}
    for name, tensor in inputs.items():
        ours = _diffusers_like_comfy(model, preset_name, name, tensor)
        assert ours.shape == outputs[name].shape, name
        differences[name] = (ours - outputs[name]).abs().max().item()
    print(f"\n{preset_name}: max |ComfyUI - diffusers| = {differences}")

    if preset_name != "hunyuan_video":
        assert max(differences.values()) < COMFY_LIMIT, differences
        return
    # HunyuanVideo: single frames agree. Over several latent frames ComfyUI's mid-block attention attends
    # to all frames, while diffusers (like the original HunyuanVideo code) masks it causally across frames.
    assert differences["latent_1frame"] < COMFY_LIMIT and differences["pixels_1frame"] < COMFY_LIMIT, (
        differences
    )
    assert differences["latent_3frames"] > 1e-2 and differences["pixels_5frames"] > 1e-2, differences
    import diffusers.models.autoencoders.autoencoder_kl_hunyuan_video as hunyuan

    causal = hunyuan.prepare_causal_attention_mask
    monkeypatch.setattr(
        hunyuan, "prepare_causal_attention_mask", lambda *a, **k: torch.zeros_like(causal(*a, **k))
    )
    for name in ("latent_3frames", "pixels_5frames"):
        unmasked = (
            (_diffusers_like_comfy(model, preset_name, name, inputs[name]) - outputs[name]).abs().max().item()
        )
        print(f"hunyuan_video {name} without the causal mask: {unmasked}")
        assert unmasked < COMFY_LIMIT, (name, unmasked)
