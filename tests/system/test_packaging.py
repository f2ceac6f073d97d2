"""Packaging facts users and registries rely on."""

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_requirements_txt_lists_the_runtime_dependencies():
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert [line for line in lines if line and not line.startswith("#")] == pyproject()["project"]["dependencies"]


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
    assert (ROOT / "README.md").read_text().startswith("# remote-vae\n\n```bash\n" + start + "\n```\n\n```bash\n" + test)
    assert start.endswith("remote-vae-server") and test == "bash tests/run_all.sh"
    assert "bash tests/run_all.sh" in (ROOT / ".ci" / "run").read_text()
