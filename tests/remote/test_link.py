"""The link rule (remote/link.py): exact arithmetic on made-up measurements, no network."""

from __future__ import annotations

import threading

import pytest

from remote_vae.remote import link
from remote_vae.remote.link import Estimate, Job, LinkBook, Sample

MP = 1_000_000
FOUR_MP = Job(frames=4, height=1000, width=1000)  # 4 MP, 12 MB raw
ONE_MP = Job(frames=1, height=1000, width=1000)


def raw_sample(rate: float, nbytes: int = 3 * MP) -> Sample:
    return Sample(nbytes, nbytes, nbytes / rate, nbytes / 3 / MP, compressed=False)


def test_job_sizes():
    assert FOUR_MP.raw_bytes == 12_000_000 and FOUR_MP.megapixels == 4.0


def test_defaults_before_any_measurement():
    assert link.estimate([]) == Estimate(None, 0.3, 0.005, 1, 0.025)
    assert link.should_compress(Estimate(), FOUR_MP, 2, loopback=True) is False
    assert link.should_compress(Estimate(), FOUR_MP, 2, loopback=False) is True


def test_the_formula_for_several_frames_pipelines_the_stages():
    est = Estimate(throughput=12.5e6, ratio=0.3, encode_per_mp=0.005, encode_threads=1, decode_per_mp=0.025)
    # stages: 12e6 * 0.3 / 12.5e6 = 0.288 s, 4 * 0.005 = 0.02 s, 4 * 0.025 / 2 = 0.05 s
    stages = (0.288, 0.02, 0.05)
    assert link.raw_seconds(est, FOUR_MP) == pytest.approx(0.96)
    assert link.compressed_seconds(est, FOUR_MP, 2) == pytest.approx(max(stages) + sum(stages) / 4)
    assert link.should_compress(est, FOUR_MP, 2, loopback=True) is True  # measured: loopback or not


def test_the_formula_for_one_frame_adds_the_stages():
    est = Estimate(throughput=100e6, ratio=0.3, encode_per_mp=0.004, encode_threads=2, decode_per_mp=0.02)
    # 3e6 * 0.3 / 100e6 = 0.009 s, 0.004 / 2 = 0.002 s, 0.02 / 4 = 0.005 s
    assert link.compressed_seconds(est, ONE_MP, 4) == pytest.approx(0.009 + 0.002 + 0.005)
    assert link.raw_seconds(est, ONE_MP) == pytest.approx(0.03)
    assert link.should_compress(est, ONE_MP, 4, loopback=False) is True  # 0.016 < 0.85 * 0.03


def test_the_margin_decides_at_the_break_even():
    # one frame, no CPU cost: compressed = ratio * raw, so compress exactly when ratio < MARGIN
    for ratio, expected in [(0.84, True), (0.85, False), (0.9, False)]:
        est = Estimate(throughput=1e6, ratio=ratio, encode_per_mp=0.0, decode_per_mp=0.0)
        assert link.should_compress(est, ONE_MP, 1, loopback=False) is expected


def test_a_fast_link_keeps_raw():
    est = link.estimate([raw_sample(1e9)])  # loopback-like: 3 ms for 1 MP raw, decode alone takes 12.5 ms
    assert est.throughput == pytest.approx(1e9)
    assert link.should_compress(est, FOUR_MP, 2, loopback=False) is False


def test_estimate_takes_medians_of_what_was_measured():
    samples = [
        raw_sample(10e6),
        raw_sample(30e6),
        Sample(
            3 * MP, 900_000, 0.045, 1.0, True, encode_seconds=0.004, encode_threads=4, decode_seconds=0.02
        ),
        Sample(
            3 * MP, 1_200_000, 0.06, 1.0, True, encode_seconds=0.006, encode_threads=4, decode_seconds=0.03
        ),
    ]
    est = link.estimate(samples)
    assert est.throughput == pytest.approx(20e6)  # the median of 10, 30, 20, 20 MB/s
    assert est.ratio == pytest.approx(0.35)
    assert est.encode_per_mp == pytest.approx(0.005)
    assert est.encode_threads == 4
    assert est.decode_per_mp == pytest.approx(0.025)


def compressed_sample(rate: float) -> Sample:
    return Sample(
        3 * MP, MP, MP / rate, 1.0, True, encode_seconds=0.005, encode_threads=2, decode_seconds=0.03
    )


def test_compressed_transfers_bound_the_rate_from_below_only():
    # Encode-paced compressed answers (30 MB/s) do not drag a measured fast link (200 MB/s) down ...
    assert link.estimate([raw_sample(200e6), *[compressed_sample(30e6)] * 5]).throughput == pytest.approx(
        200e6
    )
    # ... but one that arrived faster than the raw ones proves the link is at least that fast.
    assert link.estimate([raw_sample(10e6), compressed_sample(50e6)]).throughput == pytest.approx(50e6)
    # Compressed transfers alone: the fastest of them.
    assert link.estimate([compressed_sample(2e6), compressed_sample(3e6)]).throughput == pytest.approx(3e6)


def test_small_or_instant_bodies_do_not_measure_the_rate():
    tiny = Sample(30_000, 30_000, 0.001, 0.01, compressed=False)
    instant = Sample(3 * MP, 3 * MP, 0.0, 1.0, compressed=False)
    assert link.estimate([tiny, instant]).throughput is None


def test_the_upload_is_packed_below_its_break_even():
    assert link.should_pack_upload(Estimate(), loopback=True) is False  # nothing measured: as for frames
    assert link.should_pack_upload(Estimate(), loopback=False) is True
    below, at = link.UPLOAD_BREAK_EVEN * 0.99, link.UPLOAD_BREAK_EVEN
    assert link.should_pack_upload(Estimate(throughput=below), loopback=True) is True
    assert link.should_pack_upload(Estimate(throughput=at), loopback=False) is False
    book = LinkBook()
    book.record("http://127.0.0.1:9", raw_sample(12.5e6))  # a 100 Mbit/s link, through a local proxy
    book.record("http://10.0.0.5:9", raw_sample(1.25e8))  # 1 Gbit/s
    assert book.pack_upload("http://127.0.0.1:9") is True
    assert book.pack_upload("http://10.0.0.5:9") is False
    assert book.pack_upload("http://10.0.0.6:9") is True


def test_loopback_origins():
    assert link.is_loopback("http://127.0.0.1:8190")
    assert link.is_loopback("http://localhost:8190")
    assert link.is_loopback("http://[::1]:8190")
    assert not link.is_loopback("http://10.0.0.5:8190")
    assert not link.is_loopback("https://gpu-box")


def test_the_book_is_per_origin_bounded_and_thread_safe():
    book = LinkBook()
    slow, fast = "http://10.0.0.5:8190", "http://10.0.0.6:8190"

    def record(origin: str, rate: float) -> None:
        for _ in range(50):
            book.record(origin, raw_sample(rate))

    threads = [threading.Thread(target=record, args=(o, r)) for o, r in [(slow, 1e6), (fast, 1e9)] * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert book.estimate(slow).throughput == pytest.approx(1e6)
    assert book.estimate(fast).throughput == pytest.approx(1e9)
    assert len(book._samples[slow]) == link.HISTORY
    assert book.compress(slow, FOUR_MP, 2) is True and book.compress(fast, FOUR_MP, 2) is False
    for _ in range(link.HISTORY):  # the link got fast: the old measurements age out
        book.record(slow, raw_sample(1e9))
    assert book.compress(slow, FOUR_MP, 2) is False
    book.forget()
    assert book.estimate(slow) == Estimate()
