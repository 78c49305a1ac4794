"""``GET /metrics`` of the control API: the control plane's state as Prometheus gauges.

The daemons that change this state (Job Worker, Endpoint Worker) are lock-guarded singletons
without an HTTP server; PostgreSQL holds everything they decide, so the API (any replica)
reads it at scrape time with four small queries and exports it. The autoscaler's part (its
last observation of each model, what it held on, its decisions by source and reason) comes from
``ai_model_autoscaling`` (migration 0700), which the autoscaler writes every pass. The alert rules in
``k8s/observability/rules.yaml`` use these names: a model with desired instances and none
ready, jobs pending in Slurm for too long, and requests served while no usage row is written.

Invariants: one scrape is four queries, bounded by the API's database timeout; a database
outage answers 503 like every other route (the scrape fails visibly: ``up == 0``).
"""

from __future__ import annotations

import asyncpg
import msgspec
from litestar import Response, get
from litestar.di import NamedDependency
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from control.store.db import Database

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LIVE_STATES = ("pending", "submitted", "registered", "ready", "draining", "cancelling")

_MODELS_SQL = """
SELECT m.name, m.state, m.desired_instances,
       count(j.*) FILTER (WHERE j.state = 'ready') AS ready,
       count(j.*) FILTER (WHERE j.state IN ('pending', 'submitted')) AS waiting,
       count(j.*) FILTER (WHERE j.state = ANY($1::text[])) AS live,
       COALESCE(EXTRACT(EPOCH FROM now() - min(j.created_at)
                        FILTER (WHERE j.state IN ('pending', 'submitted'))), 0)::float8 AS oldest_waiting_s
  FROM ai_model_configurations m
  LEFT JOIN ai_model_endpoint_jobs j ON j.model_id = m.model_id
 GROUP BY m.model_id
"""
_AUTOSCALER_SQL = """
SELECT m.name, s.signals, s.hold, s.pending_overdue, s.decision_counts,
       EXTRACT(EPOCH FROM now() - s.observed_at)::float8 AS observed_age_s
  FROM ai_model_autoscaling s JOIN ai_model_configurations m USING (model_id)
"""
_SIGNALS = ("queue_time_s", "stalled_s", "waiting", "running", "kv_usage", "held", "oldest_held_s")
_decode = msgspec.json.Decoder()
_USAGE_SQL = "SELECT EXTRACT(EPOCH FROM now() - max(bucket_start))::float8 FROM usage_records"


class _Snapshot(Collector):
    """The families of one scrape, filled before ``generate_latest`` reads them."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


@get("/metrics", summary="Control-plane state for Prometheus (models, jobs, usage)", tags=["discovery"],
     include_in_schema=False)
async def metrics(db: NamedDependency[Database]) -> Response[bytes]:
    async with db.transaction() as conn:
        rows = await conn.fetch(_MODELS_SQL, list(LIVE_STATES))
        usage_age = await conn.fetchval(_USAGE_SQL)
        scaling = await conn.fetch(_AUTOSCALER_SQL)
    instances = GaugeMetricFamily("hpcgate_control_model_instances",
                                  "Instances of a model: desired, ready, waiting (not started yet), live",
                                  labels=["model", "kind"])
    oldest = GaugeMetricFamily("hpcgate_control_job_oldest_waiting_seconds",
                               "Age of the model's oldest job not yet started (pending or submitted)",
                               labels=["model"])
    failed = GaugeMetricFamily("hpcgate_control_model_failed", "1 while the model is marked failed",
                               labels=["model"])
    for r in rows:
        for kind in ("ready", "waiting", "live"):
            instances.add_metric([r["name"], kind], r[kind])
        instances.add_metric([r["name"], "desired"], r["desired_instances"])
        oldest.add_metric([r["name"]], r["oldest_waiting_s"])
        failed.add_metric([r["name"]], 1.0 if r["state"] == "failed" else 0.0)
    families: list[Metric] = [instances, oldest, failed, *_autoscaler_families(scaling)]
    if usage_age is not None:
        usage = GaugeMetricFamily("hpcgate_control_usage_newest_bucket_age_seconds",
                                  "Age of the newest usage bucket any gateway wrote")
        usage.add_metric([], usage_age)
        families.append(usage)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(families))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE)


def _autoscaler_families(rows: list[asyncpg.Record]) -> list[Metric]:
    signal = GaugeMetricFamily("hpcgate_autoscaler_signal",
                               "The autoscaler's last observation of a model (known values only)",
                               labels=["model", "signal"])
    at_max = GaugeMetricFamily("hpcgate_autoscaler_at_max",
                               "1 while the autoscaler would add an instance but the model is at its max",
                               labels=["model"])
    overdue = GaugeMetricFamily("hpcgate_autoscaler_pending_overdue",
                                "1 while a job of the model stays pending past pending_report_s",
                                labels=["model"])
    age = GaugeMetricFamily("hpcgate_autoscaler_observation_age_seconds",
                            "Time since the autoscaler last observed the model", labels=["model"])
    decisions = CounterMetricFamily("hpcgate_autoscaler_decisions",
                                    "Desired-count changes applied, by source and rule",
                                    labels=["model", "source", "reason"])
    for r in rows:
        name = r["name"]
        if r["signals"]:
            values = _decode.decode(r["signals"])
            for key in _SIGNALS:
                if isinstance(values.get(key), (int, float)):
                    signal.add_metric([name, key], float(values[key]))
        if r["observed_age_s"] is not None:
            age.add_metric([name], r["observed_age_s"])
        at_max.add_metric([name], 1.0 if r["hold"] == "at_max" else 0.0)
        overdue.add_metric([name], 1.0 if r["pending_overdue"] else 0.0)
        for key, count in _decode.decode(r["decision_counts"]).items():
            source, _, reason = key.partition(":")
            decisions.add_metric([name, source, reason], float(count))
    return [signal, at_max, overdue, age, decisions]
