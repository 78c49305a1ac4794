"""The Endpoint Worker: probe rounds, readiness and expiry, and publishing the tables.

Three independent loops share one PostgreSQL pool and one Redis client; each heals itself:

- **probe loop**: every ``probe_interval_s`` reads all endpoints, probes the live ones
  concurrently (bounded by ``max_concurrent_probes``), asks the launcher observer if any,
  turns that into actions with the pure :mod:`control.health.plan` and applies each action in
  its own transaction with conditional updates (safe to repeat after a crash);
- **listen loop**: a dedicated connection LISTENs on ``hpcgate_endpoint_table`` and
  ``hpcgate_key_table`` (fired by triggers, migration 0500) and wakes the publisher; after a
  reconnect it marks both tables dirty, since notifications may have been missed;
- **publish loop**: publishes a table when it is dirty, and both every ``publish_interval_s``
  (forced), through :class:`control.publish.publisher.TablePublisher`; while another deployment
  holds the Redis prefix it publishes nothing and says so once (``redis_prefix_taken``).

A lost PostgreSQL or Redis is logged once (and its recovery once); the loop backs off with
jitter and retries. Any other error ends the worker (``health_loop_failed``), never one loop alone.
Nothing is kept only in memory: a ``kill -9`` loses no state, and a
restart republishes at once with a higher version.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

import asyncpg
import httpx
import redis.asyncio as aioredis
import redis.exceptions

from control.health.observer import JobObserver, LiveJob
from control.health.plan import Action, EndpointState, MarkReady, RecordProbe, Remove, needs_probe, plan_round
from control.health.probe import ProbeResult, probe, probe_client
from control.publish.publisher import PrefixTakenError, TablePublisher
from control.settings import HealthSettings
from control.store.db import OUTAGE_ERRORS, Conn, OutageLog
from hpcgate.backoff import Backoff
from hpcgate.logs import get_logger
from hpcgate.schemas import RedisNames

log = get_logger("hpcgate.control.health")

ENDPOINT_CHANNEL = "hpcgate_endpoint_table"
KEY_CHANNEL = "hpcgate_key_table"
REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, OSError, asyncio.TimeoutError)
_KEEPALIVE_S = 5.0

_ENDPOINTS_SQL = """
SELECT e.endpoint_id, e.endpoint_job_id, e.node, e.port, e.bearer_token, j.state AS job_state, j.launcher,
       j.launcher_job_id, e.registered_at, e.ready_at IS NOT NULL AS ready, e.consecutive_failures,
       m.startup_timeout_s
  FROM ai_model_endpoints e
  JOIN ai_model_endpoint_jobs j USING (endpoint_job_id)
  JOIN ai_model_configurations m ON m.model_id = e.model_id
 ORDER BY e.endpoint_id
