"""Admission control: per-tenant concurrency and tokens-per-minute, and per-model FIFO waits.

Tenant limits are enforced per worker process with ``ceil(limit / workers)`` each (workers do
not share memory; connections spread evenly over SO_REUSEPORT). Tokens per minute is a token
bucket that refills continuously; a request is admitted while the bucket is positive and is
charged its actual prompt + completion tokens when it ends (a request's size is unknown up
front), so a tenant can overdraw by one request and then waits (429 with Retry-After).

The model queue is the paper's queue: when every instance of a model is saturated, requests
wait in a bounded FIFO (per model) and are woken one at a time as requests on that model end;
a full queue or a wait past the timeout is a 503. The same queue holds the requests for a model
scaled to zero until a table with a ready instance arrives (all are woken then); its length and
oldest wait are what the worker announces to the autoscaler (:mod:`gateway.demand`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque

from gateway.auth import Principal
from gateway.errors import ApiError


class TenantState:
    __slots__ = ("active", "tokens", "updated")

    def __init__(self, tokens: float, now: float) -> None:
        self.active = 0
        self.tokens = tokens
        self.updated = now


class TenantLimiter:
    __slots__ = ("_states", "_workers")

    def __init__(self, workers: int) -> None:
        self._workers = workers
        self._states: dict[int, TenantState] = {}

    def _share(self, limit: int) -> int:
        return max(1, math.ceil(limit / self._workers))

    def enter(self, p: Principal, now: float) -> TenantState | None:
        """Admit a request of ``p`` or raise 429. Returns the state to pass to :meth:`leave`."""
        if p.max_concurrent is None and p.tpm is None:
            return None
        state = self._states.get(p.tenant_id)
        if state is None:
            state = self._states[p.tenant_id] = TenantState(self._share(p.tpm) if p.tpm else 0.0, now)
        if p.max_concurrent is not None and state.active >= self._share(p.max_concurrent):
            raise ApiError(429, "too many concurrent requests for this tenant", "concurrency_limit_exceeded",
                           retry_after=1)
        if p.tpm is not None:
            capacity = float(self._share(p.tpm))
            rate = capacity / 60.0
            state.tokens = min(capacity, state.tokens + (now - state.updated) * rate)
            state.updated = now
            if state.tokens <= 0:
                wait = math.ceil((1.0 - state.tokens) / rate)
                raise ApiError(429, "tokens-per-minute limit exceeded for this tenant", "rate_limit_exceeded",
                               retry_after=max(1, wait))
        state.active += 1
        return state

    @staticmethod
    def leave(state: TenantState | None, tokens: int) -> None:
        if state is not None:
            state.active -= 1
            state.tokens -= tokens


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
