"""remote/frames.py: the compressed-frames body, read from hostile bytes as from honest ones."""

import json

import numpy as np
import pytest

from remote_vae.remote import frames
from remote_vae.remote.frames import FramesError, RecordReader
from support import photos

H, W = 24, 40


def pixels(count, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, H, W, 3), dtype=np.uint8)


def body(records, total, stats=None):
    """MAGIC, then each (first, count, payload), then the end record."""
    parts = [frames.MAGIC]
    for first, count, payload in records:
        parts += [frames.record_header(first, count, len(payload)), payload]
    parts.append(frames.end_record(total, stats if stats is not None else {"encode_seconds": 0.5}))
    return b"".join(parts)


def jxl(frame):
    return frames.encode("jxl", frame[None])


def read(data, total=2, chunk=None):
    """Every record of `data` fed in `chunk`-byte pieces (all at once by default), and the stats."""
    reader = RecordReader(total, frames.max_payload(H, W))
    chunk = chunk or len(data) or 1
    records = [r for i in range(0, len(data), chunk) for r in reader.feed(data[i : i + chunk])]
    return records, reader.finish()


def test_records_are_read_byte_by_byte_and_decode_to_the_frames():
    shown = pixels(2)
    records, stats = read(body([(0, 1, jxl(shown[0])), (1, 1, jxl(shown[1]))], 2), chunk=1)
    assert [(r.first, r.count) for r in records] == [(0, 1), (1, 1)]
    assert stats == {"encode_seconds": 0.5}
    out = np.empty_like(shown)
    for record in records:
        frames.decode_into("jxl", record.payload, out[record.first : record.first + record.count])
    assert np.array_equal(out, shown)


def test_bad_magic():
    with pytest.raises(FramesError, match=r"^the body does not start with b'RVF1' but b'RVF2'$"):
        read(b"RVF2" + body([], 0)[4:], total=0)


def test_out_of_order_record():
    data = body([(1, 1, jxl(pixels(1)[0]))], 2)
    with pytest.raises(FramesError, match=r"^a record holds frames 1\.\.1 where frame 0 of 2 was next$"):
        read(data)


def test_record_past_the_declared_frames():
    data = body([(0, 3, b"x")], 3)
    with pytest.raises(FramesError, match=r"^a record holds frames 0\.\.2 where frame 0 of 2 was next$"):
        read(data)


def test_oversize_payload_is_refused_from_its_header_before_it_arrives():
    reader = RecordReader(2, frames.max_payload(H, W))
    limit = frames.max_payload(H, W)
    header = frames.MAGIC + frames.record_header(0, 1, limit + 1)
    with pytest.raises(
        FramesError, match=rf"^a record of 1 frames declares {limit + 1} bytes, more than {limit}$"
    ):
        list(reader.feed(header))


def test_missing_end_record():
    data = body([(0, 1, jxl(pixels(1)[0]))], 2)
    cut = data[: data.rindex(frames.end_record(2, {"encode_seconds": 0.5}))]
    reader = RecordReader(2, frames.max_payload(H, W))
    assert len(list(reader.feed(cut))) == 1
    with pytest.raises(FramesError, match=r"^the body ended after 1 of 2 frames, without its end record$"):
        reader.finish()


def test_end_record_before_every_frame():
    data = body([(0, 1, jxl(pixels(1)[0]))], 1)
    with pytest.raises(FramesError, match=r"^the end record says 1 frames after 1 of the 2 declared$"):
        read(data)


@pytest.mark.parametrize("chunked", [False, True])
def test_trailing_bytes(chunked):
    data = body([(0, 1, jxl(pixels(1)[0]))], 1) + b"junk"
    reader = RecordReader(1, frames.max_payload(H, W))
    with pytest.raises(FramesError, match=r"^4 bytes follow the end record$"):
        if chunked:
            list(reader.feed(data[:-4]))
            list(reader.feed(data[-4:]))
        else:
            list(reader.feed(data))


@pytest.mark.parametrize(
    ("stats", "message"),
    [
        (b"{not json", "the end record's stats are not JSON"),
        (b"[1, 2]", "the end record's stats are not a JSON object"),
        (b"[" * 100000 + b"]" * 100000, "the end record's 200000 bytes of stats exceed 4096"),
    ],
)
def test_bad_stats(stats, message):
    data = frames.MAGIC + frames.record_header(0, 0, len(stats)) + stats
    with pytest.raises(FramesError, match=f"^{message}$"):
        read(data, total=0)


def test_stats_keep_only_numbers():
    stats = json.dumps({"encode_seconds": 1, "codec": "jxl", "flag": True, "render_seconds": 0.25}).encode()
    _, kept = read(frames.MAGIC + frames.record_header(0, 0, len(stats)) + stats, total=0)
    assert kept == {"encode_seconds": 1.0, "render_seconds": 0.25}


@pytest.mark.parametrize("codec", frames.CODECS)
def test_payload_that_does_not_decode(codec):
    out = np.empty((1, H, W, 3), np.uint8)
    with pytest.raises(FramesError, match=rf"^a {codec} record does not decode to 1x{H}x{W}x3 pixels: "):
        frames.decode_into(codec, b"\x00\x01garbage" * 10, out)


