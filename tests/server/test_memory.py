"""Memory planning: whole, split by batch, or tiled, and the fallbacks after an out-of-memory error."""

import torch

from remote_vae.local_server.memory import MIN_TILE, Plan, decode_bytes, encode_bytes, plan, smaller_plans
from remote_vae.remote.presets import PRESETS

GIB = 1 << 30


def test_sd_decode_estimate_matches_comfyui_formula():
    # ComfyUI: 2178 * h * w * 64 * dtype_size; 1024^2 in bf16 is about 4.57 GB (performance.md 1.3).
    assert decode_bytes(PRESETS["sdxl"], (1, 4, 128, 128), torch.bfloat16) == 2178 * 128 * 128 * 64 * 2
    assert encode_bytes(PRESETS["sd15"], (1, 3, 512, 512), torch.float32) == 1767 * 512 * 512 * 4


def test_video_estimates_follow_the_frame_rule_of_each_family():
    hunyuan, wan = PRESETS["hunyuan_video"], PRESETS["wan21"]
    assert decode_bytes(hunyuan, (1, 16, 8, 40, 64), torch.float16) == 8 * decode_bytes(
        hunyuan, (1, 16, 1, 40, 64), torch.float16
    )
    assert decode_bytes(wan, (1, 16, 8, 40, 64), torch.float16) == decode_bytes(
        wan, (1, 16, 1, 40, 64), torch.float16
    )


def test_plan_runs_whole_when_it_fits():
    assert plan(GIB, 4, (128, 128), 8 * GIB) == Plan(batch=4)


def test_plan_splits_the_batch_when_one_item_fits():
    assert plan(3 * GIB, 4, (128, 128), 8 * GIB) == Plan(batch=2)


def test_plan_tiles_when_one_item_does_not_fit():
    chosen = plan(16 * GIB, 1, (512, 512), 4 * GIB)
    assert chosen.tiled and MIN_TILE <= chosen.tile <= 64 and chosen.batch == 1


def test_tile_on_and_off_are_obeyed():
    assert plan(GIB, 1, (128, 128), 8 * GIB, tile="on", tile_size=32) == Plan(batch=1, tile=32)
    assert plan(16 * GIB, 2, (512, 512), 4 * GIB, tile="off") == Plan(batch=1)


def test_fallbacks_shrink_until_the_smallest_tile():
    steps = list(smaller_plans(Plan(batch=4), (128, 128)))
    assert steps[:3] == [Plan(batch=2), Plan(batch=1), Plan(batch=1, tile=64)]
    assert steps[-1].tile == MIN_TILE
    assert all(a != b for a, b in zip(steps, steps[1:]))


def test_overlap_shrinks_with_the_tile():
    assert (
        Plan(batch=1, tile=64).overlap == 8
        and Plan(batch=1, tile=16).overlap == 4
        and Plan(batch=1).overlap == 0
    )
