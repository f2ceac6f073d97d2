"""The comfy backend: VAE files in ComfyUI's own layouts, served through ComfyUI's own `comfy.sd.VAE`.

Each family's file is made by ComfyUI 0.3.75's own model classes with seeded weights (support/comfy_vaes.py).
The server (in-process, as `--comfyui` builds it; once as a real process) must answer exactly what
ComfyUI's VAE.decode / VAE.encode give on the same file: bit-identical with float32 transfer on the CPU,
within 1/255 with uint8 pixels.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import torch
from safetensors.torch import save_file

from remote_vae.local_server import comfy_models, comfyui_import
from remote_vae.local_server.app import create_app
from remote_vae.local_server.backends.comfy import geometry_of
from remote_vae.local_server.comfy_models import build_comfy_registry, installed_vae_files
from remote_vae.local_server.comfyui_import import ComfyUIError, import_comfyui
from remote_vae.local_server.errors import ModelLoadError
from remote_vae.local_server.registry import ModelRegistry
from remote_vae.remote.presets import PRESETS
from remote_vae.remote.protocol import Extensions
from remote_vae.testing import image_of
from support.comfy_vaes import (
    FAMILIES,
    imported_test_comfyui,
    save_vae_file,
)
from support.processes import running_server, server_env
from support.serving import error_of, post_decode, post_encode, serve, tensor_of

# Every family ComfyUI 0.3.75 detects that a 2-core CPU decodes in seconds (wan22 and hunyuan_video15 are
# 0.7G and 1.3G parameters at the only size ComfyUI builds them). Audio: test_audio.py.
SERVED = ("sd15", "sdxl", "flux", "flux2", "wan21", "qwen_image", "hunyuan_video", "ltxv", "taesd", "taehv")
EXACT = Extensions(output_dtype="float32")


@pytest.fixture(scope="module")
def comfy(tmp_path_factory) -> Iterator:
    root = tmp_path_factory.mktemp("comfyui")
    with imported_test_comfyui(root, extra_vae_dir=root / "elsewhere") as imported:
        yield imported


@pytest.fixture(scope="module")
def vae_file(comfy) -> Iterator:
    """name -> the family's file (made once, in the installation's models/vae; removed afterwards: ~1.4 GB)."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            path = comfy.directory / "models" / "vae" / f"{name}.safetensors"
            made[name] = save_vae_file(comfy, FAMILIES[name], path, seed=len(made) + 1)
        return made[name]

    yield get
    for path in made.values():
        path.unlink(missing_ok=True)


def reference(comfy, path: Path):
    """What ComfyUI's VAELoader makes of the file."""
    state_dict, metadata = comfy.utils.load_torch_file(str(path), return_metadata=True)
    return comfy.sd.VAE(sd=state_dict, metadata=metadata)


@contextlib.contextmanager
def serving(comfy, specs: list[str]) -> Iterator[tuple[str, ModelRegistry]]:
    registry = build_comfy_registry(comfy.directory, specs, device="cpu", dtype="auto")
    try:
        with serve(create_app(registry)) as url:
            yield url, registry
    finally:
        registry.close()


def seeded(shape: tuple[int, ...], seed: int = 7) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- every family, both ways


