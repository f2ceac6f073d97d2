"""Where a server's VAE weights come from: the Hugging Face hub, a diffusers folder, or one .safetensors file.

`load_vae(preset, source)` is the one entry point. A single file may be in the layout ComfyUI's
`models/vae` files use (original LDM / HunyuanVideo / Wan names) or in diffusers' layout; its architecture
comes from an explicit config, a sidecar json next to it, the tensor shapes, or the preset, in that order.
Nothing here unpickles: `.ckpt`/`.pt`/`.bin` files are refused, hub and folder loads are safetensors-only.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from ..remote.presets import PRESETS, Preset
from .errors import ModelLoadError, first_line
from .single_file import DIFFUSERS_CONVERTS, Layout, infer_config, layout_for, read_state_dict, to_diffusers

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
log = logging.getLogger(__name__)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+)*$")


@dataclass(frozen=True)
class Source:
    kind: str  # "hub" | "folder" | "single_file"
    location: str  # a hub repo id or an absolute local path
    subfolder: str | None = None

    def __str__(self) -> str:
        where = f"{self.location} (subfolder {self.subfolder})" if self.subfolder else self.location
        return {"hub": "hub repo ", "folder": "folder ", "single_file": "file "}[self.kind] + where


# --------------------------------------------------------------------------- where the weights are


def resolve_source(preset: Preset, source: str | None) -> Source:
    """What `source` names: None -> the preset's hub checkpoint; else a local folder/file or a hub repo id."""
    if source is None or not str(source).strip():
        if not preset.checkpoint:
            raise ModelLoadError(
                f"preset {preset.name} has no default checkpoint: {_how_to_point(preset)}", has_hint=True
            )
        return Source("hub", preset.checkpoint, preset.subfolder)
    text = str(source).strip()
    path = Path(text).expanduser()
    if path.is_dir():
        return _folder_source(preset, path.resolve())
    if path.is_file():
        return _file_source(path.resolve())
    if not _looks_like_path(text) and _HUB_ID.match(text):
        parts = text.split("/")  # owner/name[/subfolder]
        repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:]) or None
        if repo_id == preset.checkpoint and subfolder is None:
            subfolder = preset.subfolder
        return Source("hub", repo_id, subfolder)
    raise ModelLoadError(f"no such file or folder: {path}; {_how_to_point(preset)}", has_hint=True)


def _looks_like_path(text: str) -> bool:
    suffix = Path(text).suffix.lower()
    weights = suffix in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES + (".json",)
    return Path(text).is_absolute() or text.startswith((".", "~")) or "\\" in text or weights


def _folder_source(preset: Preset, path: Path) -> Source:
    if (path / "config.json").is_file():
        return Source("folder", str(path))
    if (path / "vae" / "config.json").is_file():
        return Source("folder", str(path), "vae")
    raise ModelLoadError(
        f"folder {path} has no config.json (nor vae/config.json), so it is not a diffusers model folder; "
        f"{_how_to_point(preset)}",
        has_hint=True,
    )


def _file_source(path: Path) -> Source:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"{path.name} is a pickle checkpoint ({suffix}); unpickling can run arbitrary code, so the server "
            f"only reads safetensors. Convert it once on a trusted machine: load it with torch's weights_only "
            f"loader and write the state dict (its 'state_dict' entry if there is one) with "
            f"safetensors.torch.save_file to {path.stem}.safetensors, or use a diffusers folder"
        )
    if suffix not in SAFETENSORS_SUFFIXES:
        raise ModelLoadError(
            f"{path.name} is not a .safetensors file; point at a VAE .safetensors file (as in ComfyUI's "
            f"models/vae) or a diffusers folder with config.json"
        )
    return Source("single_file", str(path))


def _how_to_point(preset: Preset) -> str:
    return (
        f"point at local weights instead: --model {preset.name}=/path/to/vae.safetensors (a file from ComfyUI's "
        f"models/vae) or --model {preset.name}=/path/to/diffusers-folder (with config.json)"
    )


# --------------------------------------------------------------------------- loading


