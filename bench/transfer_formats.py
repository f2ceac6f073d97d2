"""Bytes, CPU time and error of each way to ship decoded pixels: `python -m bench.transfer_formats [--quick]`.

For a 1024x1024 SD decode and a 61-frame 320x512 HunyuanVideo decode, each output format is requested from
a server on 127.0.0.1 and turned into ComfyUI IMAGE pixels on the client. Per format: request and response
body bytes, wall time, client CPU (request, receive, convert to pixels), server CPU (decode + convert +
send; the decode is the same in every row, see the 'decode alone' row), and the error against a
ComfyUI-style float32 decode of the same weights in this process, in 0..255 units (max abs, PSNR).
Formats the server does not offer are encoded and decoded here, on the same pixels, and labelled
'in-process'. Target (issue #5): uint8 (our default) moves <= half the bytes of float16 raw with max
error <= 1/255.
"""

from __future__ import annotations

import argparse
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from remote_vae.remote import client, protocol

from .common import Server, default_threads, median, metric_total, metrics, mib, record_as_module, revision
from .models import build, comfy_decode
from .results import markdown_table, record

SD_LATENT = (1, 4, 128, 128)  # 1024x1024
VIDEO_LATENT = (1, 16, 16, 40, 64)  # 61 frames of 320x512
JPEG_QUALITY = 95


@dataclass
class Row:
    name: str
    where: str
    sent: int
    received: int
    wall: float
    client_cpu: float
    server_cpu: float
    max_err: float
    psnr: float
    render: float | None = None  # seconds the server spent converting the output (or encoding it here)

    def cells(self, fp16_bytes: int) -> list[object]:
        render = "-" if self.render is None else f"{self.render * 1000:.0f}"
        if not self.received:  # the decode-alone row: no transfer, no error
            return [self.name, self.where, "-", "-", "-", self.wall, "-", self.server_cpu, render, "-", "-"]
        return [
            self.name,
            self.where,
            f"{mib(self.sent):.2f}",
            f"{mib(self.received):.2f}",
            f"{self.received / fp16_bytes:.3f}",
            self.wall,
            self.client_cpu,
            self.server_cpu,
            render,
            f"{self.max_err:.3f}",
            "inf" if math.isinf(self.psnr) else f"{self.psnr:.1f}",
        ]


