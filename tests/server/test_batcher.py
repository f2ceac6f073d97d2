"""The dynamic batcher: same-key requests that arrive together (in one loop turn, or while the device is
busy) run together and get their own results back; a lone request on an idle device never waits."""

import asyncio

import pytest
import torch

from remote_vae.local_server.batcher import KERNEL_ELEMENT_LIMIT, Batcher, decode_activation_elements


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[object, tuple[int, ...]]] = []
        self.fail = fail

    async def __call__(self, key, batch: torch.Tensor) -> torch.Tensor:
        self.calls.append((key, tuple(batch.shape)))
        if self.fail:
            raise RuntimeError("device fell over")
        return batch * 10, len(self.calls)


def test_same_key_requests_in_one_window_run_as_one_batch_in_order():
    rec = Recorder()
    batcher = Batcher(rec, window=0.05, max_items=8)
    inputs = [torch.full((n, 4, 2, 2), float(i)) for i, n in enumerate((1, 2, 1))]

    async def main():
        return await asyncio.gather(*(batcher.submit("k", t) for t in inputs))

    outs = run(main())
    assert rec.calls == [("k", (4, 4, 2, 2))]
    for t, (out, shared) in zip(inputs, outs, strict=True):
        assert torch.equal(out, t * 10) and shared == 1


def test_different_keys_never_mix():
    rec = Recorder()
    batcher = Batcher(rec, window=0.05)

    async def main():
        return await asyncio.gather(
            batcher.submit("a", torch.ones(1, 2)), batcher.submit("b", torch.ones(1, 2))
        )

    run(main())
    assert sorted(k for k, _ in rec.calls) == ["a", "b"]


def test_batches_close_at_the_item_and_element_budgets():
    rec = Recorder()
    batcher = Batcher(rec, window=0.05, max_items=2)

    async def main():
        return await asyncio.gather(*(batcher.submit("k", torch.ones(1, 3)) for _ in range(5)))

    run(main())
    assert [shape[0] for _, shape in rec.calls] == [2, 2, 1]

    rec2 = Recorder()
    batcher2 = Batcher(rec2, window=0.05, max_elements=6)  # each tensor costs 3 elements

    async def main2():
        return await asyncio.gather(*(batcher2.submit("k", torch.ones(1, 3)) for _ in range(3)))

    run(main2())
    assert [shape[0] for _, shape in rec2.calls] == [2, 1]


def test_a_failed_batch_fails_every_request_in_it():
    batcher = Batcher(Recorder(fail=True), window=0.05)

    async def main():
        return await asyncio.gather(
            *(batcher.submit("k", torch.ones(1)) for _ in range(2)), return_exceptions=True
        )

    results = run(main())
    assert all(isinstance(r, RuntimeError) and "device fell over" in str(r) for r in results)


def test_element_budget_never_exceeds_the_kernel_limit():
    assert Batcher(Recorder(), max_elements=2**40)._max_elements == KERNEL_ELEMENT_LIMIT
    # SD 1024^2: 128 channels x 1024 x 1024 per image = 2^27 elements, so at most 15 per batch.
    z = torch.zeros(1, 4, 128, 128)
    assert decode_activation_elements(z, spatial=8) == 128 * 1024 * 1024
    video = torch.zeros(1, 16, 3, 40, 64)
    assert decode_activation_elements(video, spatial=8, temporal=4) == 128 * 9 * 320 * 512


@pytest.mark.parametrize("window", [0.0, 0.02])
def test_a_lone_request_is_not_held_longer_than_the_window(window):
    rec = Recorder()
    batcher = Batcher(rec, window=window)
    out, _ = run(batcher.submit("k", torch.ones(1, 1)))
    assert torch.equal(out, torch.full((1, 1), 10.0)) and len(rec.calls) == 1


class Gated(Recorder):
    """Holds each batch on the 'device' until `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def __call__(self, key, batch: torch.Tensor) -> torch.Tensor:
        result = await super().__call__(key, batch)
        await self.release.wait()
        return result


def test_a_lone_request_on_an_idle_device_does_not_wait_for_the_window():
    rec = Recorder()
    batcher = Batcher(rec, window=5.0)

    async def main():
        started = asyncio.get_running_loop().time()
        await batcher.submit("k", torch.ones(1, 1))
        return asyncio.get_running_loop().time() - started

    assert run(main()) < 1.0 and rec.calls == [("k", (1, 1))]


def test_requests_arriving_while_the_device_is_busy_batch_and_start_when_it_frees():
    gated = Gated()
    batcher = Batcher(gated, window=5.0)

    async def main():
        loop = asyncio.get_running_loop()
        first = asyncio.ensure_future(batcher.submit("k", torch.ones(1, 1)))
        while not gated.calls:  # the first request is on the device at once
            await asyncio.sleep(0)
        later = [asyncio.ensure_future(batcher.submit("k", torch.full((1, 1), 2.0))) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert len(gated.calls) == 1  # the others wait while the device is busy
        freed = loop.time()
        gated.release.set()
        outs = await asyncio.gather(first, *later)
        return outs, loop.time() - freed

    outs, after_free = run(main())
    assert [shape[0] for _, shape in gated.calls] == [1, 3]
    assert after_free < 1.0  # started when the device freed, not at the end of the window
    assert [out.item() for out, _ in outs] == [10.0, 20.0, 20.0, 20.0]
