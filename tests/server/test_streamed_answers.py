"""uint8 decode answers streamed as they are rendered, through the real server over HTTP: the same bytes
as a whole body, and what a client sees when an answer fails, runs out of time or is left mid-stream."""

import asyncio
import logging
import pickle
import threading
import time
from urllib.parse import urlencode

import numpy as np
import pytest
import requests
import torch

from remote_vae.local_server import answers, postprocess
from remote_vae.local_server.app import Settings
from remote_vae.local_server.limits import Limits
from remote_vae.remote import frames, protocol
from remote_vae.remote.frames import FramesError
from remote_vae.remote.presets import PRESETS
from support.photos import PhotoVAE, hosting_photos, pan_clip, photos, uint8_decode
from support.raw_http import RawAnswer, connect, request_head

SD15, WAN = PRESETS["sd15"], PRESETS["wan21"]


def whole_body(vae: PhotoVAE, latent: torch.Tensor) -> bytes:
    """Today's answer: the model's output rendered at once (float16, as the job hands it over)."""
    with torch.inference_mode():
        return postprocess.uint8_reference(vae.decode(latent).sample.half()).numpy().tobytes()


@pytest.mark.parametrize(
    ("vae", "preset", "latent"),
    [
        (PhotoVAE(pan_clip(1, 640, 640)), SD15, torch.zeros(1, 4, 80, 80)),  # bands of rows
        (PhotoVAE(photos(256, 320)), SD15, torch.zeros(4, 4, 32, 40)),  # bands of whole images
        (PhotoVAE(pan_clip(17, 96, 160)), WAN, torch.zeros(3, 16, 5, 12, 20)),  # bands spanning videos
    ],
    ids=["one-large-image", "batch", "videos"],
)
def test_raw_answer_is_todays_body_byte_for_byte(vae, preset, latent):
    with hosting_photos(vae, preset) as url:
        response = uint8_decode(url, preset.name, latent)
    expected = whole_body(vae, latent)
    assert response.status_code == 200 and response.content == expected
    count = len(expected) // (3 * vae.scale**2 * latent.shape[-2] * latent.shape[-1])
    assert response.headers["content-length"] == str(len(expected))
    assert (response.headers["content-type"], response.headers["dtype"]) == ("tensor/binary", "uint8")
    assert response.headers["shape"] == f"[{count},{latent.shape[-2] * 8},{latent.shape[-1] * 8},3]"


def test_bands_cover_the_answer_in_wire_order():
    assert list(answers.raw_bands((1, 640, 640, 3))) == [(0, 1, slice(0, 320)), (0, 1, slice(320, 640))]
    assert list(answers.raw_bands((2, 1024, 1024, 3)))[:4] == [  # 3 MiB frames: thirds, no sliver of a row
        (0, 1, slice(0, 341)),
        (0, 1, slice(341, 682)),
        (0, 1, slice(682, 1024)),
        (1, 1, slice(0, 341)),
    ]
    assert list(answers.raw_bands((51, 96, 160, 3))) == [
        (0, 22, slice(None)),
        (22, 22, slice(None)),
        (44, 7, slice(None)),
    ]
    assert list(frames.record_spans(3, "jxl", threads=2)) == [(0, 1), (1, 1), (2, 1)]


def test_h264_records_are_balanced_over_the_encoding_threads():
    def sizes(count: int, threads: int) -> list[int]:
        spans = list(frames.record_spans(count, "h264rgb", threads))
        assert [first for first, _ in spans] == [sum(n for _, n in spans[:i]) for i in range(len(spans))]
        return [n for _, n in spans]

    assert sizes(17, 1) == [9, 8]  # at most 16 a record, not 16 then 1
    assert sizes(81, 1) == [14, 14, 14, 13, 13, 13]
    assert sizes(81, 2) == [14, 14, 14, 13, 13, 13]  # 3 rounds of 2, none idle
    assert sizes(33, 2) == [9, 8, 8, 8]  # 3 records would leave a thread idle in the 2nd round
    assert sizes(81, 16) == [8] * 4 + [7] * 7  # more threads than 8-frame records: one per 8 frames
    assert sizes(16, 4) == [8, 8]
    assert sizes(5, 2) == [5]
    assert sizes(0, 2) == []


