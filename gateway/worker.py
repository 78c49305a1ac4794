"""One gateway worker process: its event loop, server, table sources and graceful shutdown.

A worker serves on a socket it is given (bound by the parent, or its own SO_REUSEPORT socket),
holds its own copy of the tables and scrapes on its own. On SIGTERM/SIGINT it stops accepting,
lets streams in flight finish up to ``shutdown_timeout_s``, then writes the usage it holds; a
second SIGTERM/SIGINT exits at once. A background task that ends with an error it could not
handle (``background_task_failed``) stops the worker the same way, and it exits 1: its parent
starts another (or, with one worker, its supervisor restarts the gateway).
"""

from __future__ import annotations

import asyncio
import gc
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

from gateway.api_relay import FILES_PATH, FORM_OVERHEAD
from gateway.app import Gateway
from gateway.demand import DemandPublisher
from gateway.http_server import HttpServer
from gateway.key_source import load_key_table, load_month_usage
from gateway.lease_sync import LeaseSync
from gateway.routing_table import ModelRoute, RoutingTable
from gateway.settings import GatewaySettings, parse_static_endpoints
from gateway.table_sync import RedisTableSync
from gateway.upload import UPLOAD_PATHS
from gateway.usage_spool import UsageSpool
from hpcgate.lifecycle import install_stop_signals
from hpcgate.logs import get_logger
from hpcgate.schemas import ModelState

log = get_logger("hpcgate.gateway.worker")


def static_table(gw: Gateway, settings: GatewaySettings) -> RoutingTable:
    by_model: dict[str, list[object]] = {}
    routes: dict[str, ModelRoute] = {}
    for ep in parse_static_endpoints(settings.static_endpoints):
        b = gw.backend_for((ep.url, ep.bearer_token), ep.host, ep.port)
        by_model.setdefault(ep.model, []).append(b)
    for model, backends in by_model.items():
        routes[model] = ModelRoute(model, ModelState.READY, tuple(backends))  # type: ignore[arg-type]
        for b in routes[model].backends:
            b.models = b.models | {model}
    return RoutingTable(1, time.time(), routes.values())