def test_jxl_frame_of_another_size():
    other = frames.encode("jxl", np.zeros((1, H + 2, W, 3), np.uint8))
    with pytest.raises(FramesError, match=rf"^a jxl record does not decode to 1x{H}x{W}x3 pixels: "):
        frames.decode_into("jxl", other, np.empty((1, H, W, 3), np.uint8))


def test_h264rgb_frame_of_another_size():
    other = frames.near_lossless_encode(pixels(2)[:, :, : W - 8])
    with pytest.raises(
        FramesError, match=rf"^an h264rgb record holds a {W - 8}x{H} frame #1 where 2x{H}x{W}x3"
    ):
        frames.decode_into("h264rgb", other, np.empty((2, H, W, 3), np.uint8))


def test_h264rgb_record_with_fewer_frames_than_declared():
    payload = frames.near_lossless_encode(pixels(2))
    with pytest.raises(FramesError, match=r"^an h264rgb record holds 2 frames where 3 were declared$"):
        frames.decode_into("h264rgb", payload, np.empty((3, H, W, 3), np.uint8))


def test_h264rgb_record_with_more_frames_than_declared():
    payload = frames.near_lossless_encode(pixels(3))
    with pytest.raises(FramesError, match=rf"^an h264rgb record holds a {W}x{H} frame #3 where 2x{H}x{W}x3"):
        frames.decode_into("h264rgb", payload, np.empty((2, H, W, 3), np.uint8))


def test_near_lossless_falls_back_to_a_lower_quantiser_when_a_record_exceeds_the_bound(monkeypatch):
    """libx264rgb at qp 12 stays within 5/255 even on noise: a coarser first quantiser stands in for
    content it would not hold, and the record comes back from the next one, within the bound."""
    noise = pixels(3, seed=5)
    monkeypatch.setattr(frames, "H264_QP", (36, 8, 0))
    coarse = np.empty_like(noise)
    frames.decode_into("h264rgb", frames._h264_encode(noise, qp=frames.H264_QP[0], threads=1), coarse)
    assert frames.max_error(coarse, noise) > frames.NEAR_LOSSLESS_MAX_ERROR
    payload = frames.near_lossless_encode(noise)
    assert payload == frames._h264_encode(noise, qp=8, threads=1)
    back = np.empty_like(noise)
    frames.decode_into("h264rgb", payload, back)
    assert 0 < frames.max_error(back, noise) <= frames.NEAR_LOSSLESS_MAX_ERROR


@pytest.mark.parametrize("shape", [(3, 24, 40), (2, 17, 33), (5, 64, 96)])
def test_the_encoders_reconstruction_is_what_a_decoder_gives(shape, tmp_path):
    """The check reads x264's own reconstruction instead of decoding: bit for bit what FFmpeg's decoder
    gives back, odd sizes included, on photographs and on noise."""
    count, height, width = shape
    noise = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    for content in (photos.pan_clip(count, height, width), noise):
        dump = str(tmp_path / "recon.gbr")
        payload = frames._h264_encode(content, qp=14, threads=1, dump=dump)
        planes = frames._reconstruction(dump, content.shape)
        assert planes is not None and planes.shape == (count, 3, height, width)
        decoded = np.empty_like(content)
        frames.decode_into("h264rgb", payload, decoded)
        rebuilt = np.stack([planes[:, p] for p in frames.RGB_PLANES], axis=-1)
        assert np.array_equal(rebuilt, decoded)
        assert frames._h264_encode_checked(content, 14, 1) == (payload, frames.max_error(decoded, content))


def test_a_short_reconstruction_is_not_used(tmp_path):
    """A scratch directory that filled up leaves a short file: the record is then decoded instead."""
    short = tmp_path / "short.gbr"
    short.write_bytes(bytes(2 * 3 * H * W - 1))
    assert frames._reconstruction(str(short), (2, H, W, 3)) is None


def test_without_a_usable_scratch_path_the_record_is_decoded(monkeypatch, tmp_path):
    """A path x264's options cannot carry (':' separates them) is never handed to it."""
    odd = tmp_path / "a:b"
    odd.mkdir()
    monkeypatch.setattr(frames, "SCRATCH_DIRS", (str(odd),))
    content = photos.pan_clip(3, H, W)
    payload, error = frames._h264_encode_checked(content, 14, 1)
    assert payload == frames._h264_encode(content, qp=14, threads=1)
    decoded = np.empty_like(content)
    frames.decode_into("h264rgb", payload, decoded)
    assert error == frames.max_error(decoded, content)
    assert list(odd.iterdir()) == []  # the scratch file was made there, unused, and removed


def test_near_lossless_ends_lossless():
    """qp 0 is lossless: the last resort holds any content exactly."""
    noise = pixels(2, seed=6)
    back = np.empty_like(noise)
    frames.decode_into("h264rgb", frames._h264_encode(noise, qp=0, threads=1), back)
    assert np.array_equal(back, noise)


def test_a_jxl_record_holds_one_frame():
    with pytest.raises(ValueError, match=r"^a jxl record holds one frame, not 2$"):
        frames.encode("jxl", pixels(2))
