"""Peak memory, client and server: `python -m bench.memory [--size 512] [--big 4096] [--quick]`.

Client: peak RSS (`resource.getrusage(...).ru_maxrss`) of fresh ComfyUI-like processes that import torch
and the pack's nodes and then (a) do nothing, (b) run RemoteVAEDecode against a server, (c) decode in
process with the full-size SD VAE, ComfyUI-style. The remote path must not load VAE weights: each child
also reports whether diffusers was imported and how many VAE parameters it built.
Server: peak RSS (VmHWM) of a fresh server process for one big decode (default 4096x4096, reduced-width
VAE so it runs on a CPU) with the server's `tile=on` vs `tile=off` request parameter; where the server has
no tiling, `local_server.tiling.run_tiled` vs a whole decode in fresh subprocesses instead.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from .common import REPO, Server, default_threads, metric_total, metrics, record_as_module, revision
from .results import markdown_table, record

TILE, OVERLAP = 64, 8  # latent pixels, for the direct run_tiled fallback (the server's default tile is 64)


# --------------------------------------------------------------------------- children (fresh processes)


def child(mode: str, size: int, url: str | None, threads: int) -> None:
    """One measurement in this fresh process; prints a JSON line."""
    torch.set_num_threads(threads)
    from remote_vae.nodes.vae_nodes import RemoteVAEDecode  # what ComfyUI imports when it loads the pack

    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    params = 0
    started = time.perf_counter()
    if mode == "remote":
        image = RemoteVAEDecode().decode(
            samples={"samples": z}, preset="sd15", endpoint=url, transfer="lossless", timeout=3600
        )[0]
        assert image.shape == (1, size, size, 3)
    elif mode == "local":
        from .models import build, comfy_decode

        model = build("sd-full")
        params = sum(p.numel() for p in model.parameters())
        image = comfy_decode(model, z)
    elif mode in ("whole", "tiled"):
        from remote_vae.local_server.tiling import run_tiled

        from .models import build

        model = build("sd-small")
        params = sum(p.numel() for p in model.parameters())
        with torch.inference_mode():
            if mode == "whole":
                model.decode(z)
            else:
                run_tiled(lambda t: model.decode(t).sample, z, tile=TILE, overlap=OVERLAP, scale=8)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(
        json.dumps(
            {
                "peak_mib": peak,
                "seconds": time.perf_counter() - started,
                "diffusers": "diffusers" in sys.modules,
                "vae_params": params,
            }
        )
    )


def run_child(mode: str, size: int, threads: int, url: str | None = None) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "bench.memory",
        "--child",
        mode,
        "--size",
        str(size),
        "--threads",
        str(threads),
    ]
    if url:
        cmd += ["--url", url]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{mode} {size}px: {result}", flush=True)
    return result


# --------------------------------------------------------------------------- the two measurements


def client_rows(size: int, threads: int) -> list[list]:
    with Server(["sd=sd15:sd-small"], threads=threads) as server:
        remote = run_child("remote", size, threads, f"{server.url}/sd")
    results = [
        ("import torch + the pack's nodes, no decode", run_child("baseline", size, threads)),
        ("RemoteVAEDecode (lossless) via a server", remote),
        ("in-process decode, full-size SD VAE (float32)", run_child("local", size, threads)),
    ]
    base = results[0][1]["peak_mib"]
    return [
        [
            name,
            f"{r['peak_mib']:.0f}",
            f"{r['peak_mib'] - base:+.0f}",
            "yes" if r["diffusers"] else "no",
            f"{r['vae_params']:,}",
            f"{r['seconds']:.1f}",
        ]
        for name, r in results
    ]


def reads_tile_parameter(url: str) -> bool:
    """Whether the server understands `tile`: one that does refuses a bad value before decoding anything."""
    from remote_vae.remote import client, protocol

    wire = protocol.build_decode_request(
        torch.zeros(1, 4, 8, 8),
        output_type="pt",
        partial_postprocess=True,
        do_scaling=False,
        extensions=protocol.Extensions(tile="sideways"),
    )
    try:
        client.send(url, wire, retries=0)
    except client.RemoteVAEError as exc:
        return exc.status == 400 and "tile" in str(exc)
    return False


def server_rows(big: int, threads: int) -> tuple[list[list], str] | None:
    """Rows for tile=off and tile=on, a fresh server each; None when the server has no `tile` parameter."""
    from remote_vae.remote import client, protocol

    z = torch.randn(1, 4, big // 8, big // 8, generator=torch.Generator().manual_seed(0))
    rows = []
    for tile in ("off", "on"):
        wire = protocol.build_decode_request(
            z,
            output_type="pt",
            partial_postprocess=True,
            do_scaling=False,
            extensions=protocol.Extensions(tile=tile),
        )
        with Server(["sd=sd15:sd-small"], threads=threads) as server:
            if not reads_tile_parameter(f"{server.url}/sd"):
                return None
            idle = server.peak_rss_mib()
            started = time.perf_counter()
            reply = client.send(f"{server.url}/sd", wire, retries=0, timeout=(10.0, 3600.0))
            seconds = time.perf_counter() - started
            peak = server.peak_rss_mib()
            tiled = metric_total(metrics(server.url), "remote_vae_tiled_total") > 0
        assert reply.tensor().shape == (1, big, big, 3)
        rows.append(
            [
                f"server, tile={tile}",
                f"{peak:.0f}",
                f"{peak - idle:+.0f}",
                "yes" if tiled else "no",
                f"{seconds:.1f}",
            ]
        )
        print(
            f"tile={tile}: peak {peak:.0f} MiB (idle {idle:.0f}), {seconds:.1f} s, tiled={tiled}", flush=True
        )
    return rows, "the server's tile=on|off request parameter (fresh server per row; VmHWM of its process)"


def direct_rows(big: int, threads: int, why: str) -> tuple[list[list], str]:
    baseline = run_child("baseline", 8, threads)["peak_mib"]
    rows = []
    for mode in ("whole", "tiled"):
        r = run_child(mode, big, threads)
        rows.append(
            [
                f"in a subprocess, {mode}",
                f"{r['peak_mib']:.0f}",
                f"{r['peak_mib'] - baseline:+.0f}",
                "yes" if mode == "tiled" else "no",
                f"{r['seconds']:.1f}",
            ]
        )
    return rows, (
        f"local_server.tiling.run_tiled (tile {TILE}, overlap {OVERLAP} latent px) vs a whole decode, each in a "
        f"fresh subprocess (ru_maxrss); {why}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size", type=int, default=512, help="client-side image side in pixels (default 512)"
    )
    parser.add_argument(
        "--big", type=int, default=4096, help="server-side image side for tiling (default 4096)"
    )
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument(
        "--direct", action="store_true", help="measure run_tiled directly even if the server tiles"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 128 px client, 1024 px server")
    parser.add_argument(
        "--child", choices=("baseline", "remote", "local", "whole", "tiled"), help=argparse.SUPPRESS
    )
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.size, args.url, args.threads)
        return
    record_as_module("bench.memory")
    if args.quick:
        args.size, args.big = 128, 1024

    table = [f"**Client: one {args.size}x{args.size} decode, peak RSS of a fresh process**", ""]
    table += markdown_table(
        [
            "process",
            "peak RSS MiB",
            "vs baseline MiB",
            "diffusers imported",
            "VAE parameters built",
            "seconds",
        ],
        client_rows(args.size, args.threads),
    )
    found = None if args.direct else server_rows(args.big, args.threads)
    rows, how = found or direct_rows(
        args.big, args.threads, "--direct given" if args.direct else "the server has no tile parameter"
    )
    table += ["", f"**Server: one {args.big}x{args.big} decode, reduced-width SD VAE (sd-small), {how}**", ""]
    table += markdown_table(["run", "peak RSS MiB", "over idle MiB", "tiled", "seconds"], rows)
    notes = (
        f"{args.threads} torch threads. The client-side server hosts sd-small (only the client process is measured). "
        "On a GPU machine the in-process decode's weights and activations would sit in VRAM instead of RSS; the point "
        "is that the remote path builds no VAE at all. Server rows: sd-small has no mid-block attention, whose memory "
        "at 4096x4096 would dominate everything else."
    )
    notes += f" ({revision()})"
    if args.quick:
        notes += " QUICK smoke run (--quick): not a measurement."
    record("Memory: client process and server tiling (bench/memory.py)", table, notes)


if __name__ == "__main__":
    main()
