"""The models a `--comfyui` server hosts: VAE files, what ComfyUI makes of each, and their presets.

With no `--model`, every .safetensors file in that ComfyUI's `vae` folders (its `models/vae` and the
paths of its `extra_model_paths.yaml`) is hosted under its file name without extension. Each file is
identified at startup from its tensor names and shapes only (ComfyUI's own detection, run on
weightless "meta" tensors) and loaded on first use. A comfy-backend model has no row in the preset
table: its `Preset` is made from that geometry, with scaling factors only when `--model NAME:PRESET=FILE`
(or a NAME that is a preset) names a family; else the latents are raw (factor 1).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..remote.presets import PRESETS, Preset, get_preset
from ..remote.protocol import DTYPES
from .app import RESERVED_NAMES, check_model_name
from .backends.base import Geometry
from .backends.comfy import (
    SAFE_SUFFIXES,
    ComfyLoader,
    UnknownArchitecture,
    build_vae,
    check_file,
    geometry_of,
    read_state_dict,
)
from .comfyui_import import ComfyUI, import_comfyui
from .devices import resolve_device
from .errors import ModelLoadError
from .registry import ModelRegistry, Tuning

log = logging.getLogger("remote_vae.server")

# safetensors' dtype names -> torch (what ComfyUI's detection may look at, e.g. a float16 tiny decoder)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


@dataclass(frozen=True)
class VaeFile:
    """One model to host: its name, file and the preset family it was named with (if any)."""

    name: str
    path: Path
    like: Preset | None = None


def build_comfy_registry(
    comfyui: str | Path, specs: Sequence[str], device: str, dtype: str, options: Tuning | None = None
) -> ModelRegistry:
    """A registry of comfy-backend models: `specs` (`NAME[:PRESET]=FILE`), else every VAE file of the
    installation. Files named in `specs` that ComfyUI cannot identify are an error; found ones are skipped."""
    dev = resolve_device(device)
    comfy = import_comfyui(comfyui, cpu=dev.type == "cpu")
    files = [parse_comfy_spec(spec, comfy) for spec in specs] or installed_vae_files(comfy)
    identified = []
    for vae_file in files:
        try:
            identified.append((vae_file, read_geometry(comfy, vae_file.path)))
        except ModelLoadError as exc:
            if specs:
                raise
            log.warning("not hosting %s: %s", vae_file.path, exc)
    if not identified:
        folders = ", ".join(comfy.folder_paths.get_folder_paths("vae"))
        raise ModelLoadError(
            f"{comfy.describe()} has no VAE file ComfyUI can load in {folders}; "
            "add one or name one with --model NAME=FILE"
        )
    loader = ComfyLoader(comfy, None if dtype == "auto" else DTYPES[dtype])  # auto: ComfyUI's choice per VAE
    registry = ModelRegistry(loader=loader, options=options)
    for vae_file, geometry in identified:
        preset = preset_for(vae_file, geometry)
        registry.add(
            vae_file.name, preset, source=str(vae_file.path), device=dev, dtype=dtype, geometry=geometry
        )
    return registry


def parse_comfy_spec(spec: str, comfy: ComfyUI) -> VaeFile:
    """`NAME[:PRESET]=FILE`: FILE is a path or a file name in ComfyUI's vae folders; PRESET (or a NAME
    that is a preset) supplies scaling factors."""
    names, _, source = spec.partition("=")
    alias, colon, preset_name = names.partition(":")
    check_model_name(alias)
    if not source.strip():
        raise ValueError(
            f"--model {spec}: with --comfyui name a VAE file: NAME=FILE (a path, or a file in ComfyUI's models/vae)"
        )
    like = get_preset(preset_name) if colon else PRESETS.get(alias)
    return VaeFile(alias, _find(source.strip(), comfy), like)


def _find(source: str, comfy: ComfyUI) -> Path:
    path = Path(source).expanduser()
    if path.is_file():
        return path
    found = comfy.folder_paths.get_full_path("vae", source)
    if found is None:
        folders = ", ".join(comfy.folder_paths.get_folder_paths("vae"))
        raise ValueError(
            f"--model ...={source}: no such file, and no such name in ComfyUI's vae folders ({folders})"
        )
    return Path(found)


def installed_vae_files(comfy: ComfyUI) -> list[VaeFile]:
    """Every safetensors file in the installation's vae folders, named after the file."""
    _load_extra_model_paths(comfy)
    files: dict[str, VaeFile] = {}
    for relative in comfy.folder_paths.get_filename_list("vae"):
        full = comfy.folder_paths.get_full_path("vae", relative)
        if full is None:
            continue
        path = Path(full)
        name = re.sub(r"[^A-Za-z0-9._-]", "_", path.stem)
        if path.suffix.lower() not in SAFE_SUFFIXES:
            log.warning(
                "not hosting %s: only .safetensors files are served (pickle files can run code when loaded)",
                path,
            )
        elif name in RESERVED_NAMES:
            log.warning("not hosting %s: %r is one of the server's own paths; rename the file", path, name)
        elif name in files:
            log.warning("not hosting %s: the name %r is taken by %s", path, name, files[name].path)
        else:
            files[name] = VaeFile(name, path)
    return list(files.values())


