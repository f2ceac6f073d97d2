"""Remote decode of natural pixels over three links, raw against compressed: `python -m bench.links [--quick]`.

Links: loopback, 1 Gbit/s with 1 ms RTT and 100 Mbit/s with 20 ms RTT (bench/linkem.py: tc netem where
the kernel has it, else its rate-limiting, delaying TCP proxy). The server (bench/serve.py) hosts the
natural stand-ins of bench/models.py, whose output the server renders to remote_vae/testing/natural.py's pixels, so
real photographs travel; every answer is compared with them. Through the node's own path
(`nodes.operations.decode_latent`, as RemoteVAEDecode and Remote Video Decode run it with their default
preset `auto`: the server describes its model, and latents go up in its dtype, bfloat16 by default here):

- 4 x 1024x1024 images (sd15 shapes): `lossless` (raw uint8), `auto` (the link rule decides), and jxl
  (`auto` with the rule forced to compress);
- one 81 x 480x832 clip (Wan 2.1 shapes): `lossless` (raw), jxl (forced as above), `near-lossless`
  (h264rgb; PSNR and largest error against the exact frames) and `auto`.

Each variant's median time over the interleaved runs, its bytes (HTTP bodies), its ratio to raw on the
same link, and its link floor: (bytes up + bytes down) / rate + one RTT. Verdicts for issue 12's targets
follow. Variants that need the codec extension (a client with `auto`, a server listing the codec in
/v1/models) say so and are skipped where it is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import requests
import torch

from remote_vae.remote import frames
from remote_vae.testing import natural

from .common import (
    QUICK_NATURAL_HELP,
    Server,
    default_threads,
    median,
    mib,
    natural_shapes,
    record_as_module,
    revision,
)
from .linkem import NetemLink, ProxyLink, netem_problem
from .models import photo_latents
from .results import markdown_table, record

TIMEOUT = 900
SPECS = ["sd15=sd15:photo-standin", "wan21=wan21:wan-standin"]


@dataclass(frozen=True)
class Link:
    name: str
    rate_mbit: float | None  # None: loopback, no emulation
    rtt_ms: float = 0.0


LINKS = {
    "loopback": Link("loopback", None),
    "1g": Link("1 Gbit/s, 1 ms RTT", 1000.0, 1.0),
    "100m": Link("100 Mbit/s, 20 ms RTT", 100.0, 20.0),
}


@dataclass(frozen=True)
class Variant:
    label: str
    transfer: str
    codec: str | None = None  # the codec the server must offer (None: raw)
    force: bool = False  # the link rule forced to compress (jxl whatever the link)


RAW = Variant("raw uint8 (lossless)", "lossless")
AUTO = Variant("auto", "auto", "jxl")
JXL = Variant("jxl (auto, forced to compress)", "auto", "jxl", force=True)
NEAR = Variant("near-lossless (h264rgb)", "near-lossless", "h264rgb")


@dataclass
class Case:
    name: str
    preset: str
    latent: torch.Tensor
    exact: np.ndarray  # the uint8 [N,H,W,3] pixels the decode must give
    variants: list[Variant]
    video: bool = False


@dataclass
class Runs:
    """One variant's runs on one link."""

    seconds: list[float] = field(default_factory=list)
    up: int = 0
    down: int = 0
    forms: dict[str, int] = field(default_factory=dict)  # the form the answers took: count of runs
    max_error: int = 0
    psnr: float = float("inf")


def cases(quick: bool) -> list[Case]:
    (count, size, _), (frames, height, width) = natural_shapes(quick)
    latent_frames = (frames - 1) // 4 + 1
    video = torch.randn(
        1, 16, latent_frames, height // 8, width // 8, generator=torch.Generator().manual_seed(1)
    )
    return [
        Case(
            f"{count} x {size}x{size} images",
            "sd15",
            photo_latents(count, size),
            natural.photos(count, size, size),
            [RAW, AUTO, JXL],
        ),
        Case(
            f"video {frames} x {height}x{width}",
            "wan21",
            video,
            natural.clip(frames, height, width),
            [RAW, JXL, NEAR, AUTO],
            video=True,
        ),
    ]


def missing(variant: Variant, offered: list[str]) -> str | None:
    """Why `variant` cannot run here (None when it can)."""
    from remote_vae.nodes.choices import TRANSFER_DECODE, TRANSFER_VIDEO

    if variant.transfer not in (*TRANSFER_DECODE, *TRANSFER_VIDEO):
        return f"this client has no transfer {variant.transfer!r} (issue 12's client side)"
    if variant.codec is not None and variant.codec not in offered:
        return (
            f"the server does not offer the {variant.codec} codec (its /v1/models lists {offered or 'none'})"
        )
    return None


@contextlib.contextmanager
def forced(variant: Variant) -> Iterator[None]:
    """The link rule answering "compress" for the variants that force it (remote/link.py's LINKS)."""
    if not variant.force:
        yield
        return
    from remote_vae.remote import link

    link.LINKS.compress = lambda *args, **kwargs: True  # an instance attribute shadows the method
    try:
        yield
    finally:
        del link.LINKS.compress