def load_vae(
    preset: Preset,
    source: str | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    config: str | dict | None = None,
) -> torch.nn.Module:
    """The VAE for `preset` from `source` (see `resolve_source`), in eval mode, without gradients."""
    where = resolve_source(preset, source)
    if config is not None and where.kind != "single_file":
        raise ModelLoadError(f"config= only applies to single .safetensors files, not to the {where}")
    cls = _vae_class(preset)
    if where.kind == "hub":
        model = _from_hub(preset, cls, where)
    elif where.kind == "folder":
        model = _from_folder(preset, cls, where)
    else:
        model = _from_single_file(preset, cls, Path(where.location), config)
    _check_complete(model, str(where))
    _check_channels(preset, _latent_channels(model.config), str(where))
    # torch's own `to`: diffusers' override warns about fp32-only modules on every cast, even when there are none.
    torch.nn.Module.to(model, device=device, dtype=dtype)
    return model.train(False).requires_grad_(False)


def _vae_class(preset: Preset) -> type:
    import diffusers

    cls = getattr(diffusers, preset.diffusers_class, None)
    if cls is None:
        raise ModelLoadError(
            f"preset {preset.name} needs diffusers.{preset.diffusers_class}, which diffusers "
            f"{diffusers.__version__} lacks: upgrade diffusers"
        )
    return cls


def _from_hub(preset: Preset, cls: type, where: Source) -> torch.nn.Module:
    try:
        return cls.from_pretrained(where.location, subfolder=where.subfolder, use_safetensors=True)
    except (OSError, ValueError) as exc:  # offline, missing, gated, or no safetensors weights
        sub = f", subfolder {where.subfolder!r}" if where.subfolder else ""
        raise ModelLoadError(
            f"could not load {where.location!r}{sub} from the Hugging Face hub ({first_line(exc)}). "
            f"If the machine is offline, the repo is gated or it is not in the local cache, "
            f"{_how_to_point(preset)}",
            has_hint=True,
        ) from exc


