"""Keeps the worker's endpoint and key tables current from Redis (snapshot key + pub/sub).

Protocol (see hpcgate.schemas.tables): subscribe to the version channels, then GET the snapshot
keys (so no announcement can fall between the two), then apply each announced version that is
newer than the one held; re-GET every ``table_resync_s`` as a safety net. If Redis goes away
the last tables stay in use and the loop reconnects with capped, jittered exponential backoff.
A snapshot that does not decode is logged and ignored, never installed, and so is one that
another deployment published under our prefix (its claim, ``RedisNames.owner``, is not ours:
``tables_of_another_deployment``). Until the worker knows its own claim (read from PostgreSQL
with the keys; never, without a database) every snapshot is taken.

Stopping: :meth:`RedisTableSync.close` before cancelling the task. On Python 3.11 a cancellation
that races with the timeout of redis-py's ``get_message`` (``asyncio.timeout``) can be swallowed
and turned into a plain timeout, so the loop also checks its own flag after every wait: a worker
whose stop lost that race kept installing tables instead of stopping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from hpcgate.backoff import Backoff
from hpcgate.logs import get_logger
from hpcgate.schemas import EndpointTable, KeyTable, RedisNames

log = get_logger("hpcgate.gateway.tables")

_decode_endpoints = msgspec.json.Decoder(EndpointTable).decode
_decode_keys = msgspec.json.Decoder(KeyTable).decode


class RedisTableSync:
    def __init__(
        self, url: str, prefix: str, *, resync_s: float, backoff_max_s: float,
        on_endpoints: Callable[[EndpointTable], int] | None,
        on_keys: Callable[[KeyTable], int] | None,
        deployment: Callable[[], str | None] = lambda: None,
    ) -> None:
        """``on_*`` install a snapshot if newer and return the version held afterwards;
        ``deployment`` is this deployment's claim on the prefix, once known."""
        self._deployment = deployment
        self._foreign: str | None = None  # the other deployment whose tables were refused, said once
        self._url = url
        self._names = RedisNames(prefix)
        self._resync_s = resync_s
        self._backoff_max = backoff_max_s
        self._on_endpoints = on_endpoints
        self._on_keys = on_keys
        self.connected = asyncio.Event()
        self._closed = False

    def _channels(self) -> dict[bytes, str]:
        n = self._names
        ch: dict[bytes, str] = {}
        if self._on_endpoints is not None:
            ch[n.endpoint_table_channel.encode()] = n.endpoint_table
        if self._on_keys is not None:
            ch[n.key_table_channel.encode()] = n.key_table
        return ch

    def close(self) -> None:
        """Make :meth:`run` return at its next wake-up (cancel the task as well)."""
        self._closed = True

    async def run(self) -> None:
        failures = 0
        backoff = Backoff(base_s=0.1, cap_s=self._backoff_max)
        channels = self._channels()
        while not self._closed:
            client = aioredis.from_url(self._url, socket_connect_timeout=2.0, health_check_interval=2)
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(*channels)
                for key in channels.values():
                    await self._fetch(client, key)
                if failures:
                    log.info("redis_reconnected", after_failures=failures)
                failures = 0
                backoff.reset()
                self.connected.set()
                loop = asyncio.get_running_loop()
                next_resync = loop.time() + self._resync_s
                while not self._closed:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
                    if msg is not None and msg.get("type") == "message":
                        target = channels.get(msg["channel"])
                        if target is not None:
                            await self._fetch(client, target)
                    if loop.time() >= next_resync:
                        for key in channels.values():
                            await self._fetch(client, key)
                        next_resync = loop.time() + self._resync_s
            except (RedisError, OSError) as exc:
                self.connected.clear()
                failures += 1
                delay = backoff.next_delay()
                log.warning("redis_unavailable", error=str(exc) or type(exc).__name__,
                            retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)
            finally:
                try:
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                    await client.aclose()
                except (RedisError, OSError):
                    pass

    async def _fetch(self, client: aioredis.Redis, key: str) -> None:
        raw, claim = await client.mget(key, self._names.owner)
        if raw is None:
            return
        ours = self._deployment()
        owner = claim.decode(errors="replace") if isinstance(claim, bytes) else claim
        if ours is not None and owner is not None and owner != ours:
            if self._foreign != owner:  # another deployment publishes under our prefix: never install
                self._foreign = owner
                log.error("tables_of_another_deployment", key=key, owner=owner, ours=ours,
                          hint="give each deployment its own HPCGATE_REDIS_PREFIX")
            return
        self._foreign = None
        try:
            if key == self._names.endpoint_table:
                assert self._on_endpoints is not None
                self._on_endpoints(_decode_endpoints(raw))
            else:
                assert self._on_keys is not None
                self._on_keys(_decode_keys(raw))
        except msgspec.DecodeError as exc:
            log.error("table_snapshot_invalid", key=key, error=str(exc))
