"""Prometheus metrics of one gateway worker.

Counters and histograms are updated on the hot path through children cached per model (and
per status), created once, never per request. Gauges that describe state (in-flight per
endpoint, scraped queue, table versions and age, model queue length) cost nothing per request:
a custom collector reads them from the live objects when ``/metrics`` is scraped.

Multiprocess: each worker has its own registry and ``/metrics`` answers for the worker that
accepted the connection; every series carries a ``worker`` label, so summing over ``worker``
in PromQL gives the gateway. (prometheus_client's multiprocess mode would make every
increment a file-backed write; we keep the hot path in memory.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.backend import Backend

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0)


class GatewayMetrics:
    def __init__(self, worker: str) -> None:
        self.worker = worker
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter("hpcgate_gateway_requests", "Requests by model and status",
                                 ["worker", "model", "status"], registry=r)
        self._ttft = Histogram("hpcgate_gateway_ttft_seconds", "Time to first byte of the response body",
                               ["worker", "model"], buckets=_LATENCY_BUCKETS, registry=r)
        self._duration = Histogram("hpcgate_gateway_request_duration_seconds", "Request duration",
                                   ["worker", "model"], buckets=_LATENCY_BUCKETS, registry=r)
        self._tokens = Counter("hpcgate_gateway_tokens", "Tokens by model and kind (prompt|completion)",
                               ["worker", "model", "kind"], registry=r)
        self._upstream_errors = Counter("hpcgate_gateway_upstream_errors", "Upstream failures by endpoint",
                                        ["worker", "backend", "kind"], registry=r)
        self._retries = Counter("hpcgate_gateway_retries", "Requests retried on another endpoint",
                                ["worker", "model"], registry=r)
        self._ejections = Counter("hpcgate_gateway_ejections", "Endpoints ejected as outliers",
                                  ["worker", "backend"], registry=r)
        self._req_children: dict[tuple[str, int], Counter] = {}
        self._model_children: dict[str, tuple[Histogram, Histogram, Counter, Counter]] = {}

    def _model(self, model: str) -> tuple[Histogram, Histogram, Counter, Counter]:
        c = self._model_children.get(model)
        if c is None:
            w = self.worker
            c = self._model_children[model] = (
                self._ttft.labels(w, model), self._duration.labels(w, model),
                self._tokens.labels(w, model, "prompt"), self._tokens.labels(w, model, "completion"),
            )
        return c

    def prepare_models(self, models: list[str]) -> None:
        """Build the children of a new table's models off the hot path."""
        for m in models:
            self._model(m)
            self.request_counter(m, 200)

    def request_counter(self, model: str, status: int) -> Counter:
        key = (model, status)
        c = self._req_children.get(key)
        if c is None:
            c = self._req_children[key] = self._requests.labels(self.worker, model, str(status))
        return c

    def observe(self, model: str, status: int, ttft_s: float | None, duration_s: float, *,
                prompt: int, completion: int) -> None:
        self.request_counter(model, status).inc()
        ttft, duration, p, c = self._model(model)
        if ttft_s is not None:
            ttft.observe(ttft_s)
        duration.observe(duration_s)
        if prompt:
            p.inc(prompt)
        if completion:
            c.inc(completion)

    def upstream_error(self, backend: str, kind: str) -> None:
        self._upstream_errors.labels(self.worker, backend, kind).inc()  # rare path

    def retry(self, model: str) -> None:
        self._retries.labels(self.worker, model).inc()

    def ejected(self, backend: str) -> None:
        self._ejections.labels(self.worker, backend).inc()

    def add_state(self, read: Callable[[], StateView]) -> None:
        self.registry.register(_StateCollector(self.worker, read))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StateView:
    """What the state collector reads: filled by the app at scrape time."""

    __slots__ = ("backends", "key_version", "queues", "table_generated_at", "table_version")

    def __init__(self, backends: list[Backend], table_version: int, table_generated_at: float,
                 key_version: int, queues: dict[str, int]) -> None:
        self.backends = backends
        self.table_version = table_version
        self.table_generated_at = table_generated_at
        self.key_version = key_version
        self.queues = queues


class _StateCollector(Collector):
    def __init__(self, worker: str, read: Callable[[], StateView]) -> None:
        self._worker = worker
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        v = self._read()
        w = self._worker
        inflight = GaugeMetricFamily("hpcgate_gateway_endpoint_inflight", "Requests in flight per endpoint",
                                     labels=["worker", "backend"])
        queue = GaugeMetricFamily("hpcgate_gateway_endpoint_queue",
                                  "Engine running+waiting at the last scrape (absent: unknown)",
                                  labels=["worker", "backend"])
        ejected = GaugeMetricFamily("hpcgate_gateway_endpoint_ejected", "1 while the endpoint is ejected",
                                    labels=["worker", "backend"])
        now = time.monotonic()
        for b in v.backends:
            inflight.add_metric([w, b.label], b.inflight)
            if b.queue is not None:
                queue.add_metric([w, b.label], b.queue)
            ejected.add_metric([w, b.label], 1.0 if b.ejected_until > now else 0.0)
        yield inflight
        yield queue
        yield ejected
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