def run_once(url: str, case: Case, variant: Variant, runs: Runs, check: bool) -> None:
    from remote_vae.nodes.operations import NodeRequest, decode_latent

    request = NodeRequest(
        preset="auto",
        endpoint=f"{url}/{case.preset}",
        transfer=variant.transfer,
        timeout=TIMEOUT,
        video_only=case.video,
    )  # fmt: skip  (preset auto, the node's default: the server describes its model, and its dtype)
    with forced(variant):
        started = time.perf_counter()
        outcome = decode_latent(case.latent, request)
        runs.seconds.append(time.perf_counter() - started)
    runs.up = sum(t.bytes_sent for t in outcome.transfers)
    runs.down = sum(t.bytes_received for t in outcome.transfers)
    codecs = sorted({getattr(t, "codec", None) or "raw" for t in outcome.transfers})
    form = "+".join(codecs)
    runs.forms[form] = runs.forms.get(form, 0) + 1
    if check:  # not timed
        pixels = outcome.value.mul(255).round_().to(torch.uint8).numpy()
        runs.max_error = max(runs.max_error, frames.max_error(pixels, case.exact))
        runs.psnr = min(runs.psnr, natural.psnr(pixels, case.exact))


@contextlib.contextmanager
def serving(link: Link, args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """A server reached over `link`: yields (its base URL as the client uses it, how the link is made)."""
    threads, dtype = args.threads, args.dtype
    if link.rate_mbit is None:
        with Server(SPECS, threads=threads, dtype=dtype) as server:
            yield server.url, "loopback (127.0.0.1), no emulation"
        return
    problem = "--proxy given" if args.proxy else netem_problem()
    if problem is None:
        netem = NetemLink(link.rate_mbit, link.rtt_ms)
        with (
            netem,
            Server(SPECS, threads=threads, dtype=dtype, host=netem.server_ip, prefix=netem.prefix) as server,
        ):
            yield server.url, netem.kind
        return
    with (
        Server(SPECS, threads=threads, dtype=dtype) as server,
        ProxyLink(("127.0.0.1", server.port), link.rate_mbit, link.rtt_ms) as proxy,
    ):
        yield f"http://{proxy.address}", f"{proxy.kind}; netem: {problem.rstrip('.')}"


def measure_link(link: Link, chosen: list[Case], args: argparse.Namespace, notes: dict[str, None]) -> dict:
    """{(case, variant label): Runs} for every variant that can run; what was skipped goes to `notes`."""
    results: dict[tuple[str, str], Runs] = {}
    with serving(link, args) as (url, kind):
        notes[f"{link.name}: {kind}."] = None
        offered = requests.get(f"{url}/v1/models", timeout=60).json().get("codecs", [])
        plan = []
        for case in chosen:
            for variant in case.variants:
                why = missing(variant, offered)
                if why:
                    notes[f"{variant.label} skipped: {why}."] = None
                    continue
                plan.append((case, variant))
                results[case.name, variant.label] = Runs()
                run_once(url, case, variant, results[case.name, variant.label], check=True)  # warm-up
        for rep in range(args.repeats):
            shift = rep % max(1, len(plan))
            for case, variant in plan[shift:] + plan[:shift]:  # rotated: drift hits every variant alike
                runs = results[case.name, variant.label]
                if rep == 0:
                    runs.seconds.clear()  # the warm-up is not timed
                    runs.forms.clear()
                run_once(url, case, variant, runs, check=rep == args.repeats - 1)
            print(f"{link.name}: run {rep + 1}/{args.repeats} done", flush=True)
    return results


def floor_seconds(link: Link, runs: Runs) -> float | None:
    if link.rate_mbit is None:
        return None
    return (runs.up + runs.down) * 8 / (link.rate_mbit * 1e6) + link.rtt_ms / 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--links", nargs="+", default=list(LINKS), choices=list(LINKS))
    parser.add_argument("--only", choices=("images", "video"), help="one case only (default both)")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs of each variant (median; default 5)"
    )
    parser.add_argument("--threads", type=int, default=default_threads(), help="the server's torch threads")
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("float32", "bfloat16", "float16"),
        help="the server's model dtype, which the client uploads latents in (default bfloat16, as Wan and "
        "most GPU servers run; the stand-ins render the same pixels in every dtype)",
    )
    parser.add_argument("--proxy", action="store_true", help="use the TCP proxy even where netem works")
    parser.add_argument("--quick", action="store_true", help=QUICK_NATURAL_HELP)
    args = parser.parse_args()
    record_as_module("bench.links")
    if args.quick:
        args.repeats = 1
    torch.set_num_threads(args.threads)
    chosen = [c for c in cases(args.quick) if args.only is None or c.video == (args.only == "video")]
    results: dict[tuple[str, str, str], Runs] = {}
    notes: dict[str, None] = {}  # in order, each once
    for key in args.links:
        measured = measure_link(LINKS[key], chosen, args, notes)
        results.update({(key, *k): v for k, v in measured.items()})

    rows = []
    for case in chosen:
        for key in args.links:
            link = LINKS[key]
            raw = results.get((key, case.name, RAW.label))
            for variant in case.variants:
                runs = results.get((key, case.name, variant.label))
                if runs is None:
                    continue
                time_s, floor = median(runs.seconds), floor_seconds(link, runs)
                rows.append([
                    case.name, link.name, variant.label, ", ".join(f"{f} {n}/{len(runs.seconds)}" for f, n in runs.forms.items()),
                    f"{mib(runs.up):.2f}", f"{mib(runs.down):.2f}", time_s,
                    f"{time_s / median(raw.seconds):.3f}" if raw else "-",
                    f"{floor:.3f}" if floor else "-", f"{time_s / floor:.2f}" if floor else "-",
                    runs.max_error, f"{runs.psnr:.1f}", " ".join(f"{t:.2f}" for t in runs.seconds),
                ])  # fmt: skip
    table = markdown_table(
        [
            "content",
            "link",
            "variant",
            "form (runs)",
            "MiB up",
            "MiB down",
            "time s (median)",
            "x raw",
            "link floor s",
            "x floor",
            "max error",
            "PSNR dB",
            "runs (s)",
        ],  # fmt: skip
        rows,
    )
    table += ["", *verdicts(results, chosen, args.links)]
    text = (
        f"Server: bench.serve with photo-standin (sd15) and wan-standin (wan21), {args.dtype} on CPU, {args.threads} "
        f"torch threads. Client: nodes.operations.decode_latent, preset auto, default chunking and parallelism. Median of "
        f"{args.repeats} runs per variant after one warm-up each, variants interleaved (rotated order); max error "
        "and PSNR against remote_vae/testing/natural.py's exact pixels, from the warm-up and the last run. Bytes are HTTP bodies "
        "(Transfer.bytes_sent/received); the floor is (up + down) / rate + RTT. " + " ".join(notes)
    )
    text += f" ({revision()})"
    if args.quick:
        text += " QUICK smoke run (--quick): not a measurement."
    record("Links: raw vs compressed decode of natural pixels over three links (bench/links.py)", table, text)