"""


class EndpointWorker:
    def __init__(self, settings: HealthSettings, *, observer: JobObserver | None = None) -> None:
        self.settings = settings
        self._observer = observer
        self._pg = OutageLog("postgresql")
        self._redis_outage = OutageLog("redis")
        self._endpoints_dirty = True
        self._keys_dirty = True
        self._wake = asyncio.Event()
        self._pool: asyncpg.Pool | None = None
        self._publisher: TablePublisher | None = None
        self._prefix_taken_by: str | None = None  # the other deployment's claim, said once

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        timeout = s.probe_timeout_s + 3.0
        self._pool = await asyncpg.create_pool(
            s.database_url, min_size=0, max_size=4, timeout=timeout, command_timeout=timeout
        )
        redis = aioredis.from_url(s.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._publisher = TablePublisher(
            self._pool,
            redis,
            RedisNames(s.redis_prefix),
            unroutable_after=s.unroutable_after,
            timeout_s=timeout,
            # a stopped deployment frees its prefix; a live one renews it at every forced publish
            claim_ttl_s=max(30.0, 3 * s.publish_interval_s),
        )
        log.info("health_worker_started", redis_prefix=s.redis_prefix, probe_interval_s=s.probe_interval_s)
        tasks = [
            asyncio.create_task(loop(), name=loop.__name__)
            for loop in (self._probe_loop, self._listen_loop, self._publish_loop)
        ]
        stopped = asyncio.create_task(stop.wait())
        try:
            # The loops heal outages themselves and never return: one that ends has met an error
            # it cannot heal (a schema older than this code). It ends the whole worker rather
            # than leave it running without that loop: the singleton lock starts it again after
            # a backoff (a PostgreSQL error), or the daemon exits for its supervisor (any other).
            await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                if task.done() and not task.cancelled() and (exc := task.exception()) is not None:
                    hint = ("the database schema is older than this code: run hpcgate db migrate"
                            if isinstance(exc, (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError))
                            else None)
                    log.error("health_loop_failed", loop=task.get_name(), error=repr(exc)[:500], hint=hint)
                    raise exc
        finally:
            stopped.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await redis.aclose()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), 5)
            log.info("health_worker_stopped")

    def _mark_dirty(self, endpoints: bool = False, keys: bool = False) -> None:
        self._endpoints_dirty |= endpoints
        self._keys_dirty |= keys
        self._wake.set()

    # ------------------------------------------------------------------ probing

    async def _probe_loop(self) -> None:
        backoff = Backoff(cap_s=self.settings.backoff_max_s)
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                if await self.probe_round():
                    self._mark_dirty(endpoints=True)
                self._pg.ok()
                backoff.reset()
            except OUTAGE_ERRORS as exc:
                self._pg.failed(exc)
                await asyncio.sleep(backoff.next_delay())
                continue
            await asyncio.sleep(max(0.0, self.settings.probe_interval_s - (loop.time() - started)))

    async def probe_round(self) -> bool:
        """One round; True if any endpoint changed."""
        assert self._pool is not None
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(_ENDPOINTS_SQL)
        endpoints = [EndpointState(**dict(r)) for r in rows]
        live = [ep for ep in endpoints if needs_probe(ep)]
        results, gone = await asyncio.gather(self._probe_all(live), self._gone(live))
        actions = plan_round(endpoints, results, gone, datetime.now(UTC), dead_after=self.settings.dead_after)
        for action in actions:
            async with self._pool.acquire() as conn, conn.transaction():
                await _apply(conn, action)
            _log_action(action, {ep.endpoint_id: ep for ep in endpoints}[action.endpoint_id])
        return bool(actions)  # the publisher skips the snapshot if its content did not change

    async def _probe_all(self, endpoints: list[EndpointState]) -> dict[int, ProbeResult]:
        if not endpoints:
            return {}
        s = self.settings
        limit = asyncio.Semaphore(s.max_concurrent_probes)

        async def one(client: httpx.AsyncClient, ep: EndpointState) -> tuple[int, ProbeResult]:
            async with limit:
                result = await probe(client, ep.node, ep.port, ep.bearer_token, s.probe_timeout_s)
            return ep.endpoint_id, result

        async with probe_client(s.probe_timeout_s, s.max_concurrent_probes) as client:
            return dict(await asyncio.gather(*(one(client, ep) for ep in endpoints)))

    async def _gone(self, endpoints: list[EndpointState]) -> frozenset[int]:
        if self._observer is None or not endpoints:
            return frozenset()
        jobs = [
            LiveJob(ep.endpoint_job_id, ep.launcher, ep.launcher_job_id, ep.registered_at.timestamp())
            for ep in endpoints
        ]
        try:
            return await asyncio.wait_for(self._observer.gone(jobs), self.settings.probe_timeout_s * 5)
        except Exception as exc:  # no information this round; never "everything is gone"
            log.warning("launcher_observe_failed", error=repr(exc))
            return frozenset()

    # ------------------------------------------------------------------ notifications

    async def _listen_loop(self) -> None:
        backoff = Backoff(cap_s=self.settings.backoff_max_s)
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(
                    self.settings.database_url, timeout=self.settings.probe_timeout_s + 3
                )
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(ENDPOINT_CHANNEL, lambda *_a: self._mark_dirty(endpoints=True))
                await conn.add_listener(KEY_CHANNEL, lambda *_a: self._mark_dirty(keys=True))
                self._pg.ok()
                backoff.reset()
                self._mark_dirty(endpoints=True, keys=True)  # anything may have changed while deaf
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), _KEEPALIVE_S)
                    if not lost.is_set():  # a cut connection may never be reported: ping it
                        await conn.execute("SELECT 1", timeout=self.settings.probe_timeout_s)
                raise ConnectionError("listen connection lost")
            except OUTAGE_ERRORS as exc:
                self._pg.failed(exc)
                await asyncio.sleep(backoff.next_delay())
            finally:
                if conn is not None:
                    conn.terminate()

    # ------------------------------------------------------------------ publishing

    async def _publish_loop(self) -> None:
        assert self._publisher is not None
        backoff = Backoff(cap_s=self.settings.backoff_max_s)
        loop = asyncio.get_running_loop()
        next_forced = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_forced - loop.time()))
            self._wake.clear()
            force = loop.time() >= next_forced
            endpoints, keys = self._endpoints_dirty or force, self._keys_dirty or force
            self._endpoints_dirty = self._keys_dirty = False
            try:
                if keys:
                    version = await self._publisher.publish_keys(force=force)
                    keys = False
                    if version is not None:
                        log.info("table_published", table="keys", version=version, forced=force)
                if endpoints:
                    version = await self._publisher.publish_endpoints(force=force)
                    endpoints = False
                    if version is not None:
                        log.info("table_published", table="endpoints", version=version, forced=force)
                self._pg.ok()
                self._redis_outage.ok()
                if self._prefix_taken_by is not None:
                    log.info("redis_prefix_claimed", redis_prefix=self.settings.redis_prefix)
                    self._prefix_taken_by = None
                backoff.reset()
                if force:
                    next_forced = loop.time() + self.settings.publish_interval_s
            except PrefixTakenError as exc:  # nothing written: retried until the other one's claim ends
                if self._prefix_taken_by != exc.owner:
                    log.error("redis_prefix_taken", redis_prefix=exc.prefix, owner=exc.owner, ours=exc.ours,
                              reason=str(exc))
                    self._prefix_taken_by = exc.owner
                self._publisher.forget()
                self._mark_dirty(endpoints=endpoints, keys=keys)
                await asyncio.sleep(max(backoff.next_delay(), 1.0))
            except REDIS_ERRORS + OUTAGE_ERRORS as exc:
                if isinstance(exc, redis.exceptions.RedisError):
                    self._redis_outage.failed(exc)
                else:
                    self._pg.failed(exc)
                self._publisher.forget()
                self._mark_dirty(endpoints=endpoints, keys=keys)
                await asyncio.sleep(backoff.next_delay())


async def _apply(conn: Conn, action: Action) -> None:
    """Conditional, idempotent updates: repeating an action after a crash changes nothing."""
    if isinstance(action, MarkReady):
        await conn.execute(
            """UPDATE ai_model_endpoints SET ready_at = coalesce(ready_at, now()), consecutive_failures = 0,
                      last_probe_at = now() WHERE endpoint_id = $1""",
            action.endpoint_id,
        )
        await conn.execute(
            """UPDATE ai_model_endpoint_jobs SET state = 'ready', ready_at = coalesce(ready_at, now())
                WHERE endpoint_job_id = $1 AND state = 'registered'""",
            action.endpoint_job_id,
        )
    elif isinstance(action, RecordProbe):
        await conn.execute(
            """UPDATE ai_model_endpoints SET consecutive_failures = $2, last_probe_at = now()
                WHERE endpoint_id = $1""",
            action.endpoint_id,
            action.consecutive_failures,
        )
    else:
        if action.job_state is not None:
            await conn.execute(
                """UPDATE ai_model_endpoint_jobs
                      SET state = $2, state_reason = $3, ended_at = coalesce(ended_at, now())
                    WHERE endpoint_job_id = $1 AND state NOT IN ('ended', 'failed')""",
                action.endpoint_job_id,
                action.job_state,
                action.reason,
            )
        await conn.execute("DELETE FROM ai_model_endpoints WHERE endpoint_id = $1", action.endpoint_id)


def _log_action(action: Action, ep: EndpointState) -> None:
    if isinstance(action, MarkReady):
        log.info(
            "endpoint_state",
            endpoint_id=ep.endpoint_id,
            endpoint_job_id=ep.endpoint_job_id,
            old="registered",
            new="ready",
            reason="health probe answered 200",
        )
    elif isinstance(action, Remove):
        log.info(
            "endpoint_state",
            endpoint_id=ep.endpoint_id,
            endpoint_job_id=ep.endpoint_job_id,
            old="ready" if ep.ready else "registered",
            new="removed",
            reason=action.reason,
            job_state=action.job_state,
        )
    elif action.consecutive_failures in (0, 1):
        log.info(
            "endpoint_probe", endpoint_id=ep.endpoint_id, consecutive_failures=action.consecutive_failures
        )
