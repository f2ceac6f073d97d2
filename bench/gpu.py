"""Decode speed on a CUDA GPU with the server's speed-ups on and off: `python -m bench.gpu [--quick]`.

SD VAE (full size) at 1024x1024 and HunyuanVideo's VAE (full size) at 61 frames of 320x512, random
weights, in the dtype the server picks on a GPU (float16 for both presets; `--dtype` to change it): eager, channels_last, cudnn.benchmark, torch.compile, and
all three (applied by `local_server.accel`, exactly as the server applies them). Per variant: median decode
time (CUDA-synchronised), images or frames per second, peak allocated memory, and the share of the GPU's
dense bf16/fp16 peak that the executed FLOPs reach (the physical floor: SD 1024^2 = 10.47 TFLOP, 10.6 ms
on an H100 SXM). On a machine without CUDA it says so and exits
without recording anything.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .common import median, record_as_module, revision
from .models import build
from .results import markdown_table, record

# Dense tensor-core peak (FLOP/s, bf16/fp16 with fp32 accumulate) and memory bandwidth (B/s), by device
# name fragment, from performance.md section 4.3. Checked in order: "H100 PCIe" before "H100".
PEAKS = (
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100", 989e12, 3.35e12),
    ("H200", 989e12, 4.8e12),
    ("B200", 2250e12, 8.0e12),
    ("RTX 4090", 165.2e12, 1.008e12),
)
DEVICE = "cuda"
# Memory traffic of the SD decoder at 1024^2 in fp16 with GroupNorm+SiLU fused into the convolutions
# (performance.md 4.2; 24.5 GB unfused): the lowest traffic, so the bandwidth floor stays a floor.
SD_1024_TRAFFIC = 9.7e9

VARIANTS = {
    "eager": {},
    "channels_last": {"channels_last": True},
    "cudnn.benchmark": {"cudnn_benchmark": True},
    "torch.compile": {"compile": True},
    "all three": {"channels_last": True, "cudnn_benchmark": True, "compile": True},
}


@dataclass
class Case:
    name: str
    preset: str
    build: Callable[[], torch.nn.Module]
    latent: tuple[int, ...]
    items: int  # images or frames one decode yields
    unit: str
    traffic: float | None = None


def hunyuan_video() -> torch.nn.Module:
    from remote_vae.testing import random_vae

    return random_vae(
        "hunyuan_video", 0, size="full"
    )  # the published architecture (146 M decoder parameters)


def cases(quick: bool) -> list[Case]:
    sd_side = 512 if quick else 1024
    sd = Case(
        f"SD VAE {sd_side}x{sd_side}",
        "sd15",
        lambda: build("sd-full"),
        (1, 4, sd_side // 8, sd_side // 8),
        1,
        "img/s",
        None if quick else SD_1024_TRAFFIC,
    )
    frames = 13 if quick else 61
    video = Case(
        f"HunyuanVideo VAE {frames}x320x512",
        "hunyuan_video",
        hunyuan_video,
        (1, 16, (frames - 1) // 4 + 1, 40, 64),
        frames,
        "frames/s",
    )
    return [sd, video]


def apply_accel(
    model: torch.nn.Module, device: torch.device, flags: dict, video: bool
) -> tuple[torch.nn.Module, Callable]:
    """The server's own `accel.apply` where it exists; else the same three switches here."""
    torch.backends.cudnn.benchmark = False  # a global: reset between variants
    try:
        from remote_vae.local_server import accel
    except ImportError:
        accel = None
    if accel is not None:
        settings = accel.Accel(**flags)
        return accel.apply(model, device, settings, video=video), lambda x: accel.input_layout(x, settings)
    if flags.get("cudnn_benchmark"):
        torch.backends.cudnn.benchmark = True
    layout = torch.channels_last_3d if video else torch.channels_last
    if flags.get("channels_last"):
        model = model.to(memory_format=layout)
    if flags.get("compile"):
        model.decoder = torch.compile(model.decoder)
    return model, (lambda x: x.contiguous(memory_format=layout)) if flags.get("channels_last") else (
        lambda x: x
    )


