"""One upstream endpoint as the gateway sees it: pool, load estimate, failures, ejection.

A :class:`Backend` outlives routing tables: tables are rebuilt on every snapshot, but the
backend for the same URL and token is reused, so its pool, in-flight count and scraped load
survive a swap. Its state is mutated only on the event loop of the worker that owns it.

``cache_epoch`` grows whenever what the engine holds in its prefix cache can no longer be
assumed: the engine restarted (its prefix-cache query counter went down) or the backend was
ejected; the cache-aware router (:mod:`gateway.prefix_router`) drops its view of the backend
when it sees a new epoch.
"""

from __future__ import annotations

import asyncio

from gateway.upstream_client import UpstreamPool
from hpcgate.metrics_text import EngineLoad

BackendKey = tuple[str, str | None]  # (base URL, bearer token)


class Backend:
    __slots__ = (
        "auth_line",
        "backlog_at",
        "cache_epoch",
        "ejected_until",
        "ejections",
        "failures",
        "host",
        "host_header",
        "inflight",
        "inflight_at_scrape",
        "kv_capacity",
        "kv_usage",
        "label",
        "models",
        "pool",
        "port",
        "prefill_backlog",
        "prefill_inflight",
        "prefix_hit_rate",
        "prefix_queries",
        "priority",
        "queue",
        "scrape_failures",
        "scraped_at",
        "since_scrape",
        "token",
        "url",
        "waiting",
    )

    def __init__(
        self, url: str, host: str, port: int, token: str | None, pool: UpstreamPool
    ) -> None:
        self.url = url
        self.label = url.removeprefix("http://")  # metric label and access-log "backend"
        self.host = host
        self.port = port
        self.token = token
        self.host_header = f"{host}:{port}".encode()
        self.auth_line = b"authorization: Bearer %b\r\n" % token.encode() if token else b""
        self.pool = pool
        self.models: frozenset[str] = frozenset()  # canonical model names routed here (for wake-ups)
        self.inflight = 0  # requests of this worker on this backend now
        self.priority = False  # the engine honours vLLM's request priority (set by the table)
        self.inflight_at_scrape = 0  # this worker's in-flight requests when the last scrape landed
        self.prefill_inflight = 0.0  # cache-aware: estimated uncached prompt tokens of those
        self.prefill_backlog = 0.0  # cache-aware: the same, drained at the assumed prefill rate
        self.backlog_at = 0.0  # when the backlog was last updated (loop time)
        self.since_scrape = 0  # requests this worker sent since the last successful scrape
        self.queue: float | None = None  # running + waiting at the last scrape; None: unknown
        self.waiting: float | None = None  # of which waiting (not admitted: prefill still ahead)
        self.kv_usage: float | None = None
        self.kv_capacity: int | None = None  # KV-cache tokens (vllm:cache_config_info)
        self.prefix_queries: float | None = None  # the engine's prefix-cache counters at the last scrape
        self.prefix_hit_rate: float | None = None
        self.cache_epoch = 0
        self.scraped_at = -1e18
        self.scrape_failures = 0  # consecutive scrapes that got no metrics (refused, timeout, 5xx)
        self.failures = 0  # consecutive failures
        self.ejections = 0
        self.ejected_until = 0.0

    def record_load(self, load: EngineLoad, now: float) -> None:
        self.queue = load.queue
        self.inflight_at_scrape = self.inflight
        self.waiting = load.waiting
        self.kv_usage = load.kv_usage
        if load.kv_capacity_tokens is not None:
            self.kv_capacity = load.kv_capacity_tokens
        queries = load.prefix_queries
        if queries is not None and self.prefix_queries is not None and queries < self.prefix_queries:
            self.cache_epoch += 1  # a counter went down: the engine restarted with an empty cache
        self.prefix_queries = queries
        self.prefix_hit_rate = load.prefix_hit_rate
        self.scraped_at = now
        self.since_scrape = 0
        self.scrape_failures = 0

    def record_success(self) -> None:
        self.failures = 0
        self.ejections = 0

    def record_failure(self, now: float, threshold: int, base_s: float) -> bool:
        """Count a failure; eject for a while after ``threshold`` in a row. True if ejected now."""
        self.failures += 1
        if self.failures < threshold:
            return False
        self.failures = 0
        self.ejected_until = now + base_s * (1 << min(self.ejections, 4))
        self.ejections += 1
        self.cache_epoch += 1  # whatever it held may be gone when it comes back
        return True


def make_backend(
    url: str, host: str, port: int, token: str | None, *, loop: asyncio.AbstractEventLoop,
    max_idle: int, connect_timeout: float, read_timeout: float,
) -> Backend:
    pool = UpstreamPool(host, port, loop=loop, max_idle=max_idle, connect_timeout=connect_timeout,
                        read_timeout=read_timeout)
    return Backend(url, host, port, token, pool)
