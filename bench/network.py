"""A batch of 1024x1024 decodes over an emulated home link: `python -m bench.network [--quick]`.

The link is 100 Mbit/s each way with a 20 ms round trip (bench/linkem.py: tc netem where the kernel has
it, else a rate-limiting, delaying TCP proxy). The server hosts a stand-in decoder with SD's shapes and
GPU-like compute (tens of ms; bench/models.py), so the transfer is what differs between rows:

- ours: RemoteVAEDecode as a user runs it (its chunking and concurrency, `lossless` = uint8 pixels);
  also with one image per request, and `compact` (JPEG);
- diffusers' `remote_decode` called once per image: its default (pil/jpg), `pt` with partial_postprocess
  (uint8), and `pt` raw (float16);
- the existing ComfyUI peer's request shape (kijai/ComfyUI-HFRemoteVae): float32 latents up, float16 raw
  down, one request for the whole batch, a new connection per call (plain `requests.post`).

Target (issue #5): ours <= half the time of the peer's shape.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import requests
import torch

from remote_vae.remote import protocol

from .common import Server, default_threads, median, mib, record_as_module, revision
from .linkem import NetemLink, ProxyLink, netem_problem
from .models import build
from .results import markdown_table, record

RATE_MBIT, RTT_MS = 100.0, 20.0
TIMEOUT = 600


def peer_request(url: str, z: torch.Tensor) -> torch.Tensor:
    """kijai/ComfyUI-HFRemoteVae's decode: the latent as is, pt raw back, its VaeImageProcessor post-processing."""
    wire = protocol.build_decode_request(
        z.float(), output_type="pt", do_scaling=False, height=z.shape[2] * 8, width=z.shape[3] * 8
    )
    response = requests.post(url, params=wire.params, headers=wire.headers, data=wire.body, timeout=TIMEOUT)
    response.raise_for_status()
    x = protocol.parse_tensor_response(response.content, response.headers)
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().float()


def variants(url: str, z: torch.Tensor) -> dict[str, Callable[[], object]]:
    from diffusers.utils.remote_utils import remote_decode

    from remote_vae.nodes.operations import NodeRequest, RunOptions, decode_latent
    from remote_vae.nodes.vae_nodes import RemoteVAEDecode

    node = RemoteVAEDecode()
    one_image = z.shape[2] * z.shape[3] * 64

    def per_image(**kwargs: object) -> Callable[[], object]:
        return lambda: [
            remote_decode(url, z[i : i + 1], do_scaling=False, **kwargs) for i in range(z.shape[0])
        ]

    return {
        "ours: RemoteVAEDecode, lossless (uint8), default chunking": lambda: node.decode(
            samples={"samples": z}, preset="sd15", endpoint=url, transfer="lossless", timeout=TIMEOUT
        ),
        "ours: lossless, 1 image per request (3 in flight)": lambda: decode_latent(
            z,
            NodeRequest(preset="sd15", endpoint=url, transfer="lossless", timeout=TIMEOUT),
            RunOptions(pixel_budget=one_image),
        ),
        "ours: RemoteVAEDecode, compact (JPEG q95)": lambda: node.decode(
            samples={"samples": z}, preset="sd15", endpoint=url, transfer="compact", timeout=TIMEOUT
        ),
        "diffusers remote_decode per image: pil/jpg (default)": per_image(),
        "diffusers remote_decode per image: pt + partial_postprocess (uint8)": per_image(
            output_type="pt", partial_postprocess=True, return_type="pt"
        ),
        "diffusers remote_decode per image: pt raw (float16)": per_image(output_type="pt", return_type="pt"),
        "peer's shape: float32 up, float16 raw down, one request": lambda: peer_request(url, z),
    }


def compute_seconds(model: torch.nn.Module, z: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        with torch.inference_mode():
            model.decode(z)
        times.append(time.perf_counter() - started)
    return median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024)")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs of each variant (median; default 5)"
    )
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--proxy", action="store_true", help="use the TCP proxy even where netem works")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 images of 256x256, 1 run")
    args = parser.parse_args()
    record_as_module("bench.network")
    if args.quick:
        args.batch, args.size, args.repeats = 2, 256, 1
    torch.set_num_threads(args.threads)
    z = torch.randn(args.batch, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))
    model = build("sd-standin")
    compute_one, compute_batch = compute_seconds(model, z[:1], 5), compute_seconds(model, z, 5)

    problem = "--proxy given" if args.proxy else netem_problem()
    if problem is None:
        link = NetemLink(RATE_MBIT, RTT_MS)
    else:
        print(f"tc netem unavailable ({problem}); using the TCP proxy", flush=True)
        link = None
    rows = []
    spec = ["sd15=sd15:sd-standin"]
    if link is not None:
        with link, Server(spec, threads=args.threads, host=link.server_ip, prefix=link.prefix) as server:
            rows = run_all(f"{server.url}/sd15", z, link, args.repeats)
        kind = link.kind
    else:
        with (
            Server(spec, threads=args.threads) as server,
            ProxyLink(("127.0.0.1", server.port), RATE_MBIT, RTT_MS) as proxy,
        ):
            rows = run_all(f"http://{proxy.address}/sd15", z, proxy, args.repeats)
            kind = f"{proxy.kind}: {problem.rstrip('.')}"

    peer = next(r for r in rows if r[0].startswith("peer"))[3]
    ours = rows[0][3]
    table = markdown_table(
        ["variant", "link MiB up", "link MiB down", "time s (median)", "time / peer's", "runs (s)"],
        [[r[0], f"{mib(r[1]):.2f}", f"{mib(r[2]):.2f}", r[3], r[3] / peer, r[4]] for r in rows],
    )
    table += [
        "",
        f"Target: ours (RemoteVAEDecode, default) <= 0.5 x the peer's shape: {ours / peer:.3f} -> "
        f"{'met' if ours <= peer / 2 else 'NOT met'}.",
    ]
    notes = (
        f"{args.batch} x {args.size}x{args.size} decodes (latents [{args.batch},4,{args.size // 8},{args.size // 8}] "
        f"float32), link {RATE_MBIT:g} Mbit/s each way, {RTT_MS:g} ms RTT, emulated by {kind}. Median of "
        f"{args.repeats} runs per variant, variants interleaved. Server compute (stand-in decoder, in-process, "
        f"{args.threads} threads): {compute_one * 1000:.0f} ms per image, {compute_batch * 1000:.0f} ms per batch of "
        f"{args.batch}. Link bytes are what crossed the link (proxy: HTTP payload; netem: frames incl. headers)."
    )
    notes += f" ({revision()})"
    if args.quick:
        notes += " QUICK smoke run (--quick): not a measurement."
    record("Network: batch decode over a 100 Mbit/s, 20 ms RTT link (bench/network.py)", table, notes)


def run_all(url: str, z: torch.Tensor, link: ProxyLink | NetemLink, repeats: int) -> list[list]:
    runs = variants(url, z)
    for fn in runs.values():  # warm-up: connections, imports, the server's first decode
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    traffic: dict[str, tuple[int, int]] = {}
    names = list(runs)
    for rep in range(repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:  # rotate the order so drift hits every variant alike
            up0, down0 = link.counters()
            started = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - started)
            up1, down1 = link.counters()
            traffic[name] = (up1 - up0, down1 - down0)
        print(f"run {rep + 1}/{repeats} done", flush=True)
    return [
        [name, *traffic[name], median(times[name]), " ".join(f"{t:.2f}" for t in times[name])]
        for name in names
    ]


if __name__ == "__main__":
    main()
