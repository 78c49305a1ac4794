"""Prometheus metrics of a batch runner, read from the runner's live state at scrape time.

``hpcgate_batch_lines_total{result}`` (ok: output file, error: error file), and per model the
backlog of lines still to run in in-progress batches, the lines in flight and the current
concurrency limit (the pacer's). Served on ``batches.metrics_port`` when it is set.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from control.batch.runner import BatchRunner


class _RunnerCollector(Collector):
    def __init__(self, runner: BatchRunner) -> None:
        self.runner = runner

    def collect(self) -> Iterator[Metric]:
        r = self.runner
        lines = CounterMetricFamily("hpcgate_batch_lines", "Batch lines this runner finished",
                                    labels=["result"])
        lines.add_metric(["ok"], r.done_lines)
        lines.add_metric(["error"], r.failed_lines)
        yield lines
        backlog = GaugeMetricFamily("hpcgate_batch_backlog_lines",
                                    "Lines not yet finished in in-progress batches", labels=["model"])
        inflight = GaugeMetricFamily("hpcgate_batch_inflight", "Batch lines in flight from this runner",
                                     labels=["model"])
        limit = GaugeMetricFamily("hpcgate_batch_concurrency_limit",
                                  "This runner's current concurrency limit (backfill pacing)",
                                  labels=["model"])
        for model, n in r.backlog.items():
            backlog.add_metric([model], n)
        for model, pacer in r.pacers.items():
            inflight.add_metric([model], r.inflight.get(model, 0))
            limit.add_metric([model], pacer.limit)
        yield backlog
        yield inflight
        yield limit


def serve_metrics(runner: BatchRunner, host: str, port: int) -> None:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_RunnerCollector(runner))
    start_http_server(port, addr=host, registry=registry)
