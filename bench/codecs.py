"""What lossless (and near-lossless) codecs cost on natural pixels: `python -m bench.codecs [--quick]`.

For JPEG XL lossless at effort 1 (what the server's `jxl` sends), WebP lossless (method 0), QOI, PNG
(level 1) and the server's near-lossless H.264 RGB (`frames.near_lossless_encode`, its error check
included: what `h264rgb` costs the server), on remote_vae/testing/natural.py's photographs (4 x 1024x1024) and
pan-and-zoom clip (81 x 480x832): the bytes against raw uint8, CPU milliseconds per megapixel on each
side with one thread (median of the runs), and the wall time per megapixel with the frames spread over
`--threads` threads as the server and the client do it. Lossless rows are checked to decode to the same
bytes; the near-lossless row gives its PSNR and largest error.

Then the break-even link speed of the node's `auto` rule (remote/link.py): below it, jxl arrives sooner
than raw uint8; with the rule's defaults and with the figures measured here, for one 1024x1024 image, a
batch of 4 and the clip.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from remote_vae.remote import frames
from remote_vae.testing import natural

from .common import QUICK_NATURAL_HELP, median, natural_shapes, record_as_module, revision
from .results import markdown_table, record

MEGA = 1e6


@dataclass(frozen=True)
class Codec:
    """One codec: how it encodes a group of frames and decodes it back into place."""

    name: str
    encode: Callable[[np.ndarray], bytes]
    decode_into: Callable[[bytes, np.ndarray], None]
    group: int = 1  # frames per encoded unit (a record)
    lossless: bool = True


def _imagecodecs() -> list[Codec]:
    import imagecodecs as ic

    def single(encode: Callable[[np.ndarray], bytes], decode: Callable[[bytes], np.ndarray]) -> tuple:
        def put(payload: bytes, out: np.ndarray) -> None:
            out[0] = decode(payload)

        return lambda f: encode(np.ascontiguousarray(f[0])), put

    return [
        Codec(
            "jxl (effort 1)", lambda f: frames.encode("jxl", f), lambda p, o: frames.decode_into("jxl", p, o)
        ),
        Codec(
            "WebP lossless (method 0)",
            *single(lambda a: ic.webp_encode(a, lossless=True, method=0), ic.webp_decode),
        ),
        Codec("QOI", *single(ic.qoi_encode, ic.qoi_decode)),
        Codec("PNG (level 1)", *single(lambda a: ic.png_encode(a, level=1), ic.png_decode)),
    ]


NEAR_LOSSLESS = Codec(
    "h264rgb near-lossless (incl. its check)",
    lambda f: frames.near_lossless_encode(f),
    lambda p, o: frames.decode_into("h264rgb", p, o),
    group=frames.H264_FRAMES_PER_RECORD,
    lossless=False,
)


@dataclass
class Measured:
    ratio: float
    encode_ms: float  # CPU ms per megapixel, one thread
    decode_ms: float
    encode_wall_ms: float  # wall ms per megapixel with the groups on `threads` threads
    decode_wall_ms: float
    max_error: int
    psnr: float


def measure(codec: Codec, pixels: np.ndarray, threads: int, repeats: int) -> Measured:
    groups = [pixels[i : i + codec.group] for i in range(0, len(pixels), codec.group)]
    megapixels = pixels.shape[0] * pixels.shape[1] * pixels.shape[2] / MEGA
    out = np.empty_like(pixels)
    outs = [out[i : i + codec.group] for i in range(0, len(pixels), codec.group)]
    encode_cpu, decode_cpu, encode_wall, decode_wall = [], [], [], []
    payloads: list[bytes] = []
    codec.decode_into(codec.encode(groups[0]), outs[0])  # warm-up: the library's first call sets itself up
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            started = time.process_time()
            payloads = [codec.encode(g) for g in groups]
            encode_cpu.append(time.process_time() - started)
            started = time.process_time()
            for payload, o in zip(payloads, outs):
                codec.decode_into(payload, o)
            decode_cpu.append(time.process_time() - started)
            started = time.perf_counter()
            payloads = list(pool.map(codec.encode, groups))
            encode_wall.append(time.perf_counter() - started)
            started = time.perf_counter()
            list(pool.map(codec.decode_into, payloads, outs))
            decode_wall.append(time.perf_counter() - started)
    error = frames.max_error(out, pixels)
    if codec.lossless and error:
        raise SystemExit(f"{codec.name} did not round-trip losslessly: largest error {error}")

    def per_mp(values: list[float]) -> float:
        return median(values) / megapixels * 1000

    return Measured(
        ratio=sum(map(len, payloads)) / pixels.nbytes,
        encode_ms=per_mp(encode_cpu),
        decode_ms=per_mp(decode_cpu),
        encode_wall_ms=per_mp(encode_wall),
        decode_wall_ms=per_mp(decode_wall),
        max_error=error,
        psnr=natural.psnr(out, pixels),
    )


# --------------------------------------------------------------------------- the auto rule's break-even


@dataclass(frozen=True)
class Figures:
    """What the link rule knows of compression (per megapixel, seconds; threads on each side)."""

    ratio: float
    encode_per_mp: float
    encode_threads: int
    decode_per_mp: float
    decode_threads: int


def rule_defaults() -> tuple[Figures, float, str]:
    """The rule's own defaults and margin: remote/link.py's, or i12-design.md's figures before it exists."""
    try:
        from remote_vae.remote import link
        from remote_vae.remote.receiving import decode_threads
    except ImportError:
        cores = max(1, min(4, os.cpu_count() or 1))
        return Figures(0.3, 0.005, 1, 0.025, cores), 0.85, "design figures (remote/link.py not here yet)"
    defaults = Figures(link.DEFAULT_RATIO, link.DEFAULT_ENCODE, 1, link.DEFAULT_DECODE, decode_threads())
    return defaults, link.MARGIN, "remote/link.py"


