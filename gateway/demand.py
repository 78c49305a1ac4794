"""Announces the requests this worker holds per model to the autoscaler, off the hot path.

About once a second (never per request) the worker's model queues are summarised into a
:class:`hpcgate.schemas.ModelDemand` and written with ``SET … EX`` under
``<prefix>demand:<host>:<pid>``: a worker that dies or loses Redis stops counting once the key
expires. Nothing is written while nothing is held (the last non-empty summary is followed by
one empty one). A Redis error is logged once per outage; requests never wait on any of this.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from hpcgate.logs import get_logger
from hpcgate.schemas import HeldRequests, ModelDemand, RedisNames

log = get_logger("hpcgate.gateway.demand")
_encode = msgspec.json.Encoder().encode


class DemandPublisher:
    def __init__(
        self,
        url: str,
        prefix: str,
        read: Callable[[float], dict[str, tuple[int, float]]],
        *,
        interval_s: float = 1.0,
        ttl_s: int = 3,
    ) -> None:
        self._redis = aioredis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._key = f"{RedisNames(prefix).demand_prefix}{socket.gethostname()}:{os.getpid()}"
        self._read = read
        self._interval = interval_s
        self._ttl = ttl_s
        self._was_held = False
        self._failing = False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self.publish_once(loop.time())
                await asyncio.sleep(self._interval)
        finally:
            await self.close()

    async def close(self) -> None:
        await self._redis.aclose()

    async def publish_once(self, now: float) -> None:
        held = self._read(now)
        if not held and not self._was_held:
            return
        doc = ModelDemand(at=time.time(), models={m: HeldRequests(n, age) for m, (n, age) in held.items()})
        try:
            await self._redis.set(self._key, _encode(doc), ex=self._ttl)
        except (RedisError, OSError) as exc:
            if not self._failing:
                log.warning("demand_publish_failed", error=str(exc)[:300])
            self._failing = True
            return
        if self._failing:
            log.info("demand_publish_recovered")
        self._failing = False
        self._was_held = bool(held)