def verdicts(results: dict, chosen: list[Case], links: list[str]) -> list[str]:
    """One line per issue-12 target this run measured (what is missing says so)."""

    def seconds(key: str, case: Case, variant: Variant) -> float | None:
        runs = results.get((key, case.name, variant.label))
        return median(runs.seconds) if runs else None

    def line(target: str, value: float | None, bound: float, extra: str = "", ok: bool = True) -> str:
        if value is None:
            return f"- {target}: not measured in this run."
        met = value <= bound and ok
        return f"- {target}: {value:.3f}{extra} -> {'met' if met else 'NOT met'}."

    def ratio(key: str, case: Case, variant: Variant, over: Variant) -> float | None:
        a, b = seconds(key, case, variant), seconds(key, case, over)
        return a / b if a is not None and b else None

    def to_floor(key: str, case: Case, variant: Variant) -> float | None:
        runs = results.get((key, case.name, variant.label))
        floor = floor_seconds(LINKS[key], runs) if runs else None
        return median(runs.seconds) / floor if runs and floor else None

    lines = ["Verdicts (issue 12):"]
    for case in chosen:
        if not case.video:
            lines.append(
                line(f"{case.name}, auto / raw at 100 Mbit/s <= 0.6", ratio("100m", case, AUTO, RAW), 0.6)
            )
            for key in ("loopback", "1g"):
                lines.append(
                    line(
                        f"{case.name}, auto / raw on {LINKS[key].name} <= 1.05",
                        ratio(key, case, AUTO, RAW),
                        1.05,
                    )
                )
            continue
        lines.append(
            line(
                f"{case.name}, lossless (jxl) / raw at 100 Mbit/s <= 0.5", ratio("100m", case, JXL, RAW), 0.5
            )
        )
        lines.append(
            line(
                f"{case.name}, lossless (auto) / raw at 100 Mbit/s <= 0.5",
                ratio("100m", case, AUTO, RAW),
                0.5,
            )
        )
        near = results.get(("100m", case.name, NEAR.label))
        bound = f" (PSNR {near.psnr:.1f} dB >= 45, max error {near.max_error} <= 8)" if near else ""
        good = near is not None and near.psnr >= 45 and near.max_error <= 8
        lines.append(
            line(
                f"{case.name}, near-lossless / raw at 100 Mbit/s <= 0.15",
                ratio("100m", case, NEAR, RAW),
                0.15,
                bound,
                good,
            )
        )
        lines.append(
            line(f"{case.name}, raw / link floor at 100 Mbit/s <= 1.1", to_floor("100m", case, RAW), 1.1)
        )
        lines.append(
            line(f"{case.name}, raw / link floor at 1 Gbit/s <= 1.5", to_floor("1g", case, RAW), 1.5)
        )
    lossless = [
        f"{link} {case} {label}"
        for (link, case, label), runs in results.items()
        if label != NEAR.label and runs.max_error
    ]
    lines.append(
        "- lossless variants byte-identical to the exact pixels: "
        + ("yes" if not lossless else f"NO ({', '.join(lossless)})")
        + "."
    )
    return lines


if __name__ == "__main__":
    main()
