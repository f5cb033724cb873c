"""The serving replica's dynamic batcher (pipelines/serve/batcher.py): requests that arrive while the
model is busy form the next batch, within the image limit, first come first served."""

from __future__ import annotations

import asyncio
import time

import pytest

from pipelines.serve.batcher import Batcher

pytestmark = pytest.mark.timeout(30)


class Model:
    """A batch function that records its batches and takes ``busy_s`` per batch."""

    def __init__(self, busy_s: float = 0.05, fail_on: object = None) -> None:
        self.busy_s, self.fail_on, self.batches = busy_s, fail_on, []

    async def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        await asyncio.sleep(self.busy_s)
        if self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [("done", item) for item in items]


def test_requests_arriving_while_the_model_is_busy_form_the_next_batch():
    async def main() -> tuple[list, Model]:
        model = Model(busy_s=0.1)
        batcher = Batcher(model, max_images=16, wait_s=0.0)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.02)  # the model is busy with [0]
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 21)]
        return await asyncio.gather(first, *rest), model

    results, model = asyncio.run(main())
    assert results == [("done", i) for i in range(21)]
    assert model.batches == [[0], list(range(1, 17)), list(range(17, 21))]  # full, in arrival order


def test_a_batch_counts_images_and_a_request_above_the_limit_runs_alone():
    async def main() -> Model:
        model = Model(busy_s=0.05)
        batcher = Batcher(model, max_images=8, wait_s=0.0, size=lambda item: item[1])
        blocker = asyncio.create_task(batcher.submit(("a", 1)))
        await asyncio.sleep(0.01)
        items = [("b", 5), ("c", 3), ("d", 1), ("e", 20), ("f", 2)]
        await asyncio.gather(blocker, *(batcher.submit(i) for i in items))
        return model

    model = asyncio.run(main())
    sizes = [[name for name, _ in batch] for batch in model.batches]
    assert sizes == [["a"], ["b", "c"], ["d"], ["e"], ["f"]]  # 5+3 = 8; 1+20 > 8; 20 alone; then 2


def test_an_idle_model_waits_for_batch_mates_unless_the_last_batch_was_one_request():
    async def main() -> tuple[list[float], Model]:
        model = Model(busy_s=0.0)
        batcher = Batcher(model, max_images=8, wait_s=0.3)

        async def timed(*items: int) -> float:
            start = time.monotonic()
            await asyncio.gather(*(batcher.submit(i) for i in items))
            return time.monotonic() - start

        return [await timed(0),  # the first request: no last batch, no wait
                await timed(1, 2, 3, 4),  # four at once after a lone request: no wait
                await timed(*range(10, 18)),  # the last batch had four, but a full batch starts at once
                await timed(5),  # the last batch had eight: waits wait_s for batch-mates
                await timed(6)], model  # the last batch was one request: no wait

    took, model = asyncio.run(main())
    assert model.batches == [[0], [1, 2, 3, 4], list(range(10, 18)), [5], [6]]
    assert 0.25 < took[3] < 1.0
    assert max(took[0], took[1], took[2], took[4]) < 0.2, took


def test_clients_that_resubmit_a_moment_apart_stay_in_one_batch():
    """Four clients, each sending its next request 5-20 ms after its answer: after the first two
    batches (client 0 alone, then the three that arrived meanwhile) the idle model waits for the
    stragglers and every later batch holds all four (a loop that never waited alternates 1 and 3)."""

    async def main() -> Model:
        model = Model(busy_s=0.05)
        batcher = Batcher(model, max_images=16, wait_s=0.1)

        async def client(c: int) -> None:
            await asyncio.sleep(0.005 * c)
            for k in range(6):
                await batcher.submit((c, k))
                await asyncio.sleep(0.005 + 0.005 * c)

        await asyncio.gather(*(client(c) for c in range(4)))
        return model

    model = asyncio.run(main())
    sizes = [len(batch) for batch in model.batches]
    assert sizes[:2] == [1, 3]
    assert sizes[2:] == [4] * 5, sizes


def test_a_failing_batch_fails_its_requests_and_the_next_batch_runs():
    async def main() -> tuple[list, list]:
        model = Model(busy_s=0.05, fail_on=2)
        batcher = Batcher(model, max_images=2, wait_s=0.0)
        got = await asyncio.gather(*(batcher.submit(i) for i in range(4)), return_exceptions=True)
        later = await batcher.submit(9)
        return got, [later]

    got, later = asyncio.run(main())
    assert got[:2] == [("done", 0), ("done", 1)]
    assert all(isinstance(e, ValueError) and "bad item 2" in str(e) for e in got[2:])  # 2 and 3 shared a batch
    assert later == [("done", 9)]


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="max_images must be >= 1"):
        Batcher(Model(), max_images=0, wait_s=0.01)