@pytest.mark.parametrize("name", SERVED)
def test_decode_and_encode_equal_comfyui(comfy, vae_file, name):
    family, path = FAMILIES[name], vae_file(name)
    converted = family.note.startswith("its output is 0..1")
    vae = reference(comfy, path)
    latent = seeded(family.latent)
    with torch.inference_mode():
        image = vae.decode(latent)  # [B,H,W,3], video [B,F,H,W,3]
    with serving(comfy, [f"{name}={path}"]) as (url, _registry):
        described = requests.get(f"{url}/v1/models", timeout=30).json()["models"][0]
        assert described["backend"] == "comfy" and described["geometry"] == geometry_of(vae).describe()

        raw = tensor_of(
            post_decode(f"{url}/{name}/decode", latent, output_type="pt", do_scaling=False, extensions=EXACT)
        )
        ours = image_of(raw)
        if converted:  # ComfyUI's tensors are 0..1 here: converted to and from our [-1,1], not bit-exact
            assert (ours - image.clamp(0, 1)).abs().max() <= 1e-6
        else:
            assert torch.equal(ours, image), (ours - image).abs().max()
        lossless = tensor_of(
            post_decode(
                f"{url}/{name}/decode", latent, output_type="pt", partial_postprocess=True, do_scaling=False
            )
        )
        frames = (
            image.reshape(-1, *image.shape[-3:]).clamp(0, 1).contiguous()
        )  # laid out as image loaders make it
        assert (lossless.float() / 255 - frames).abs().max() <= 1 / 255 + 1e-6

        if family.encodes:
            frames = frames[: 1 + (frames.shape[0] - 1) // 4 * 4] if latent.ndim == 5 else frames
            with torch.inference_mode():
                want = vae.encode(frames)
            pixels = frames.movedim(-1, 1) * 2.0 - 1.0  # as ComfyUI's process_input
            if latent.ndim == 5:
                pixels = pixels.movedim(1, 0).unsqueeze(0)  # the frames of one video
            got = tensor_of(post_encode(f"{url}/{name}/encode", pixels, extensions=EXACT))
            difference = (got - want).abs().max()
            assert difference <= 1e-5 if converted else torch.equal(got, want), difference


def test_a_decoder_only_vae_refuses_encode(comfy, vae_file):
    path = vae_file("lighttaew22")
    with serving(comfy, [f"tae={path}"]) as (url, _registry):
        message = error_of(post_encode(f"{url}/tae/encode", torch.zeros(1, 3, 1, 32, 32)), 400)
        assert message == "model tae is a decoder only: ComfyUI cannot encode with it"


# --------------------------------------------------------------------------- latents that do not fit


def test_latents_that_do_not_fit_are_400s(comfy, vae_file):
    sd15, wan = vae_file("sd15"), vae_file("wan21")
    with serving(comfy, [f"a={sd15}", f"w={wan}"]) as (url, _registry):
        message = error_of(post_decode(f"{url}/a/decode", torch.zeros(1, 16, 4, 4), output_type="pt"), 400)
        assert (
            message
            == "latent has 16 channels but model a expects 4; model a serves sd15.safetensors (ComfyUI VAE)"
        )
        message = error_of(post_decode(f"{url}/w/decode", torch.zeros(1, 16, 4, 4), output_type="pt"), 400)
        assert message == (
            "latent of shape [1, 16, 4, 4] has 4 dimensions but model w expects [B,16,T,H,W]; "
            "model w serves wan21.safetensors (ComfyUI VAE)"
        )


def test_a_file_comfyui_cannot_identify_is_refused(comfy, tmp_path):
    path = tmp_path / "notavae.safetensors"
    save_file({"model.layers.0.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(
        ModelLoadError, match=r"ComfyUI 0\.3\.75 at .* does not recognise .*notavae\.safetensors as a VAE"
    ):
        build_comfy_registry(comfy.directory, [f"x={path}"], device="cpu", dtype="auto")
    pickle = tmp_path / "vae.pt"
    pickle.write_bytes(b"not read")
    with pytest.raises(
        ModelLoadError, match=r"vae\.pt is not a \.safetensors file: only safetensors are served"
    ):
        build_comfy_registry(comfy.directory, [f"x={pickle}"], device="cpu", dtype="auto")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ModelLoadError, match=r"broken\.safetensors is not a readable safetensors file"):
        build_comfy_registry(comfy.directory, [f"x={broken}"], device="cpu", dtype="auto")
    mismatched = tmp_path / "mismatched.safetensors"  # an SD-family name with shapes no SD VAE has
    save_file({"decoder.conv_in.weight": torch.zeros(512, 4, 3, 3), "post_quant_conv.weight": torch.zeros(4, 4, 1, 1),
               "decoder.norm_out.weight": torch.zeros(3)}, str(mismatched))  # fmt: skip
    with pytest.raises(
        ModelLoadError, match=r"could not load .*mismatched\.safetensors as a VAE: Error\(s\) in loading"
    ):
        build_comfy_registry(comfy.directory, [f"x={mismatched}"], device="cpu", dtype="auto")


def test_bad_model_specs_and_folders_are_refused(comfy, monkeypatch, tmp_path):
    with pytest.raises(ValueError, match=r"--model sd15: with --comfyui name a VAE file: NAME=FILE"):
        build_comfy_registry(comfy.directory, ["sd15"], device="cpu", dtype="auto")
    with pytest.raises(
        ValueError,
        match=r"--model \.\.\.=nothere\.safetensors: no such file, and no such name in ComfyUI's vae",
    ):
        build_comfy_registry(comfy.directory, ["x=nothere.safetensors"], device="cpu", dtype="auto")
    monkeypatch.setattr(comfy_models, "installed_vae_files", lambda comfy: [])
    with pytest.raises(
        ModelLoadError, match=r"ComfyUI 0\.3\.75 at .* has no VAE file ComfyUI can load in .*models/vae"
    ):
        build_comfy_registry(comfy.directory, [], device="cpu", dtype="auto")
    with pytest.raises(ComfyUIError, match=r"--comfyui .*: this process already uses ComfyUI 0\.3\.75 at "):
        import_comfyui(tmp_path, cpu=True)
    monkeypatch.setattr(comfyui_import, "_imported", None)  # as if ComfyUI had been imported by someone else
    monkeypatch.setitem(sys.modules, "comfy", SimpleNamespace(__path__=[str(tmp_path / "other" / "comfy")]))
    with pytest.raises(ComfyUIError, match=r"this process already imported ComfyUI from .*other"):
        import_comfyui(comfy.directory, cpu=True)


# --------------------------------------------------------------------------- ComfyUI's tiled path


@pytest.mark.parametrize(("name", "latent"), [("taesd", (1, 4, 12, 20)), ("wan21", (1, 16, 1, 12, 20))])
def test_tiled_requests_run_comfyuis_own_tiling(comfy, vae_file, name, latent):
    path, z = vae_file(name), seeded(latent)
    vae = reference(comfy, path)
    tiles = Extensions(
        output_dtype="float32", tile="on", tile_size=16
    )  # 16 latent pixels: tiles overlap by 4
    with torch.inference_mode():
        want_image = vae.decode_tiled(z, tile_x=16, tile_y=16, overlap=4)
    with serving(comfy, [f"{name}={path}"]) as (url, _registry):
        raw = tensor_of(
            post_decode(f"{url}/{name}/decode", z, output_type="pt", do_scaling=False, extensions=tiles)
        )
        assert (image_of(raw) - want_image).abs().max() <= 1e-6  # ComfyUI's IMAGE, sent as [-1,1] and back
        image = want_image.reshape(-1, *want_image.shape[-3:]).contiguous()
        pixels = image.movedim(-1, 1) * 2.0 - 1.0
        pixels = pixels.movedim(1, 0).unsqueeze(0) if len(latent) == 5 else pixels
        got = tensor_of(post_encode(f"{url}/{name}/encode", pixels, extensions=tiles))
    overlap = 128 // 4 if len(latent) == 5 else 128 // 8  # ComfyUI's own proportions: tiles of 16 x 8 pixels
    with torch.inference_mode():
        want = vae.encode_tiled(image, tile_x=128, tile_y=128, overlap=overlap)
    assert (got - want).abs().max() <= 1e-5


# --------------------------------------------------------------------------- what is hosted, and how it is described


def test_every_vae_file_of_the_installation_is_hosted_under_its_name(comfy, vae_file, tmp_path):
    wan = vae_file("wan21")
    extra = comfy.directory.parent / "elsewhere"  # named by the installation's extra_model_paths.yaml
    (extra / "nested").mkdir(exist_ok=True)
    (extra / "nested" / "my vae.safetensors").write_bytes(wan.read_bytes())
    (comfy.directory / "models" / "vae" / "old.pt").write_bytes(b"never read")
    save_file(
        {"model.layers.0.weight": torch.zeros(2)},
        str(comfy.directory / "models" / "vae" / "notavae.safetensors"),
    )
    try:
        found = {f.name: f.path for f in installed_vae_files(comfy)}
        assert found["my_vae"] == extra / "nested" / "my vae.safetensors" and found["wan21"] == wan
        assert "old" not in found and "notavae" in found  # pickles are never read; unknown files are probed
        registry = build_comfy_registry(comfy.directory, [], device="cpu", dtype="auto")
        try:
            assert (
                "my_vae" in registry.names and "notavae" not in registry.names
            )  # ComfyUI cannot identify it
            described = registry.get("my_vae").describe()
            assert (described["backend"], described["state"], described["source"]) == (
                "comfy",
                "not loaded",
                str(found["my_vae"]),
            )
            assert described["geometry"] == {
                "dims": "video", "latent_channels": 16, "spatial_compression": 8, "temporal_compression": 4,
                "output_channels": 3, "sample_rate": None, "still_image": False,
            }  # fmt: skip
        finally:
            registry.close()
    finally:
        (comfy.directory / "models" / "vae" / "old.pt").unlink()
        (comfy.directory / "models" / "vae" / "notavae.safetensors").unlink()


def test_a_preset_name_gives_a_comfy_model_its_scaling(comfy, vae_file):
    flux = vae_file("flux")
    with serving(comfy, [f"myflux:flux={flux}"]) as (url, registry):
        assert registry.get("myflux").preset.scaling_factor == 0.3611
        z = seeded((1, 16, 8, 8))
        scaled = tensor_of(
            post_decode(f"{url}/myflux/decode", z, output_type="pt", do_scaling=True, extensions=EXACT)
        )
        raw = tensor_of(
            post_decode(
                f"{url}/myflux/decode",
                z / 0.3611 + 0.1159,
                output_type="pt",
                do_scaling=False,
                extensions=EXACT,
            )
        )
        torch.testing.assert_close(scaled, raw, atol=1e-5, rtol=0)
    with pytest.raises(
        ModelLoadError, match=r"holds a 16-channel image VAE with 8x compression but preset sd15 is 4-channel"
    ):
        build_comfy_registry(comfy.directory, [f"x:sd15={flux}"], device="cpu", dtype="auto")


def test_audio_vaes_have_their_geometry_and_run_as_comfyui_does(comfy, vae_file):
    """Stable Audio's VAE: latents [B,64,L] to stereo at 44.1 kHz (over the wire: test_audio.py)."""
    path = vae_file("stable_audio")
    vae = reference(comfy, path)
    geometry = geometry_of(vae)
    assert (
        geometry.dims,
        geometry.latent_channels,
        geometry.spatial_compression,
        geometry.output_channels,
    ) == ("audio", 64, 2048, 2)
    assert geometry.sample_rate == 44100
    registry = build_comfy_registry(comfy.directory, [f"audio={path}"], device="cpu", dtype="auto")
    try:
        backend = registry.loaded(registry.get("audio"))
        z = seeded((1, 64, 4))
        with torch.inference_mode():
            assert torch.equal(
                backend.decode(z), vae.decode(z).movedim(-1, 1)
            )  # ComfyUI gives [B,samples,channels]
            audio = vae.decode(z)
            with torch.random.fork_rng(devices=[]):  # its encode samples the posterior: same seed, same draw
                torch.manual_seed(3)
                ours = backend.encode(audio.movedim(-1, 1))
                torch.manual_seed(3)
                assert torch.equal(ours, vae.encode(audio))
    finally:
        registry.close()


def test_the_diffusers_backend_describes_its_models_the_same_way():
    registry = ModelRegistry()
    try:
        described = registry.add("wan21", PRESETS["wan21"], device="cpu").describe()
        assert described["backend"] == "diffusers"
        assert described["geometry"] == {
            "dims": "video", "latent_channels": 16, "spatial_compression": 8, "temporal_compression": 4,
            "output_channels": 3, "sample_rate": None, "still_image": False,
        }  # fmt: skip
        assert registry.add("qwen_image", PRESETS["qwen_image"], device="cpu").describe()["geometry"][
            "still_image"
        ]
    finally:
        registry.close()


# --------------------------------------------------------------------------- the real command


def test_the_command_serves_the_installation(comfy, vae_file):
    """REMOTE_VAE_COMFYUI_DIR (or --comfyui) and no --model: every VAE file, loaded on first use."""
    taesd, _wan = vae_file("taesd"), vae_file("wan21")
    z = seeded((1, 4, 8, 8))
    with torch.inference_mode():
        want = reference(comfy, taesd).decode(z)
    with running_server(["--device", "cpu"], env={"REMOTE_VAE_COMFYUI_DIR": str(comfy.directory)}) as (
        url,
        _process,
    ):
        models = {m["name"]: m for m in requests.get(f"{url}/v1/models", timeout=30).json()["models"]}
        assert {"taesd", "wan21"} <= set(models) and {m["backend"] for m in models.values()} == {"comfy"}
        assert models["taesd"]["state"] == "not loaded"
        raw = tensor_of(
            post_decode(f"{url}/taesd/decode", z, output_type="pt", do_scaling=False, extensions=EXACT)
        )
        assert torch.equal(image_of(raw), want)


def test_the_command_refuses_a_folder_that_is_not_comfyui(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "remote_vae.local_server", "--comfyui", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=server_env(),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert (
        f"--comfyui {tmp_path}: not a ComfyUI installation (comfy/sd.py, comfy/cli_args.py, folder_paths.py missing)"
        in result.stderr
    )