class Worker:
    """Everything one worker runs, startable in-process (tests) or in a forked child."""

    def __init__(self, settings: GatewaySettings, index: int = 0, spool: UsageSpool | None = None) -> None:
        self.settings = settings
        self.index = index
        self.loop = asyncio.get_running_loop()
        self.gateway = Gateway(settings, self.loop, index)
        if spool is not None:  # a worker slot of several: what a killed predecessor left is written
            self.gateway.usage.attach(spool)
        uploads = dict.fromkeys(UPLOAD_PATHS, settings.max_upload_bytes)
        if settings.batch_api_url:
            uploads[FILES_PATH] = settings.files_max_bytes + FORM_OVERHEAD
        self.server = HttpServer(self.gateway.handle, settings, self.loop, upload_limits=uploads)
        self._tasks: list[asyncio.Task[None]] = []
        # Set when a background task (table sync, leases, demand, key and quota reloads) ended
        # with an error it could not handle: the worker then stops and exits non-zero, and its
        # parent starts a fresh one, rather than serving on with tables that no longer update.
        self.failed = asyncio.Event()
        self.sync: RedisTableSync | None = None
        self.leases: LeaseSync | None = None  # cluster-wide tenant limits (auth on, with Redis)
        self.key_load_failures = 0  # PostgreSQL loads that failed (the keys held stay in use)
        self.deployment_claim: str | None = None  # our claim on the Redis prefix, once read

    async def start(self, sock: socket.socket, *, table_wait_s: float = 0.0) -> None:
        """Start the background tasks, then listen. ``table_wait_s`` > 0 (a worker its parent
        restarted, in dynamic mode): listen only once the tables are held, or that long at most."""
        s = self.settings
        gw = self.gateway
        if s.static_mode:
            gw.install_table(static_table(gw, s))
        auth_on = not s.no_auth
        if auth_on and s.database_url:  # with our claim on the prefix: before any table from Redis
            await self._load_keys_once()
        if s.redis_url and (not s.static_mode or auth_on):
            self.sync = RedisTableSync(
                s.redis_url, s.redis_prefix, resync_s=s.table_resync_s, backoff_max_s=s.redis_backoff_max_s,
                on_endpoints=None if s.static_mode else gw.install_endpoints,
                on_keys=gw.install_keys if auth_on else None,
                deployment=lambda: self.deployment_claim,
            )
            self.background(self.sync.run(), "table_sync")
        if s.redis_url and not s.static_mode:
            demand = DemandPublisher(s.redis_url, s.redis_prefix, gw.queues.demand)
            self.background(demand.run(), "demand")
        if auth_on and s.redis_url:
            leases = self.leases = LeaseSync(s.redis_url, s.redis_prefix, gw.tenants, self.loop,
                                             interval_s=s.lease_interval_s, hold_s=s.lease_hold_s)
            gw.metrics.add_lease_state(lambda: (gw.tenants.leasing, gw.tenants.holders, leases.failures))
            self.background(self.leases.run(), "leases")
        if auth_on and s.database_url:
            self.background(self._resync_keys(), "key_reload")
            await self._load_quotas_once()
            self.background(self._resync_quotas(), "quota_reload")
        gw.usage.start()
        self.server.on_tick.append(gw.tick)
        if gw.access_log is not None:
            self.server.on_tick.append(gw.access_log.flush)
        if table_wait_s > 0 and self.sync is not None and not s.static_mode:
            await self._wait_for_tables(table_wait_s)
        await self.server.start(sock)

    def background(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``coro`` for the worker's life; an error that ends it sets :attr:`failed`."""
        task = self.loop.create_task(coro, name=name)
        task.add_done_callback(self._background_ended)
        self._tasks.append(task)

    def _background_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or (exc := task.exception()) is None:
            return
        log.error("background_task_failed", worker=self.index, task=task.get_name(), error=repr(exc)[:500])
        self.failed.set()

    def _holds_tables(self) -> bool:
        gw = self.gateway
        return gw.has_table and (self.settings.no_auth or gw.auth.index.version > 0)

    async def _wait_for_tables(self, timeout: float) -> None:
        """Wait before listening until the endpoint and key tables are held. Until a worker
        listens, the kernel gives new connections to its siblings (SO_REUSEPORT), which hold
        tables; a worker restarted while Redis is away that listened at once would answer 404
        "model does not exist" to its share of the clients. After ``timeout`` it listens anyway
        (and answers 503 with Retry-After while it has no endpoint table): the siblings may be
        gone too, and refusing connections forever would be worse."""
        deadline = self.loop.time() + timeout
        while not self._holds_tables():
            if self.loop.time() >= deadline:
                log.warning("worker_listening_without_tables", worker=self.index, waited_s=timeout)
                return
            await asyncio.sleep(0.02)

    async def _load_keys_once(self) -> bool:
        assert self.settings.database_url is not None
        try:
            table, claim = await load_key_table(self.settings.database_url)
        except (OSError, TimeoutError, Exception) as exc:  # asyncpg raises many types; keep serving
            self.key_load_failures += 1
            log.warning("key_load_failed", error=str(exc) or type(exc).__name__)
            return False
        self.deployment_claim = claim or self.deployment_claim
        self.gateway.install_keys(table, from_db=True)
        return True

    async def _resync_keys(self) -> None:
        while True:
            await asyncio.sleep(self.settings.key_resync_s)
            await self._load_keys_once()

    async def _load_quotas_once(self) -> None:
        assert self.settings.database_url is not None
        try:
            used = await load_month_usage(self.settings.database_url)
        except (OSError, TimeoutError, Exception) as exc:  # keep the last view; local spend keeps adding
            log.warning("quota_load_failed", error=str(exc) or type(exc).__name__)
            return
        gw = self.gateway
        gw.limits.quotas.load(used, gw.usage.unflushed_tokens())

    async def _resync_quotas(self) -> None:
        while True:
            await asyncio.sleep(self.settings.quota_resync_s)
            await self._load_quotas_once()

    async def stop(self) -> None:
        off = self.gateway.offloader
        await self.server.shutdown(self.settings.shutdown_timeout_s, off.drain if off is not None else None)
        if self.leases is not None:
            self.leases.close()
        if self.sync is not None:
            self.sync.close()  # a cancellation alone can be lost inside redis-py (see table_sync)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)  # a failed one has been said
        if self.leases is not None:  # requests have ended: the tenants' budgets go back at once
            await self.leases.release()
        self.gateway.scraper.close()
        for b in self.gateway.backends.values():
            b.pool.close()
        if off is not None:
            off.close()
        await self.gateway.usage.close()
        if self.gateway.access_log is not None:
            self.gateway.access_log.flush()

    @property
    def port(self) -> int:
        return self.server.port


class WorkerFailedError(Exception):
    """A worker stopped because one of its background tasks failed; its process exits 1."""


async def run_worker(settings: GatewaySettings, sock: socket.socket, index: int,
                     on_ready: Callable[[int], None], *, table_wait_s: float = 0.0,
                     spool: UsageSpool | None = None) -> None:
    worker = Worker(settings, index, spool)
    stop = asyncio.Event()
    install_stop_signals(worker.loop, stop.set)  # a second signal exits at once
    await worker.start(sock, table_wait_s=table_wait_s)
    # Everything made at start-up (modules, tables, settings) lives as long as the worker: out of
    # the collector's sight, the full collections that still happen under load scan only what
    # requests made (their pauses land on requests in flight; measured in docs/benchmarks.md).
    gc.collect()
    gc.freeze()
    on_ready(worker.port)
    stopped, failed = (asyncio.ensure_future(e.wait()) for e in (stop, worker.failed))
    await asyncio.wait((stopped, failed), return_when=asyncio.FIRST_COMPLETED)
    for waiter in (stopped, failed):
        waiter.cancel()
    log.info("worker_stopping", worker=index)
    await worker.stop()
    log.info("worker_stopped", worker=index)
    if worker.failed.is_set():
        raise WorkerFailedError(f"worker {index}: a background task failed (see background_task_failed)")
