"""Admission control: per-model FIFO waits (tenant limits are in :mod:`gateway.tenant_limits`).

The model queue is the paper's queue: when every instance of a model is saturated, requests
wait in a bounded FIFO (per model) and are woken one at a time as requests on that model end;
a full queue or a wait past the timeout is a 503. The same queue holds the requests for a model
scaled to zero until a table with a ready instance arrives (all are woken then); its length and
oldest wait are what the worker announces to the autoscaler (:mod:`gateway.demand`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from gateway.errors import ApiError


class ModelQueues:
    """Per-model FIFO of waiting requests; each entry is (arrival time, future)."""

    __slots__ = ("_loop", "_waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiters: dict[str, deque[tuple[float, asyncio.Future[None]]]] = {}

    def length(self, model: str) -> int:
        q = self._waiters.get(model)
        return len(q) if q else 0

    def demand(self, now: float) -> dict[str, tuple[int, float]]:
        """Held requests per model with the age of the oldest (what the autoscaler is told)."""
        return {m: (len(q), now - q[0][0]) for m, q in self._waiters.items() if q}

    async def wait(self, model: str, max_len: int, timeout: float) -> None:
        """Wait for a slot on ``model`` in FIFO order; 503 if the queue is full or the wait too long."""
        q = self._waiters.get(model)
        if q is None:
            q = self._waiters[model] = deque()
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
        """Instances of ``model`` became ready: every waiter tries again (in FIFO order)."""
        q = self._waiters.get(model)
        for _, fut in list(q or ()):
            if not fut.done():
                fut.set_result(None)

    def wake(self, models: frozenset[str]) -> None:
        """A request on these models ended: let the oldest waiter of each try again."""
        waiters = self._waiters
        if not waiters:
            return
        for model in models:
            q = waiters.get(model)
            while q:
                _, fut = q.popleft()
                if not fut.done():
                    fut.set_result(None)
                    break
