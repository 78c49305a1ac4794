"""Micro-benchmark: a routing decision costs the same with 10 or 10,000 endpoints.

``python -m gateway.routing_bench`` builds tables of 10, 1,000 and 10,000 ready endpoints
(10 endpoints per model, scraped loads set), then times ``table.lookup(model)`` + ``choose()``
for random models, and prints one JSON line per table size. The decision is one dict lookup
plus a scan of that model's candidates only, so the time per decision stays flat as the table
grows; the time to build a table (off the hot path, once per snapshot) grows linearly.
"""

from __future__ import annotations

import random
import sys
import time

import orjson

from gateway.backend import Backend
from gateway.balancer import choose
from gateway.routing_table import table_from_snapshot
from gateway.upstream_client import UpstreamPool
from hpcgate.schemas import EndpointEntry, EndpointTable

PER_MODEL = 10


class _NoLoop:
    """Pools are never used here; their constructor only stores the loop."""


def _snapshot(n: int) -> EndpointTable:
    eps = tuple(
        EndpointEntry(endpoint_id=i, model=f"m{i % max(1, n // PER_MODEL)}", url=f"http://n{i}:8000",
                      node=f"n{i}", port=8000, endpoint_job_id=i, ready=True)
        for i in range(n)
    )
    return EndpointTable(version=1, generated_at=time.time(), endpoints=eps)


def run(n: int, decisions: int = 200_000) -> dict[str, float | int]:
    def make(key: tuple[str, str | None], host: str, port: int) -> Backend:
        pool = UpstreamPool(host, port, loop=_NoLoop(), max_idle=1, connect_timeout=1,  # type: ignore[arg-type]
                            read_timeout=1)
        b = Backend(key[0], host, port, key[1], pool)
        b.queue, b.scraped_at = float(random.randrange(8)), 0.0
        return b

    t0 = time.perf_counter()
    table = table_from_snapshot(_snapshot(n), make)
    build_s = time.perf_counter() - t0
    models = [f"m{random.randrange(max(1, n // PER_MODEL))}" for _ in range(1024)]
    t0 = time.perf_counter()
    for i in range(decisions):
        route = table.lookup(models[i & 1023])
        assert route is not None
        choose(route.backends, 0.5, stale_after=3.0)
    per_decision_us = (time.perf_counter() - t0) / decisions * 1e6
    return {"endpoints": n, "models": len(table.models), "candidates_per_model": PER_MODEL,
            "decision_us": round(per_decision_us, 3), "table_build_ms": round(build_s * 1000, 2)}


def main() -> int:
    for n in (10, 1_000, 10_000):
        sys.stdout.write(orjson.dumps(run(n)).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
