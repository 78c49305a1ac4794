"""Admission control: per-model FIFO waits (tenant limits are in :mod:`gateway.tenant_limits`).

The model queue is the paper's queue: when every instance of a model is saturated, requests
wait in a bounded FIFO (per model) and are woken one at a time as requests on that model end;
a full queue or a wait past the timeout is a 503. Batch requests (from the batch runner) wait
in a second FIFO per model that is woken only when no interactive request waits, and a batch
request never takes a slot while interactive ones wait (gateway.proxy): backfill. The same
queues hold the requests for a model scaled to zero until a table with a ready instance arrives
(all are woken then); the interactive queue's length and oldest wait are what the worker
announces to the autoscaler (:mod:`gateway.demand`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from gateway.errors import ApiError

Waiter = tuple[float, asyncio.Future[None]]  # (arrival time, woken when it may try again)


class ModelQueues:
    """Per-model FIFOs of waiting requests: interactive, and batch behind them."""

    __slots__ = ("_batch", "_loop", "_waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiters: dict[str, deque[Waiter]] = {}  # interactive
        self._batch: dict[str, deque[Waiter]] = {}  # batch: only after interactive

    def length(self, model: str) -> int:
        """Interactive requests waiting for ``model``."""
        q = self._waiters.get(model)
        return len(q) if q else 0

    def batch_length(self, model: str) -> int:
        q = self._batch.get(model)
        return len(q) if q else 0

    def demand(self, now: float) -> dict[str, tuple[int, float]]:
        """Held interactive requests per model with the age of the oldest (what the autoscaler
        is told; batch work waits behind them and does not call for more instances)."""
        return {m: (len(q), now - q[0][0]) for m, q in self._waiters.items() if q}

    async def wait(self, model: str, max_len: int, timeout: float, batch: bool = False) -> None:
        """Wait for a slot on ``model`` in FIFO order; 503 if the queue is full or the wait too long."""
        queues = self._batch if batch else self._waiters
        q = queues.get(model)
        if q is None:
            q = queues[model] = deque()
        if len(q) >= max_len:
            raise ApiError(503, f"model {model!r} is saturated and its queue is full", "model_saturated",
                           retry_after=1)
        fut: asyncio.Future[None] = self._loop.create_future()
        entry = (self._loop.time(), fut)
        q.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            raise ApiError(503, f"model {model!r} stayed saturated for {timeout:g}s", "model_saturated",
                           retry_after=1) from None
        finally:
            if not fut.done():
                fut.cancel()
            with contextlib.suppress(ValueError):
                q.remove(entry)

    def wake_all(self, model: str) -> None:
        """Instances of ``model`` became ready: every waiter tries again (interactive first)."""
        for queues in (self._waiters, self._batch):
            for _, fut in list(queues.get(model) or ()):
                if not fut.done():
                    fut.set_result(None)

    def wake(self, models: frozenset[str]) -> None:
        """A request on these models ended: let the oldest waiter of each try again."""
        waiters, batch = self._waiters, self._batch
        if not waiters and not batch:
            return
        for model in models:
            if not _wake_one(waiters.get(model)):
                _wake_one(batch.get(model))


def _wake_one(q: deque[Waiter] | None) -> bool:
    while q:
        _, fut = q.popleft()
        if not fut.done():
            fut.set_result(None)
            return True
    return False
