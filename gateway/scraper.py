"""Scrapes each routed backend's ``/metrics`` every ``scrape_interval_s`` (jittered).

One task per backend, started when a table first routes to it and cancelled when no table does.
A failed or malformed scrape leaves the previous figures to go stale (the balancer then treats
the load as unknown); it never writes zeros. Scrapes use their own connection, not the relay
pool, so a busy pool never delays them.
"""

from __future__ import annotations

import asyncio
import random

from gateway.backend import Backend
from gateway.upstream_client import UpstreamError, UpstreamPool
from hpcgate.metrics_text import parse_engine_load


class _Collect:
    """A ResponseSink that keeps a small body (metrics pages are a few kB)."""

    __slots__ = ("body", "done", "error", "status")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.status = 0
        self.body: list[bytes] = []
        self.error: UpstreamError | None = None
        self.done: asyncio.Future[None] = loop.create_future()

    def on_head(self, status: int, headers: dict[bytes, bytes]) -> None:
        self.status = status

    def on_data(self, data: bytes) -> None:
        self.body.append(data)

    def take_over(self, body: bytes) -> bool:
        return False  # a metrics page is read here, never relayed

    def on_end(self, last: bytes) -> None:
        if last:
            self.body.append(last)
        if not self.done.done():
            self.done.set_result(None)

    def on_error(self, exc: UpstreamError) -> None:
        self.error = exc
        if not self.done.done():
            self.done.set_result(None)


class Scraper:
    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float, timeout: float) -> None:
        self._loop = loop
        self._interval = interval
        self._timeout = timeout
        self._tasks: dict[Backend, asyncio.Task[None]] = {}

    def track(self, backends: set[Backend]) -> None:
        """Scrape exactly these backends from now on."""
        for b in [b for b in self._tasks if b not in backends]:
            self._tasks.pop(b).cancel()
        for b in backends:
            if b not in self._tasks:
                self._tasks[b] = self._loop.create_task(self._run(b))

    async def _run(self, b: Backend) -> None:
        pool = UpstreamPool(b.host, b.port, loop=self._loop, max_idle=1, connect_timeout=self._timeout,
                            read_timeout=self._timeout)
        request = b"GET /metrics HTTP/1.1\r\nhost: %b\r\n%baccept: text/plain\r\n\r\n" % (
            b.host_header, b.auth_line)
        try:
            await asyncio.sleep(random.random() * self._interval)
            while True:
                if not await self.scrape_once(b, pool, request):
                    b.scrape_failures += 1
                await asyncio.sleep(self._interval * (0.8 + 0.4 * random.random()))
        finally:
            pool.close()

    async def scrape_once(self, b: Backend, pool: UpstreamPool, request: bytes) -> bool:
        sink = _Collect(self._loop)
        conn = None
        try:
            conn = await pool.acquire()
            conn.send(request, sink)
            async with asyncio.timeout(self._timeout):
                await sink.done
        except (UpstreamError, TimeoutError):
            if conn is not None:
                conn.abort()
            return False
        if sink.error is not None or sink.status != 200:
            return False
        load = parse_engine_load(b"".join(sink.body))
        if load.queue is None:
            return False
        b.record_load(load, self._loop.time())
        return True

    def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