def compressed_seconds(f: Figures, shape: tuple[int, int, int], rate: float) -> float:
    """The rule's estimate for `shape` (frames, height, width) at `rate` bytes/s (remote/link.py's when it
    is there): the slowest stage plus one frame's worth of all stages when frames pipeline, their sum for
    a single frame."""
    try:
        from remote_vae.remote import link
    except ImportError:
        n_frames, height, width = shape
        megapixels = n_frames * height * width / MEGA
        stages = (
            n_frames * height * width * 3 * f.ratio / rate,
            megapixels * f.encode_per_mp / f.encode_threads,
            megapixels * f.decode_per_mp / f.decode_threads,
        )
        return max(stages) + sum(stages) / n_frames if n_frames > 1 else sum(stages)
    estimate = link.Estimate(rate, f.ratio, f.encode_per_mp, f.encode_threads, f.decode_per_mp)
    return link.compressed_seconds(estimate, link.Job(*shape), f.decode_threads)


def break_even_mbit(f: Figures, margin: float, shape: tuple[int, int, int]) -> float:
    """The link speed (Mbit/s) below which the rule compresses `shape` (0: never; it rises with the rate)."""
    raw_bytes = shape[0] * shape[1] * shape[2] * 3

    def compress(rate: float) -> bool:
        return compressed_seconds(f, shape, rate) < margin * raw_bytes / rate

    low, high = 1e3, 1e12  # bytes per second
    if not compress(low):
        return 0.0
    if compress(high):
        return float("inf")
    for _ in range(100):
        mid = (low * high) ** 0.5
        low, high = (mid, high) if compress(mid) else (low, mid)
    return low * 8 / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per codec and content (median; default 3)"
    )
    parser.add_argument(
        "--threads", type=int, default=min(4, os.cpu_count() or 1), help="threads for the wall rows"
    )
    parser.add_argument("--quick", action="store_true", help=QUICK_NATURAL_HELP)
    args = parser.parse_args()
    record_as_module("bench.codecs")
    if args.quick:
        args.repeats = 1
    photos, clip_shape = natural_shapes(args.quick)
    images, clip = natural.photos(*photos), natural.clip(*clip_shape)
    contents = {f"{len(images)} photos {images.shape[1]}x{images.shape[2]}": images}
    contents[f"clip {len(clip)}x{clip.shape[1]}x{clip.shape[2]}"] = clip
    rows, jxl = [], {}
    for codec in [*_imagecodecs(), NEAR_LOSSLESS]:
        for what, pixels in contents.items():
            m = measure(codec, pixels, args.threads, args.repeats)
            print(f"{codec.name} on {what}: {m.ratio:.3f}x raw", flush=True)
            if codec.name.startswith("jxl"):
                jxl[what] = m
            error = "lossless" if codec.lossless else f"{m.max_error} / {m.psnr:.1f} dB"
            rows.append(
                [
                    codec.name,
                    what,
                    f"{m.ratio:.3f}",
                    f"{m.encode_ms:.1f}",
                    f"{m.decode_ms:.1f}",
                    f"{m.encode_wall_ms:.1f}",
                    f"{m.decode_wall_ms:.1f}",
                    error,
                ]  # fmt: skip
            )
    table = markdown_table(
        [
            "codec",
            "content",
            "bytes / raw",
            "encode CPU ms/MP (1 thread)",
            "decode CPU ms/MP (1 thread)",
            f"encode wall ms/MP ({args.threads} threads)",
            f"decode wall ms/MP ({args.threads} threads)",
            "max error / PSNR",
        ],  # fmt: skip
        rows,
    )
    table += ["", *break_even_lines(jxl, args.threads)]
    notes = (
        "Photographs and clip from remote_vae/testing/natural.py (scikit-image's bundled photos, upscaled to 1024x1024; a "
        "bicubic pan and zoom over its retina photo). CPU ms is process CPU time of one thread doing every frame "
        "in turn (median of the runs); the wall columns spread frames (jxl, WebP, QOI, PNG) or 16-frame records "
        "(h264rgb) over a thread pool, each codec call single-threaded, as the server and the client do. "
        "h264rgb's encode includes the server's check (x264's own reconstruction compared with the frames) "
        "and any re-encode at a lower qp."
    )
    notes += f" ({revision()})"
    if args.quick:
        notes += " QUICK smoke run (--quick): not a measurement."
    record(
        "Codecs: bytes and CPU per megapixel on natural pixels, auto's break-even (bench/codecs.py)",
        table,
        notes,
    )