def uint8_request(latent: torch.Tensor, codec: str | None = None) -> protocol.WireRequest:
    extensions = protocol.Extensions(codec=codec)
    return protocol.build_decode_request(
        latent, output_type="pt", partial_postprocess=True, do_scaling=False, extensions=extensions
    )


def streamed(url: str, model: str, latent: torch.Tensor, codec: str | None = None) -> requests.Response:
    """A uint8 decode whose body is read as it arrives."""
    wire = uint8_request(latent, codec)
    return requests.post(
        f"{url}/{model}", params=wire.params, headers=wire.headers, data=wire.body, stream=True, timeout=30
    )


def received(response: requests.Response) -> bytes:
    """What arrived of a body the server cut short (reading it must fail)."""
    body = bytearray()
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for chunk in response.iter_content(1 << 16):
            body += chunk
    return bytes(body)


def frames_received(response: requests.Response) -> frames.RecordReader:
    """A compressed answer cut short, fed to the client's reader."""
    shape = protocol.parse_shape_header(response.headers["shape"])
    reader = frames.RecordReader(shape[0], frames.max_payload(*shape[1:3]))
    list(reader.feed(received(response)))
    return reader


def render_failing_at(first: int, top: int | None = None):
    """Pixels.render, raising for the piece that starts at frame `first` (and row `top`)."""
    original = answers.Pixels.render

    def render(pixels, start, count, rows=slice(None)):
        if start == first and rows.start == top:
            raise RuntimeError("render exploded")
        return original(pixels, start, count, rows)

    return render


def until_closed(url: str, model: str, latent: torch.Tensor) -> RawAnswer:
    """A uint8 decode over a bare socket, read until the server closes it: every byte it sent (an HTTP
    library drops the last partial read of a short body)."""
    wire = uint8_request(latent)
    sock = connect(url)
    head = request_head(
        "POST", f"/{model}?{urlencode(wire.params)}", {**wire.headers, "Content-Length": str(len(wire.body))}
    )
    sock.sendall(head + wire.body)
    data = bytearray()
    while chunk := sock.recv(1 << 16):
        data += chunk
    sock.close()
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status_line, *fields = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (f.partition(":") for f in fields)}
    return RawAnswer(int(status_line.split()[1]), headers, body)


def test_raw_answer_failing_mid_stream_is_a_short_body(monkeypatch, caplog):
    monkeypatch.setattr(answers.Pixels, "render", render_failing_at(0, top=320))  # the second band
    with hosting_photos(PhotoVAE(pan_clip(1, 640, 640)), SD15) as url, caplog.at_level(logging.ERROR):
        answer = until_closed(url, "sd15", torch.zeros(1, 4, 80, 80))
        assert requests.get(url + "/health", timeout=10).status_code == 200
    assert answer.status == 200  # sent before the failure
    assert len(answer.body) == 320 * 640 * 3 < int(answer.headers["content-length"]) == 640 * 640 * 3
    with pytest.raises(protocol.ProtocolError, match=r"^body has 614400 bytes but shape \[1, 640, 640, 3\]"):
        protocol.parse_tensor_response(answer.body, answer.headers)
    assert "connection aborted" in caplog.text and "render exploded" in caplog.text