def errors(pixels: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max abs error, PSNR in dB) in 0..255 units of float pixels in [0,1] against the reference."""
    diff = (pixels.float() - reference) * 255.0
    mse = float((diff**2).mean())
    return float(diff.abs().max()), (math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse))


# --------------------------------------------------------------------------- client-side conversions


def from_raw(reply: client.Reply) -> torch.Tensor:
    x = torch.clamp((reply.tensor().float() + 1.0) / 2.0, 0.0, 1.0)
    if x.ndim == 5:
        return x.permute(0, 2, 3, 4, 1).reshape(-1, x.shape[3], x.shape[4], 3)
    return x.movedim(1, -1)


def from_uint8(reply: client.Reply) -> torch.Tensor:
    return reply.tensor().float() / 255.0


def from_image_file(body: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(body)) as image:
        pixels = np.asarray(image.convert("RGB"))
    return torch.from_numpy(pixels.copy()).float().div_(255.0).unsqueeze(0)


def from_mp4(body: bytes) -> torch.Tensor:
    import av

    with av.open(io.BytesIO(body)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    return torch.from_numpy(np.stack(frames)).float().div_(255.0)


# --------------------------------------------------------------------------- in-process formats


def encode_file(frame: np.ndarray, fmt: str) -> bytes:
    """One HxWx3 uint8 frame with the settings the server uses (PNG level 1, JPEG 4:4:4 at q>=90)."""
    buffer = io.BytesIO()
    image = Image.fromarray(frame)
    if fmt == "png":
        image.save(buffer, format="PNG", compress_level=1)
    elif fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    else:  # WebP lossless at its fastest method, the cheap lossless option (performance.md 2.4)
        image.save(buffer, format="WEBP", lossless=True, method=0)
    return buffer.getvalue()


def in_process(
    name: str, fmt: str, uint8: np.ndarray, reference: torch.Tensor, latent_bytes: int, repeats: int
) -> Row:
    """Encode every frame (counted as server CPU) and decode it again (client CPU), on this process."""
    enc_cpu, dec_cpu, walls, encode_walls = [], [], [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        files = [encode_file(frame, fmt) for frame in uint8]
        c1, w1 = time.process_time(), time.perf_counter()
        pixels = torch.cat([from_image_file(f) for f in files])
        c2, w2 = time.process_time(), time.perf_counter()
        enc_cpu.append(c1 - c0)
        dec_cpu.append(c2 - c1)
        walls.append(w2 - w0)
        encode_walls.append(w1 - w0)
    max_err, psnr = errors(pixels, reference)
    size = sum(len(f) for f in files)
    return Row(
        name,
        "in-process",
        latent_bytes,
        size,
        median(walls),
        median(dec_cpu),
        median(enc_cpu),
        max_err,
        psnr,
        median(encode_walls),
    )


# --------------------------------------------------------------------------- through the server


def over_http(
    name: str,
    server: Server,
    url: str,
    wire: protocol.WireRequest,
    convert: Callable[[client.Reply], torch.Tensor],
    reference: torch.Tensor,
    repeats: int,
) -> Row:
    walls, client_cpu, server_cpu = [], [], []
    before = metrics(server.url)
    for _ in range(repeats):
        s0, c0, w0 = server.cpu_seconds(), time.process_time(), time.perf_counter()
        reply = client.send(url, wire, retries=0, timeout=(10.0, 900.0))
        pixels = convert(reply)
        w1, c1, s1 = time.perf_counter(), time.process_time(), server.cpu_seconds()
        walls.append(w1 - w0)
        client_cpu.append(c1 - c0)
        server_cpu.append(s1 - s0)
    after = metrics(server.url)
    count = metric_total(after, "remote_vae_request_seconds_count") - metric_total(
        before, "remote_vae_request_seconds_count"
    )
    spent = metric_total(after, "remote_vae_render_seconds_sum") - metric_total(
        before, "remote_vae_render_seconds_sum"
    )
    max_err, psnr = errors(pixels, reference)
    return Row(
        name,
        "server",
        len(wire.body),
        len(reply.body),
        median(walls),
        median(client_cpu),
        median(server_cpu),
        max_err,
        psnr,
        spent / count if after is not None and count > 0 else None,
    )


def decode_alone(model: torch.nn.Module, z: torch.Tensor, repeats: int) -> Row:
    walls, cpus = [], []
    with torch.inference_mode():
        model.decode(z)  # warm-up
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            model.decode(z)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return Row(
        "decode alone (no transfer)",
        "in-process",
        0,
        0,
        median(walls),
        0.0,
        median(cpus),
        0.0,
        math.inf,
        None,
    )


def measure(
    server: Server, url: str, model: torch.nn.Module, z: torch.Tensor, video: bool, repeats: int
) -> list[Row]:
    reference = comfy_decode(model, z)
    uint8 = (reference * 255.0).round().to(torch.uint8).numpy()
    latent_bytes = z.numel() * z.element_size()
    frames, height, width = reference.shape[0], reference.shape[1], reference.shape[2]
    size = {} if video else {"height": height, "width": width}  # the peer sends height/width for images
    raw16 = protocol.build_decode_request(z, output_type="pt", do_scaling=False, **size)
    client.send(
        url, raw16, retries=0, timeout=(10.0, 900.0)
    )  # warm-up: connection, the server's first decode
    rows = [
        decode_alone(model, z, repeats),
        over_http(
            "float16 raw (the HFRemoteVae peer's request)", server, url, raw16, from_raw, reference, repeats
        ),
        over_http(
            "float32 raw (output_dtype=float32; transfer exact)",
            server,
            url,
            protocol.build_decode_request(
                z, output_type="pt", do_scaling=False, extensions=protocol.Extensions(output_dtype="float32")
            ),
            from_raw,
            reference,
            repeats,
        ),
        over_http(
            "uint8 raw (partial_postprocess; transfer lossless, our default)",
            server,
            url,
            protocol.build_decode_request(z, output_type="pt", partial_postprocess=True, do_scaling=False),
            from_uint8,
            reference,
            repeats,
        ),
    ]
    if video:
        rows.append(in_process("PNG level 1, per frame", "png", uint8, reference, latent_bytes, repeats))
        rows.append(
            in_process(
                f"JPEG q{JPEG_QUALITY} 4:4:4, per frame", "jpeg", uint8, reference, latent_bytes, repeats
            )
        )
        rows.append(
            in_process("WebP lossless m0, per frame", "webp", uint8, reference, latent_bytes, repeats)
        )
        rows.append(
            over_http(
                "mp4 (H.264 yuv420p, libx264 defaults)",
                server,
                url,
                protocol.build_decode_request(z, output_type="mp4", do_scaling=False),
                lambda r: from_mp4(r.body),
                reference,
                repeats,
            )
        )
    else:
        rows.append(
            over_http(
                "PNG level 1 (output_type=pil, image_format=png)",
                server,
                url,
                protocol.build_decode_request(z, output_type="pil", image_format="png", do_scaling=False),
                lambda r: from_image_file(r.body),
                reference,
                repeats,
            )
        )
        rows.append(
            over_http(
                f"JPEG q{JPEG_QUALITY} 4:4:4 (pil/jpg, jpeg_quality; transfer compact)",
                server,
                url,
                protocol.build_decode_request(
                    z,
                    output_type="pil",
                    do_scaling=False,
                    extensions=protocol.Extensions(jpeg_quality=JPEG_QUALITY),
                ),
                lambda r: from_image_file(r.body),
                reference,
                repeats,
            )
        )
        rows.append(in_process("WebP lossless m0", "webp", uint8, reference, latent_bytes, repeats))
    print(f"{'video' if video else 'image'}: {frames} x {height}x{width} done", flush=True)
    return rows


def target_line(rows: list[Row]) -> str:
    fp16 = next(r for r in rows if r.name.startswith("float16"))
    u8 = next(r for r in rows if r.name.startswith("uint8"))
    ok = u8.received <= fp16.received / 2 and u8.max_err <= 1.0
    return (
        f"uint8 / float16 bytes = {u8.received / fp16.received:.3f} (target <= 0.5), max error "
        f"{u8.max_err:.3f}/255 (target <= 1): {'met' if ok else 'NOT met'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="requests per format (median; default 5)")
    parser.add_argument(
        "--threads", type=int, default=default_threads(), help="torch threads, both processes"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 256x256 image, 13 frames of 64x64, 1 repeat"
    )
    args = parser.parse_args()
    record_as_module("bench.transfer_formats")
    sd_shape, video_shape = (
        (SD_LATENT, VIDEO_LATENT) if not args.quick else ((1, 4, 32, 32), (1, 16, 4, 8, 8))
    )
    repeats = 1 if args.quick else args.repeats

    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    sd_z, video_z = torch.randn(sd_shape, generator=generator), torch.randn(video_shape, generator=generator)
    sd_model, video_model = build("sd-small", seed=0), build("hv-standin", seed=0)
    with Server(["sd=sd15:sd-small", "hv=hunyuan_video:hv-standin"], threads=args.threads) as server:
        image_rows = measure(server, f"{server.url}/sd", sd_model, sd_z, video=False, repeats=repeats)
        video_rows = measure(server, f"{server.url}/hv", video_model, video_z, video=True, repeats=repeats)

    header = [
        "format",
        "where",
        "sent MiB",
        "received MiB",
        "received / float16",
        "wall s",
        "client CPU s",
        "server CPU s",
        "server render ms",
        "max err 0..255",
        "PSNR dB",
    ]
    table = [
        f"**Image: {sd_shape[2] * 8}x{sd_shape[3] * 8}, SD VAE (sd-small), latent {list(sd_shape)} float32**",
        "",
    ]
    fp16 = next(r for r in image_rows if r.name.startswith("float16")).received
    table += markdown_table(header, [r.cells(fp16) for r in image_rows])
    table += ["", target_line(image_rows), ""]
    frames = 4 * (video_shape[2] - 1) + 1
    table += [
        f"**Video: {frames} frames of {video_shape[3] * 8}x{video_shape[4] * 8}, HunyuanVideo preset "
        f"(hv-standin), latent {list(video_shape)} float32**",
        "",
    ]
    fp16 = next(r for r in video_rows if r.name.startswith("float16")).received
    table += markdown_table(header, [r.cells(fp16) for r in video_rows])
    table += ["", target_line(video_rows)]
    notes = (
        f"{args.threads} torch threads in both processes, median of {repeats} requests per row. Server CPU is the server "
        "process's user+system time across the request (10 ms resolution) and includes the decode; the 'decode alone' "
        "row is that decode's cost in this process. Server render is the format's own cost: the server's "
        "remote_vae_render_seconds per request from /metrics (output conversion and encoding, after the decode). 'in-process' rows: the server does not offer the format for this "
        "output, so the uint8 pixels are encoded (counted as server CPU) and decoded (client CPU) here. Errors are "
        "against a float32 ComfyUI-style decode of the same weights; the content is random-weight decoder output "
        "(image) and a smooth stand-in (video, see bench/models.py), so lossy-format errors are indicative only."
    )
    notes += f" ({revision()})"
    if args.quick:
        notes += " QUICK smoke run (--quick): not a measurement."
    record(
        "Transfer formats: bytes, CPU and error per output format (bench/transfer_formats.py)", table, notes
    )


if __name__ == "__main__":
    main()