def _load_extra_model_paths(comfy: ComfyUI) -> None:
    """What ComfyUI's main.py does with its extra_model_paths.yaml, with ComfyUI's own reader."""
    config = comfy.directory / "extra_model_paths.yaml"
    reader = comfy.directory / "utils" / "extra_config.py"
    if not config.is_file() or not reader.is_file():
        return
    # Loaded by path under a private name: ComfyUI's top-level `utils` package has a common name.
    spec = importlib.util.spec_from_file_location("_remote_vae_comfyui_extra_config", reader)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.load_extra_path_config(str(config))  # adding a path twice is a no-op in folder_paths


def read_geometry(comfy: ComfyUI, path: Path) -> Geometry:
    """What ComfyUI makes of the file, from its header alone (shapes on the meta device, no weights);
    by loading it where an architecture cannot be built on the meta device."""
    check_file(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata()
            keys = f.keys()
            state_dict = {key: _meta_tensor(f.get_slice(key)) for key in keys}
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a readable safetensors file: {exc}", has_hint=True) from exc
    try:
        with torch.device("meta"), _quiet():
            vae = build_vae(
                comfy, state_dict, metadata, str(path), device=torch.device("cpu"), dtype=torch.float32
            )
    except UnknownArchitecture:
        raise
    except ModelLoadError as exc:  # an architecture that needs real tensors to be built (e.g. Cosmos')
        log.info("%s: identifying it by loading it (%s)", path, exc)
        state_dict, metadata = read_state_dict(comfy, path)
        vae = build_vae(comfy, state_dict, metadata, str(path), device=torch.device("cpu"))
    return geometry_of(vae)


def _meta_tensor(view) -> torch.Tensor:
    return torch.empty(view.get_shape(), dtype=_DTYPES.get(view.get_dtype(), torch.float32), device="meta")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ComfyUI logs every missing key and its load device while building: not for a header probe."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def preset_for(vae_file: VaeFile, geometry: Geometry) -> Preset:
    """A preset for a comfy-backend model: its geometry, and the named family's factors where one was named."""
    like = vae_file.like
    if like is not None:
        _check_like(vae_file, geometry, like)
    factors = (
        {"scaling_factor": like.scaling_factor, "shift_factor": like.shift_factor, "latents_mean": like.latents_mean,
         "latents_std": like.latents_std, "fps": like.fps, "packed": like.packed}
        if like else {}
    )  # fmt: skip
    return Preset(
        name=vae_file.name,
        label=f"{vae_file.path.name} (ComfyUI VAE" + (f", {like.label} factors)" if like else ")"),
        latent_channels=geometry.latent_channels,
        dims=1 if geometry.audio else 3 if geometry.video else 2,
        spatial_compression=geometry.spatial_compression,
        temporal_compression=geometry.temporal_compression,
        checkpoint=str(vae_file.path),
        diffusers_class="",
        still_image=geometry.still_image,
        **factors,
    )


def _check_like(vae_file: VaeFile, geometry: Geometry, like: Preset) -> None:
    found = (geometry.latent_channels, geometry.video, geometry.spatial_compression)
    if found != (like.latent_channels, like.is_video, like.spatial_compression):
        raise ModelLoadError(
            f"{vae_file.path} holds a {geometry.latent_channels}-channel {geometry.dims} VAE with {geometry.spatial_compression}x "
            f"compression but preset {like.name} is {like.latent_channels}-channel {'video' if like.is_video else 'image'} "
            f"with {like.spatial_compression}x; drop ':{like.name}' or use a model name that is not a preset",
            has_hint=True,
        )
