"""Packaging facts users and registries rely on."""

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_requirements_txt_lists_the_runtime_dependencies():
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert [line for line in lines if line and not line.startswith("#")] == pyproject()["project"][
        "dependencies"
    ]


def test_registry_and_entry_points():
    data = pyproject()
    assert data["project"]["name"] == "remote-vae"
    assert re.fullmatch(r"\d+\.\d+\.\d+", data["project"]["version"])
    assert data["tool"]["comfy"]["DisplayName"] == "Remote VAE" and data["tool"]["comfy"]["web"] == "web"
    assert data["project"]["scripts"]["remote-vae-server"] == "remote_vae.local_server.cli:main"
    assert "torch" not in " ".join(data["project"]["dependencies"])  # ComfyUI brings its own torch


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    start, test = blocks[0], blocks[1]
    assert (
        (ROOT / "README.md")
        .read_text()
        .startswith("# remote-vae\n\n```bash\n" + start + "\n```\n\n```bash\n" + test)
    )
    assert start.endswith("remote-vae-server") and test == "bash tests/run_all.sh"
    assert "bash tests/run_all.sh" in (ROOT / ".ci" / "run").read_text()


def registry_archive() -> list[str]:
    """The files `comfy node publish` packs: git-tracked files minus .comfyignore's patterns."""

    def listed(*options: str) -> set[str]:
        out = subprocess.run(
            ["git", "ls-files", *options], cwd=ROOT, capture_output=True, text=True, check=True
        )
        return set(out.stdout.splitlines())

    return sorted(listed() - listed("-ci", "--exclude-from=.comfyignore"))


def test_the_registry_archive_holds_only_what_comfyui_uses():
    files = registry_archive()
    tops = {name.split("/")[0] for name in files}
    assert tops == {
        "__init__.py", "README.md", "pyproject.toml", "requirements.txt", "nodes", "remote", "web", "example_workflows",
    }  # fmt: skip
    assert pyproject()["tool"]["comfy"]["requires-comfyui"] and pyproject()["tool"]["comfy"]["includes"] == []


def test_the_pack_loads_from_the_registry_archive_alone(tmp_path):
    """Unpacked into custom_nodes/ under another folder name, the archive imports as ComfyUI imports it."""
    pack = tmp_path / "custom_nodes" / "remote-vae"
    for name in registry_archive():
        (pack / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, pack / name)
    spec = importlib.util.spec_from_file_location("remote_vae_from_archive", pack / "__init__.py",
                                                  submodule_search_locations=[str(pack)])  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        assert set(module.NODE_CLASS_MAPPINGS) == {
            "RemoteVAEDecode",
            "RemoteVAEEncode",
            "RemoteVideoDecode",
            "RemoteVAELoader",
        }
        assert (pack / module.WEB_DIRECTORY / "remote_vae.js").is_file()
    finally:
        for name in [n for n in sys.modules if n == spec.name or n.startswith(spec.name + ".")]:
            del sys.modules[name]


def test_readme_says_how_to_install_from_the_registry():
    readme = (ROOT / "README.md").read_text()
    assert "comfy node install remote-vae" in readme and "ComfyUI-Manager" in readme
