"""Prometheus metrics of one gateway worker.

The per-request counters and histograms are plain integers in per-model objects created with
the table (one dict lookup and a bisect per request, no lock: a worker is one thread), exported
by a collector at scrape time; prometheus_client's own metric objects take a lock per update
and cost several times more. Rare events (upstream errors, retries, ejections) use ordinary
prometheus_client counters. Gauges that describe state (in-flight per
endpoint, scraped queue, table versions and age, model queue length) cost nothing per request:
a custom collector reads them from the live objects when ``/metrics`` is scraped.

Multiprocess: each worker has its own registry and ``/metrics`` answers for the worker that
accepted the connection; every series carries a ``worker`` label, so summing over ``worker``
in PromQL gives the gateway. (prometheus_client's multiprocess mode would make every
increment a file-backed write; we keep the hot path in memory.)
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.backend import Backend
from gateway.prefix_router import PrefixRouter

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0)


class _Hist:
    """A histogram for one event loop: plain ints, no lock (prometheus_client's take a lock)."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(_LATENCY_BUCKETS) + 1)  # last: above the largest bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(_LATENCY_BUCKETS, value)] += 1
        self.sum += value


class _ModelStats:
    __slots__ = ("completion", "duration", "prompt", "statuses", "ttft")

    def __init__(self) -> None:
        self.ttft = _Hist()
        self.duration = _Hist()
        self.prompt = 0
        self.completion = 0
        self.statuses: dict[int, int] = {}


class GatewayMetrics:
    def __init__(self, worker: str) -> None:
        self.worker = worker
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._upstream_errors = Counter("hpcgate_gateway_upstream_errors", "Upstream failures by endpoint",
                                        ["worker", "backend", "kind"], registry=r)
        self._retries = Counter("hpcgate_gateway_retries", "Requests retried on another endpoint",
                                ["worker", "model"], registry=r)
        self._ejections = Counter("hpcgate_gateway_ejections", "Endpoints ejected as outliers",
                                  ["worker", "backend"], registry=r)
        self._auth_refused = Counter("hpcgate_gateway_auth_rate_limited",
                                     "Requests refused (429) from addresses with too many failed API keys",
                                     ["worker"], registry=r)
        self.auth_refused = self._auth_refused.labels(worker)
        self._models: dict[str, _ModelStats] = {}
        r.register(_RequestCollector(worker, self._models))

    def prepare_models(self, models: list[str]) -> None:
        """Create the per-model series of a new table off the hot path."""
        for m in models:
            if m not in self._models:
                self._models[m] = _ModelStats()

    def observe(self, model: str, status: int, ttft_s: float | None, duration_s: float, *,
                prompt: int, completion: int) -> None:
        stats = self._models.get(model)
        if stats is None:
            stats = self._models[model] = _ModelStats()
        statuses = stats.statuses
        statuses[status] = statuses.get(status, 0) + 1
        if ttft_s is not None:
            stats.ttft.observe(ttft_s)
        stats.duration.observe(duration_s)
        stats.prompt += prompt
        stats.completion += completion

    def upstream_error(self, backend: str, kind: str) -> None:
        self._upstream_errors.labels(self.worker, backend, kind).inc()  # rare path

    def retry(self, model: str) -> None:
        self._retries.labels(self.worker, model).inc()

    def ejected(self, backend: str) -> None:
        self._ejections.labels(self.worker, backend).inc()

    def add_state(self, read: Callable[[], StateView]) -> None:
        self.registry.register(_StateCollector(self.worker, read))

    def add_lease_state(self, read: Callable[[], tuple[bool, int, int]]) -> None:
        """Tenant-limit leases: ``read()`` -> (leased from Redis now, holders, failed syncs)."""
        self.registry.register(_LeaseCollector(self.worker, read))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RequestCollector(Collector):
    """Exports the hot-path counters and histograms, read at scrape time."""

    def __init__(self, worker: str, models: dict[str, _ModelStats]) -> None:
        self._worker = worker
        self._models = models

    def collect(self) -> Iterator[Metric]:
        w = self._worker
        requests = CounterMetricFamily("hpcgate_gateway_requests", "Requests by model and status",
                                       labels=["worker", "model", "status"])
        tokens = CounterMetricFamily("hpcgate_gateway_tokens",
                                     "Tokens by model and kind (prompt|completion)",
                                     labels=["worker", "model", "kind"])
        ttft = HistogramMetricFamily("hpcgate_gateway_ttft_seconds",
                                     "Time to first byte of the response body", labels=["worker", "model"])
        duration = HistogramMetricFamily("hpcgate_gateway_request_duration_seconds", "Request duration",
                                         labels=["worker", "model"])
        for model, st in list(self._models.items()):
            for status, n in list(st.statuses.items()):
                requests.add_metric([w, model, str(status)], n)
            tokens.add_metric([w, model, "prompt"], st.prompt)
            tokens.add_metric([w, model, "completion"], st.completion)
            for family, hist in ((ttft, st.ttft), (duration, st.duration)):
                cumulative = 0
                buckets: list[tuple[str, float]] = []
                for bound, n in zip((*map(str, _LATENCY_BUCKETS), "+Inf"), hist.counts, strict=True):
                    cumulative += n
                    buckets.append((bound, cumulative))
                family.add_metric([w, model], buckets, hist.sum)
        yield requests
        yield tokens
        yield ttft
        yield duration


class _LeaseCollector(Collector):
    def __init__(self, worker: str, read: Callable[[], tuple[bool, int, int]]) -> None:
        self._worker = worker
        self._read = read

    def collect(self) -> Iterator[Metric]:
        leased, holders, failures = self._read()
        w = [self._worker]
        g = GaugeMetricFamily("hpcgate_gateway_tenant_limits_leased",
                              "1 while tenant limits are leased from Redis, 0 on a local share (fallback)",
                              labels=["worker"])
        g.add_metric(w, 1.0 if leased else 0.0)
        yield g
        h = GaugeMetricFamily("hpcgate_gateway_tenant_limit_holders",
                              "Worker processes sharing the tenant limits, as Redis last reported",
                              labels=["worker"])
        h.add_metric(w, holders)
        yield h
        c = CounterMetricFamily("hpcgate_gateway_tenant_lease_failures", "Lease syncs with Redis that failed",
                                labels=["worker"])
        c.add_metric(w, failures)
        yield c


class StateView:
    """What the state collector reads: filled by the app at scrape time."""

    __slots__ = ("backends", "key_version", "prefix_router", "queues", "stream_relay", "table_generated_at",
                 "table_version")

    def __init__(self, backends: list[Backend], table_version: int, table_generated_at: float,
                 key_version: int, queues: dict[str, int], *, stream_relay: str,
                 prefix_router: PrefixRouter | None = None) -> None:
        self.prefix_router = prefix_router
        self.stream_relay = stream_relay
        self.backends = backends
        self.table_version = table_version
        self.table_generated_at = table_generated_at
        self.key_version = key_version
        self.queues = queues


class _StateCollector(Collector):
    def __init__(self, worker: str, read: Callable[[], StateView]) -> None:
        self._worker = worker
        self._read = read

    def collect(self) -> Iterator[Metric]:
        v = self._read()
        w = self._worker
        inflight = GaugeMetricFamily("hpcgate_gateway_endpoint_inflight", "Requests in flight per endpoint",
                                     labels=["worker", "backend"])
        queue = GaugeMetricFamily("hpcgate_gateway_endpoint_queue",
                                  "Engine running+waiting at the last scrape (absent: unknown)",
                                  labels=["worker", "backend"])
        ejected = GaugeMetricFamily("hpcgate_gateway_endpoint_ejected", "1 while the endpoint is ejected",
                                    labels=["worker", "backend"])
        hit_rate = GaugeMetricFamily("hpcgate_gateway_endpoint_prefix_cache_hit_ratio",
                                     "The engine's own prefix-cache hit ratio (hit/queried tokens since it "
                                     "started) at the last scrape (absent: not reported)",
                                     labels=["worker", "backend"])
        now = time.monotonic()
        router = v.prefix_router
        index = GaugeMetricFamily("hpcgate_gateway_prefix_index_blocks",
                                  "Prompt blocks the cache-aware router believes the endpoint holds",
                                  labels=["worker", "backend"])
        for b in v.backends:
            inflight.add_metric([w, b.label], b.inflight)
            if b.queue is not None:
                queue.add_metric([w, b.label], b.queue)
            ejected.add_metric([w, b.label], 1.0 if b.ejected_until > now else 0.0)
            if b.prefix_hit_rate is not None:
                hit_rate.add_metric([w, b.label], b.prefix_hit_rate)
            if router is not None:
                index.add_metric([w, b.label], router.blocks(b))
        yield inflight
        yield queue
        yield ejected
        yield hit_rate
        if router is not None:
            yield index
            for name, doc, value in (
                ("hpcgate_gateway_prefix_index_query_tokens", "Estimated prompt tokens routed cache-aware",
                 router.query_tokens),
                ("hpcgate_gateway_prefix_index_hit_tokens", "Of those, the part the router expected the "
                 "chosen endpoint to hold in its prefix cache", router.hit_tokens),
                ("hpcgate_gateway_prefix_index_evictions",
                 "Blocks dropped from the router's per-endpoint LRU", router.evictions),
            ):
                counter = CounterMetricFamily(name, doc, labels=["worker"])
                counter.add_metric([w], value)
                yield counter
        tv = GaugeMetricFamily("hpcgate_gateway_table_version", "Version of the endpoint table held",
                               labels=["worker"])
        tv.add_metric([w], v.table_version)
        yield tv
        age = GaugeMetricFamily("hpcgate_gateway_table_age_seconds", "Age of the endpoint table held",
                                labels=["worker"])
        age.add_metric([w], max(0.0, time.time() - v.table_generated_at) if v.table_generated_at else 0.0)
        yield age
        kv = GaugeMetricFamily("hpcgate_gateway_key_table_version", "Version of the key table held",
                               labels=["worker"])
        kv.add_metric([w], v.key_version)
        yield kv
        q = GaugeMetricFamily("hpcgate_gateway_model_queue", "Requests waiting for a saturated model",
                              labels=["worker", "model"])
        for model, n in v.queues.items():
            q.add_metric([w, model], n)
        yield q
        relay = GaugeMetricFamily("hpcgate_gateway_stream_relay",
                                  "1 for the relay that carries this worker's committed streams (c: the C "
                                  "relay thread, event-loop: Python)", labels=["worker", "relay"])
        relay.add_metric([w, v.stream_relay], 1.0)
        yield relay