def _from_folder(preset: Preset, cls: type, where: Source) -> torch.nn.Module:
    folder = Path(where.location) / (where.subfolder or "")
    _check_class(preset, _read_json(folder / "config.json").get("_class_name"), f"folder {folder}")
    try:
        return cls.from_pretrained(
            where.location, subfolder=where.subfolder, local_files_only=True, use_safetensors=True
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(
            f"could not load the diffusers folder {folder} ({first_line(exc)}); it needs config.json and "
            f"diffusion_pytorch_model.safetensors (pickled .bin weights are refused)"
        ) from exc


def _from_single_file(preset: Preset, cls: type, path: Path, config: str | dict | None) -> torch.nn.Module:
    state_dict = read_state_dict(path)
    layout = layout_for(preset, state_dict, path.name)
    cfg = _fit(cls, _config_for(preset, path, state_dict, layout, config))
    _check_class(preset, cfg.get("_class_name"), path.name)
    _check_channels(preset, _latent_channels(cfg), path.name)
    _check_groups(cfg, path)
    weights = to_diffusers(layout, state_dict)
    model = _empty_fitting(cls, cfg, weights, path)
    if DIFFUSERS_CONVERTS.get(layout.name) == cls.__name__:
        return _diffusers_single_file(cls, cfg, state_dict)  # the checked file, converted by diffusers itself
    model.load_state_dict(weights, strict=False, assign=True)
    return model


def _empty_fitting(cls: type, config: dict, weights: dict[str, torch.Tensor], path: Path) -> torch.nn.Module:
    """The model without allocated weights, once the file is known to hold every tensor in its shape."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights():
            model = cls.from_config(config)
    except (ValueError, TypeError) as exc:
        raise ModelLoadError(
            f"{path.name}: the config {_summary(config)} does not build: {first_line(exc)}"
        ) from exc
    _check_complete(model, path.name, provided=weights.keys())
    for name, tensor in model.state_dict().items():
        if weights[name].shape != tensor.shape:
            raise ModelLoadError(
                f"{path.name} does not fit the architecture {_summary(config)}: {name} is "
                f"{list(weights[name].shape)} in the file but {list(tensor.shape)} in the model. If it is a "
                f"variant with another architecture, put its diffusers config.json next to it as "
                f"{path.stem}.config.json"
            )
    unused = sorted(weights.keys() - model.state_dict().keys())
    if unused:  # ComfyUI ignores such leftovers too (training-only tensors, an EMA copy, ...)
        log.warning(
            "%s: ignoring %d tensors the model does not use, e.g. %s", path.name, len(unused), unused[:3]
        )
    return model


def _diffusers_single_file(cls: type, config: dict, state_dict: dict) -> torch.nn.Module:
    """diffusers' own converter, given the config as a local folder so that it never asks the hub."""
    with tempfile.TemporaryDirectory(prefix="remote-vae-config-") as folder:
        (Path(folder) / "config.json").write_text(json.dumps({"_class_name": cls.__name__, **config}))
        return cls.from_single_file(state_dict, config=folder, local_files_only=True)


def _check_complete(model: torch.nn.Module, what: str, provided: Collection[str] | None = None) -> None:
    """Every tensor present: in `provided` (names about to be loaded), else no longer on the meta device."""
    tensors = dict([*model.named_parameters(), *model.named_buffers()])
    if provided is None:
        missing = [name for name, tensor in tensors.items() if tensor.is_meta]
    else:
        missing = [name for name in model.state_dict() if name not in provided]
    if missing:
        raise ModelLoadError(
            f"{what} lacks {len(missing)} of the {type(model).__name__}'s {len(tensors)} tensors "
            f"(e.g. {', '.join(missing[:3])}): it is not a complete VAE of this architecture"
        )


def _config_for(
    preset: Preset, path: Path, state_dict: dict, layout: Layout, config: str | dict | None
) -> dict:
    """The architecture: explicit config, else a sidecar json, else read from the shapes, else the preset's."""
    if config is not None:
        return _read_config(config)
    for sidecar in (path.with_suffix(".json"), Path(f"{path}.json"), path.with_suffix(".config.json")):
        if sidecar.is_file():
            return _read_config(sidecar)
    return infer_config(preset, state_dict, layout)


def _check_groups(config: dict, path: Path) -> None:
    groups, widths = config.get("norm_num_groups", 32), config.get("block_out_channels", ())
    if any(width % groups for width in widths):
        raise ModelLoadError(
            f"{path.name}: channel widths {list(widths)} are not multiples of norm_num_groups={groups}, and the "
            f"weights cannot tell the group count; put the model's diffusers config.json next to it as "
            f"{path.stem}.config.json (or pass config=)"
        )


def _read_config(config: str | Path | dict) -> dict:
    if isinstance(config, dict):
        return dict(config)
    path = Path(config).expanduser()
    if path.is_dir():
        found = [p for p in (path / "config.json", path / "vae" / "config.json") if p.is_file()]
        if not found:
            raise ModelLoadError(f"config folder {path} has no config.json (nor vae/config.json)")
        path = found[0]
    return _read_json(path)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not read the config {path}: {first_line(exc)}") from exc
    if not isinstance(value, dict):
        raise ModelLoadError(f"config {path} is not a JSON object")
    return value


def _fit(cls: type, config: dict) -> dict:
    """Only the keys `cls` takes (plus diffusers' private ones), so no misleading 'unused key' warnings."""
    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in config.items() if k in accepted or k.startswith("_")}


# --------------------------------------------------------------------------- checks and messages


def _latent_channels(config) -> int | None:
    config = dict(config)
    return config.get("latent_channels", config.get("z_dim"))


def _check_channels(preset: Preset, channels: int | None, what: str) -> None:
    if channels is None or channels == preset.latent_channels:
        return
    fits = [
        p.name
        for p in PRESETS.values()
        if p.latent_channels == channels and p.diffusers_class == preset.diffusers_class
    ]
    hint = (
        f"pick the {' or '.join(fits)} preset"
        if fits
        else f"no {preset.diffusers_class} preset has that many"
    )
    raise ModelLoadError(
        f"{what} has {channels} latent channels but preset {preset.name} expects {preset.latent_channels}: {hint}"
    )


def _check_class(preset: Preset, class_name: str | None, what: str) -> None:
    if class_name and class_name != preset.diffusers_class:
        fits = [p.name for p in PRESETS.values() if p.diffusers_class == class_name]
        hint = f"pick the {' or '.join(fits)} preset" if fits else "no preset uses that class"
        raise ModelLoadError(
            f"{what} holds a {class_name} but preset {preset.name} uses {preset.diffusers_class}: {hint}"
        )


def _summary(config: dict) -> str:
    keys = ("block_out_channels", "layers_per_block", "latent_channels", "base_dim", "z_dim", "dim_mult")
    return "{" + ", ".join(f"{k}={config[k]}" for k in keys if k in config) + "}"
