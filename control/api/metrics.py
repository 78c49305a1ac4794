"""``GET /metrics`` of the control API: the control plane's state as Prometheus gauges.

The daemons that change this state (Job Worker, Endpoint Worker) are lock-guarded singletons
without an HTTP server; PostgreSQL holds everything they decide, so the API (any replica)
reads it at scrape time with three small aggregate queries and exports it. The alert rules in
``k8s/observability/rules.yaml`` use these names: a model with desired instances and none
ready, jobs pending in Slurm for too long, and requests served while no usage row is written.

Invariants: one scrape is three queries, bounded by the API's database timeout; a database
outage answers 503 like every other route (the scrape fails visibly: ``up == 0``).
"""

from __future__ import annotations

from litestar import Response, get
from litestar.di import NamedDependency
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
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
_USAGE_SQL = "SELECT EXTRACT(EPOCH FROM now() - max(bucket_start))::float8 FROM usage_records"


class _Snapshot(Collector):
    """The families of one scrape, filled before ``generate_latest`` reads them."""

    def __init__(self, families: list[GaugeMetricFamily]) -> None:
        self._families = families

    def collect(self) -> list[GaugeMetricFamily]:
        return self._families


@get("/metrics", summary="Control-plane state for Prometheus (models, jobs, usage)", tags=["discovery"],
     include_in_schema=False)
async def metrics(db: NamedDependency[Database]) -> Response[bytes]:
    async with db.transaction() as conn:
        rows = await conn.fetch(_MODELS_SQL, list(LIVE_STATES))
        usage_age = await conn.fetchval(_USAGE_SQL)
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
    families = [instances, oldest, failed]
    if usage_age is not None:
        usage = GaugeMetricFamily("hpcgate_control_usage_newest_bucket_age_seconds",
                                  "Age of the newest usage bucket any gateway wrote")
        usage.add_metric([], usage_age)
        families.append(usage)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(families))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE)
