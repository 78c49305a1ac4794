"""Micro-benchmark: a routing decision costs the same with 10 or 10,000 endpoints.

``python -m gateway.routing_bench`` builds tables of 10, 1,000 and 10,000 ready endpoints
(10 endpoints per model, scraped loads set), then times ``table.lookup(model)`` + ``choose()``
for random models, and prints one JSON line per table size. The decision is one dict lookup
plus a scan of that model's candidates only, so the time per decision stays flat as the table
grows; the time to build a table (off the hot path, once per snapshot) grows linearly.

``python -m gateway.routing_bench --prefix`` times what cache-aware routing adds to a request
(:mod:`gateway.prefix_router`: naming the prompt's blocks, the per-instance lookups, recording
the choice) at a 16 KiB prompt among 4 and 10 instances with a warm index (multi-turn
conversations whose history grows to 16 KiB), against the least-queue choice on the same
backends, each decision timed on its own, in CPU time of the thread (the cost itself) and in
wall time (which also holds whatever else the machine ran meanwhile); it prints p50 and p99
and the p99 added.
"""

from __future__ import annotations

import random
import sys
import time

import orjson

from gateway.backend import Backend
from gateway.balancer import choose
from gateway.prefix_router import PrefixRouter
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


def _backends(n: int) -> tuple[Backend, ...]:
    out = []
    for i in range(n):
        pool = UpstreamPool(f"n{i}", 8000, loop=_NoLoop(), max_idle=1, connect_timeout=1,  # type: ignore[arg-type]
                            read_timeout=1)
        b = Backend(f"http://n{i}:8000", f"n{i}", 8000, None, pool)
        b.queue, b.scraped_at, b.kv_capacity = float(random.randrange(8)), 0.0, 4_000_000
        out.append(b)
    return tuple(out)


def _conversations(count: int, prompt_bytes: int) -> list[bytes]:
    """The last turn of ``count`` conversations, each ``prompt_bytes`` of messages JSON; the
    index is warmed with their earlier turns."""
    out = []
    for c in range(count):
        messages = [{"role": "system", "content": f"conversation {c}: you answer questions about HPC."}]
        body = orjson.dumps(messages)
        t = 0
        while len(body) < prompt_bytes:
            role = "user" if t % 2 == 0 else "assistant"
            messages.append({"role": role, "content": f"turn {t} " + "words of the conversation " * 40})
            body = orjson.dumps(messages)
            t += 1
        out.append(body[:prompt_bytes - 1] + b"]")
    return out


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6, 2)


def run_prefix(candidates: int, prompt_bytes: int = 16 * 1024,
               decisions: int = 20_000) -> dict[str, str | float | int]:
    backends = _backends(candidates)
    router = PrefixRouter()
    prompts = _conversations(200, prompt_bytes)
    for raw in prompts:  # warm: every conversation has been routed before (its earlier turns)
        for cut in range(4096, len(raw), 4096):
            key = router.key(raw[:cut], "m", 1)
            router.record(router.choose(backends, key, 0.5, stale_after=3.0) or backends[0], key, 0.5)
    out: dict[str, str | float | int] = {"policy": "cache-aware", "prompt_bytes": prompt_bytes,
                                   "candidates": candidates}
    # CPU time of this thread (what a decision costs) and wall time (what a shared machine adds)
    for name, clock in (("cpu", time.thread_time), ("wall", time.perf_counter)):
        cache_aware: list[float] = []
        least: list[float] = []
        for i in range(decisions):
            raw = prompts[i % len(prompts)]
            t0 = clock()
            key = router.key(raw, "m", 1)
            router.record(router.choose(backends, key, 0.5, stale_after=3.0) or backends[0], key, 0.5)
            t1 = clock()
            choose(backends, 0.5, stale_after=3.0)
            t2 = clock()
            cache_aware.append(t1 - t0)
            least.append(t2 - t1)
        out |= {f"{name}_cache_aware_p50_us": _pct(cache_aware, 0.5),
                f"{name}_cache_aware_p99_us": _pct(cache_aware, 0.99),
                f"{name}_least_queue_p99_us": _pct(least, 0.99),
                f"{name}_added_p99_us": round(_pct(cache_aware, 0.99) - _pct(least, 0.99), 2)}
    out["estimated_hit_ratio"] = round(router.hit_tokens / max(1, router.query_tokens), 3)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--prefix" in args:
        for n in (4, 10):
            sys.stdout.write(orjson.dumps(run_prefix(n)).decode() + "\n")
        return 0
    for n in (10, 1_000, 10_000):
        sys.stdout.write(orjson.dumps(run(n)).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
