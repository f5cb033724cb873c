"""Dynamic batching for a serving replica: requests that arrive while the model is busy form the next batch.

Why not Ray Serve's ``@serve.batch``: it seals each batch ``batch_wait_timeout_s`` after the batch's
first request even while the previous batch is still running, and queues the sealed batches behind
one another. Under load the batches then stay small: with 16 clients sending one-image requests and
a limit of 16, ``@serve.batch`` formed batches of 3.7 requests on average
(``benchmarks/bench_serve.py``, docs/SERVING.md), so the network ran many small batches instead of
a few full ones. Here one loop takes the requests waiting, runs them as one batch, and only then
looks again: everything that arrived meanwhile is the next batch, up to the limit.

Rules (one asyncio loop, no threads here; the work itself may run in a thread):

- a batch holds at most ``max_images`` images (a request counts its ``size``), except that a single
  request above the limit runs alone;
- while the model is idle, a request waits at most ``wait_s`` after its arrival for batch-mates (a
  full batch starts at once), unless the last batch was a single request (or there was none): a
  lone client's requests never wait, while clients that were answered together and come back a
  few milliseconds apart still meet in one batch; requests that waited for a busy model start as
  soon as it is free;
- first come, first served: the batch is a prefix of the queue;
- a failing batch fails each of its requests with the same exception, and the loop goes on.

Before, every idle start waited: a lone client paid ``wait_s`` (10 ms) on each one-image request of
90-110 ms on two cores; a loop that never waits splits clients answered together into small
batches (both measured: ``benchmarks/bench_serve.py``, docs/SERVING.md).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batcher(Generic[Item, Result]):
    """``await batcher.submit(item)``: the result of ``item`` from ``run(batch)``, which maps a list
    of items to a list of results in the same order (module docstring)."""

    def __init__(self, run: Callable[[list[Item]], Awaitable[list[Result]]], max_images: int, wait_s: float,
                 size: Callable[[Item], int] = lambda item: 1) -> None:
        if max_images < 1 or wait_s < 0:
            raise ValueError(f"max_images must be >= 1 and wait_s >= 0, got {max_images}, {wait_s}")
        self.run, self.max_images, self.wait_s, self.size = run, max_images, wait_s, size
        self._queue: deque[tuple[Item, asyncio.Future, float]] = deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._last_batch = 1  # requests the last batch held (1 before the first: nothing to wait for)

    async def submit(self, item: Item) -> Result:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((item, future, time.monotonic()))
        self._arrived.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop())
        return await future

    def _waiting_images(self) -> int:
        return sum(self.size(item) for item, _, _ in self._queue)

    def _take(self) -> list[tuple[Item, asyncio.Future, float]]:
        """The longest prefix of the queue within ``max_images`` (at least one request)."""
        batch = [self._queue.popleft()]
        images = self.size(batch[0][0])
        while self._queue and images + self.size(self._queue[0][0]) <= self.max_images:
            entry = self._queue.popleft()
            images += self.size(entry[0])
            batch.append(entry)
        return batch

    async def _loop(self) -> None:
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            # the oldest request waits at most wait_s from its arrival for batch-mates, unless the
            # last batch was one request (module docstring)
            deadline = self._queue[0][2] + self.wait_s
            while (self._last_batch > 1 and self._waiting_images() < self.max_images
                   and (left := deadline - time.monotonic()) > 0):
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            self._last_batch = len(batch)
            try:
                results = await self.run([item for item, _, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"the batch function gave {len(results)} results for {len(batch)} requests")
            except Exception as e:  # every request of the batch gets the error; the loop goes on
                for _, future, _ in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future, _), result in zip(batch, results):
                if not future.done():  # a client that went away cancelled its future
                    future.set_result(result)


__all__ = ["Batcher"]