def break_even_lines(jxl: dict[str, Measured], threads: int) -> list[str]:
    """The auto rule's break-even link speeds, with its defaults and with the jxl figures measured here."""
    defaults, margin, source = rule_defaults()
    measured = [
        Figures(m.ratio, m.encode_ms / 1000, threads, m.decode_ms / 1000, defaults.decode_threads)
        for m in jxl.values()
    ]
    jobs = {
        "one 1024x1024 image": (1, 1024, 1024),
        "4 x 1024x1024": (4, 1024, 1024),
        "clip 81x480x832": (81, 480, 832),
    }
    lines = [
        f"Break-even of `auto` ({source}: compress when the estimate < {margin} x raw; client decode threads "
        f"{defaults.decode_threads}): jxl is chosen below these link speeds (Mbit/s).",
        "",
    ]
    header = ["job", "rule defaults"] + [f"measured on {what}" for what in jxl]
    rows = [
        [job] + [f"{break_even_mbit(f, margin, shape):.0f}" for f in (defaults, *measured)]
        for job, shape in jobs.items()
    ]
    lines += markdown_table(header, rows)
    lines.append("")
    lines.append(
        f"Rule defaults: ratio {defaults.ratio}, server encode {defaults.encode_per_mp * 1000:g} ms/MP on "
        f"{defaults.encode_threads} thread, client decode {defaults.decode_per_mp * 1000:g} ms/MP per thread. "
        f"Measured columns: this run's jxl ratio and one-thread CPU ms/MP, encoding on {threads} server threads."
    )
    return lines


if __name__ == "__main__":
    main()
