"""A real ComfyUI for a test module, run in that module's `base` folder (each module defines `base`)."""

import pytest

from support.comfyui_harness import running_comfyui


@pytest.fixture(scope="module")
def comfy(base):
    with running_comfyui(base) as comfy:
        yield comfy