def executed_flops(model: torch.nn.Module, z: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.decode(z)
    return float(counter.get_total_flops())


def time_variant(
    base: torch.nn.Module,
    case: Case,
    flags: dict,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
    warmup: int,
) -> tuple[float, float]:
    """(median seconds per decode, peak allocated GiB) of one variant on a fresh copy of the model."""
    model = copy.deepcopy(base).to(device=device, dtype=dtype)
    model, layout = apply_accel(model, device, flags, video=len(case.latent) == 5)
    z = layout(
        torch.randn(case.latent, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    )
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            torch.cuda.synchronize(device)
            started = time.perf_counter()
            model.decode(z)
            torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) / (1 << 30)
    del model, z
    torch.cuda.empty_cache()
    return median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--repeats", type=int, default=10, help="timed decodes per variant (median; default 10)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed decodes first (compile happens here)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--skip-video", action="store_true", help="only the SD VAE")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float16", "bfloat16", "float32"),
        help="auto (default): what the server picks on a GPU, the preset's first safe dtype",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: SD 512^2, 13 frames, eager and all three"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "bench.gpu: no CUDA device here (torch.cuda.is_available() is False); this benchmark only runs on a "
            "GPU machine. Nothing measured, nothing recorded."
        )
        sys.exit(0)
    record_as_module("bench.gpu")
    if args.quick:
        args.repeats, args.warmup, args.variants = 3, 2, ["eager", "all three"]

    from remote_vae.local_server.devices import resolve_dtype
    from remote_vae.remote.presets import get_preset

    device = torch.device(DEVICE)
    name = torch.cuda.get_device_name(device)
    peak_flops, bandwidth = next(((f, b) for key, f, b in PEAKS if key in name), (None, None))
    table: list[str] = []
    for case in cases(args.quick)[: 1 if args.skip_video else 2]:
        dtype = resolve_dtype(args.dtype, get_preset(case.preset), device)
        base = case.build()
        eager = copy.deepcopy(base).to(device=device, dtype=dtype)
        flops = executed_flops(eager, torch.zeros(case.latent, device=device, dtype=dtype))
        del eager
        torch.cuda.empty_cache()
        floor = flops / peak_flops if peak_flops else None
        if floor is not None and case.traffic and bandwidth:
            floor = max(floor, case.traffic / bandwidth)
        rows = []
        for variant in args.variants:
            try:
                seconds, memory = time_variant(
                    base, case, VARIANTS[variant], device, dtype, args.repeats, args.warmup
                )
            except Exception as exc:  # an OOM or a compile failure is a result too
                rows.append(
                    [variant, f"failed: {type(exc).__name__}: {str(exc)[:120]}", "-", "-", "-", "-", "-"]
                )
                torch.cuda.empty_cache()
                continue
            tflops = flops / seconds / 1e12
            rows.append(
                [
                    variant,
                    f"{seconds * 1000:.1f}",
                    f"{case.items / seconds:.2f}",
                    f"{memory:.2f}",
                    f"{tflops:.1f}",
                    f"{100 * flops / seconds / peak_flops:.1f}" if peak_flops else "-",
                    f"{seconds / floor:.1f}" if floor else "-",
                ]
            )
            print(f"{case.name} {variant}: {rows[-1]}", flush=True)
        table += [
            f"**{case.name}, {str(dtype).removeprefix('torch.')}, executed {flops / 1e12:.2f} TFLOP per decode"
            + (f", floor {floor * 1000:.1f} ms" if floor else "")
            + "**",
            "",
        ]
        table += markdown_table(
            [
                "variant",
                "ms per decode (median)",
                case.unit,
                "peak GiB",
                "TFLOP/s",
                "% of dense peak",
                "x floor",
            ],
            rows,
        )
        table.append("")
        del base
    notes = (
        f"{name}; median of {args.repeats} decodes after {args.warmup} warm-ups per variant, each variant on a fresh copy "
        "of the model. Random weights (no downloads); FLOPs counted by torch.utils.flop_counter on the eager model "
        "(convolutions, matmuls, attention). Floor = max(FLOPs / dense peak, traffic / bandwidth) with the peaks of "
        "performance.md 4.3" + ("" if peak_flops else f"; no peak figures known for {name}") + "."
    )
    notes += f" ({revision()})"
    if args.quick:
        notes += " QUICK smoke run (--quick): not a measurement."
    record(
        "GPU: decode speed with channels_last / cudnn.benchmark / torch.compile (bench/gpu.py)", table, notes
    )


if __name__ == "__main__":
    main()
