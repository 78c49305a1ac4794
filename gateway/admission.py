"""Admission control: per-model FIFO waits (tenant limits are in :mod:`gateway.tenant_limits`).

The model queue is the paper's queue: when every instance of a model is saturated, requests
wait in a bounded FIFO (per model) and are woken one at a time as requests on that model end;
a full queue or a wait past the timeout is a 503.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from gateway.errors import ApiError


class ModelQueues:
    __slots__ = ("_loop", "_waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}

    def length(self, model: str) -> int:
        q = self._waiters.get(model)
        return len(q) if q else 0

    async def wait(self, model: str, max_len: int, timeout: float) -> None:
        """Wait for a slot on ``model`` in FIFO order; 503 if the queue is full or the wait too long."""
        q = self._waiters.get(model)
        if q is None:
            q = self._waiters[model] = deque()
        if len(q) >= max_len:
            raise ApiError(503, f"model {model!r} is saturated and its queue is full", "model_saturated",
                           retry_after=1)
        fut: asyncio.Future[None] = self._loop.create_future()
        q.append(fut)
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
                q.remove(fut)

    def wake(self, models: frozenset[str]) -> None:
        """A request on these models ended: let the oldest waiter of each try again."""
        waiters = self._waiters
        if not waiters:
            return
        for model in models:
            q = waiters.get(model)
            while q:
                fut = q.popleft()
                if not fut.done():
                    fut.set_result(None)
                    break