def test_compressed_answer_failing_mid_stream_has_no_end_record(monkeypatch, caplog):
    monkeypatch.setattr(answers.Pixels, "render", render_failing_at(2))
    with hosting_photos(PhotoVAE(pan_clip(9, 96, 160)), WAN) as url, caplog.at_level(logging.ERROR):
        response = streamed(url, "wan21", torch.zeros(1, 16, 3, 12, 20), "jxl")
        reader = frames_received(response)
        metrics = requests.get(url + "/metrics", timeout=10).text
    with pytest.raises(FramesError, match=r"^the body ended after 2 of 9 frames, without its end record$"):
        reader.finish()
    assert "connection aborted" in caplog.text and "render exploded" in caplog.text
    assert (
        'remote_vae_requests_total{model="wan21",op="decode",outcome="server_error",status="500"} 1'
        in metrics
    )


def slow_encode(monkeypatch, seconds: float) -> list[None]:
    """frames.encode taking `seconds` longer; the list grows by one per call."""
    calls, original = [], frames.encode

    def encode(*args, **kwargs):
        calls.append(None)
        time.sleep(seconds)
        return original(*args, **kwargs)

    monkeypatch.setattr(frames, "encode", encode)
    return calls


def test_answer_past_the_deadline_is_cut_short(monkeypatch, caplog):
    slow_encode(monkeypatch, 0.25)
    settings = Settings(limits=Limits(request_timeout=1.0))
    with hosting_photos(PhotoVAE(pan_clip(17, 48, 64)), WAN, settings) as url, caplog.at_level(logging.ERROR):
        reader = frames_received(streamed(url, "wan21", torch.zeros(1, 16, 5, 6, 8), "jxl"))
    with pytest.raises(FramesError, match=r"^the body ended after \d+ of 17 frames, without its end record$"):
        reader.finish()
    assert "the answer took longer than the server's limit of 1 s (--request-timeout)" in caplog.text


def test_a_client_that_leaves_stops_the_encoding(monkeypatch):
    calls = slow_encode(monkeypatch, 0.1)
    with hosting_photos(PhotoVAE(pan_clip(41, 48, 64)), WAN) as url:
        response = streamed(url, "wan21", torch.zeros(1, 16, 11, 6, 8), "jxl")
        assert response.raw.read(4) == frames.MAGIC
        response.close()
        closed = 'remote_vae_requests_total{model="wan21",op="decode",outcome="client_closed",status="499"} 1'
        deadline = time.monotonic() + 10
        while closed not in requests.get(url + "/metrics", timeout=10).text:
            assert time.monotonic() < deadline, "the server did not see the client leave"
            time.sleep(0.05)
        threading.Event().wait(0.5)  # pieces already running finish; no more start
        encoded = len(calls)
        threading.Event().wait(0.3)
    assert encoded == len(calls) < 41


def test_compressed_answers_are_logged_and_counted(caplog):
    with hosting_photos(PhotoVAE(photos(64, 96)), SD15) as url, caplog.at_level(logging.INFO):
        response = uint8_decode(url, "sd15", torch.zeros(2, 4, 8, 12), "jxl")
        metrics = requests.get(url + "/metrics", timeout=10).text
    assert response.status_code == 200 and "codec=jxl encode=" in caplog.text
    assert 'remote_vae_encode_seconds_count{model="sd15",codec="jxl"} 1' in metrics
    assert np.frombuffer(response.content[:4], np.uint8).tobytes() == frames.MAGIC


def test_ray_replicas_send_bodies_ray_can_pickle():
    """Ray Serve pickles a replica's ASGI messages; our bodies are memoryviews until the wrapper."""
    pytest.importorskip("ray")
    from remote_vae.local_server.ray_app import with_header

    sent = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": memoryview(b"pixels"), "more_body": False})

    async def send(message):
        pickle.dumps(message)  # what Ray does with it; a memoryview raises TypeError
        sent.append(message)

    asyncio.run(with_header(app, b"x-remote-vae-replica", b"r1")({"type": "http"}, None, send))
    assert sent[0]["headers"] == [(b"x-remote-vae-replica", b"r1")]
    assert sent[1] == {"type": "http.response.body", "body": b"pixels", "more_body": False}
