"""``hpcgate bench autoscale``: reaction time of the autoscaler, overload to new instance serving.

Starts a stack of its own (fresh database, own Redis prefix, temporary data dir): control api,
Endpoint Worker, Job Worker (``--launcher local``, or ``slurm``: the project's private
single-node cluster, started or reused as ``hpcgate up`` does), autoscaler and one gateway
worker. One model runs
on simulated engines with a GPU-like pace and ``--max-num-seqs`` sequences at a time (min 1,
max 2, desired 1). Once its instance is ready, ``--clients`` closed-loop clients send requests
through the gateway: the overload starts. The run ends when the second instance has served a
request. Phases, from the database's timestamps and the new engine's own ``/metrics``:

- detection: overload start → the autoscaler's decision (its row in the history);
- submit: decision → the Job Worker submitted the job (``submitted_at``);
- start: submitted → the job registered its port (``registered_at``: process started);
- ready: registered → first 200 from ``/health`` (``ready_at``);
- routed: ready → the new engine has run a request that came through the gateway.

The autoscaler's windows are command-line options (default: the paper's 5 s for 30 s, a 5 s
pass); they are written into the result with everything else. A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from bench.bench_db import ADMIN_DSN
from bench.scaling_stack import rows, scaling_stack
from hpcgate.metrics_text import parse_engine_load

MODEL = "autoscale-bench"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("autoscale", help="autoscaler reaction time: overload to a new instance serving")
    p.add_argument(
        "--admin-dsn", default=ADMIN_DSN, help="PostgreSQL server (a database is created and dropped)"
    )
    p.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/0",
        help="Redis server (keys under a prefix of the run's own)",
    )
    p.add_argument("--clients", type=int, default=16, help="concurrent closed-loop clients (default 16)")
    p.add_argument("--max-num-seqs", type=int, default=2, help="engine batch size of the sim (default 2)")
    p.add_argument("--threshold-s", type=float, default=5.0, help="scale_up_queue_time_s (default 5)")
    p.add_argument("--sustain-s", type=float, default=30.0, help="scale_up_sustain_s (default 30)")
    p.add_argument("--window-s", type=float, default=30.0, help="queue_time_window_s (default 30)")
    p.add_argument("--interval-s", type=float, default=5.0, help="autoscaler pass interval (default 5)")
    p.add_argument(
        "--launcher",
        choices=("local", "slurm"),
        default="local",
        help="local processes (default) or the project's single-node Slurm cluster",
    )
    p.add_argument("--timeout-s", type=float, default=300.0, help="give up after this long")
    p.add_argument("--result-file", help="where to write the JSON result")


_JOBS = """SELECT j.endpoint_job_id, extract(epoch FROM j.created_at)::float8 AS created,
                  extract(epoch FROM j.submitted_at)::float8 AS submitted,
                  extract(epoch FROM j.registered_at)::float8 AS registered,
                  extract(epoch FROM j.ready_at)::float8 AS ready, e.node, e.port, e.bearer_token
             FROM ai_model_endpoint_jobs j LEFT JOIN ai_model_endpoints e USING (endpoint_job_id)
            ORDER BY j.endpoint_job_id"""
_DECISIONS = """SELECT extract(epoch FROM decided_at)::float8 AS at, from_instances, to_instances, reason
                  FROM ai_model_scaling_decisions ORDER BY decision_id"""


async def _served(http: httpx.AsyncClient, job: asyncpg.Record) -> bool:
    """The engine has run a request (running now, or finished one)."""
    try:
        r = await http.get(
            f"http://{job['node']}:{job['port']}/metrics",
            headers={"authorization": f"Bearer {job['bearer_token']}"},
        )
    except httpx.HTTPError:
        return False
    if parse_engine_load(r.content).running:
        return True
    done = [
        line.rpartition(b" ")[2]
        for line in r.content.splitlines()
        if line.startswith(b"vllm:request_success_total")
    ]
    return any(float(v) > 0 for v in done)


async def _clients(url: str, key: str, n: int, stop: asyncio.Event) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 60,
        "ignore_eos": True,
    }

    async def one(http: httpx.AsyncClient) -> None:
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError):
                await http.post(
                    f"{url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
                )

    async with httpx.AsyncClient(timeout=60) as http:
        tasks = [asyncio.ensure_future(one(http)) for _ in range(n)]
        await stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    env = {
        "HPCGATE_AUTOSCALER_INTERVAL_S": str(args.interval_s),
        "HPCGATE_AUTOSCALER_SCALE_UP_QUEUE_TIME_S": str(args.threshold_s),
        "HPCGATE_AUTOSCALER_SCALE_UP_SUSTAIN_S": str(args.sustain_s),
        "HPCGATE_AUTOSCALER_QUEUE_TIME_WINDOW_S": str(args.window_s),
    }
    stop = asyncio.Event()
    async with scaling_stack(
        admin_dsn=args.admin_dsn, redis_url=args.redis_url, launcher=args.launcher, label="autoscale", env=env
    ) as stack:
        await stack.start_autoscaler({})
        await stack.admin(
            "POST",
            "/admin/models",
            {
                "name": MODEL,
                "min_instances": 1,
                "max_instances": 2,
                "desired_instances": 1,
                "slurm_resources": {"sim_profile": "paced", "sim_max_num_seqs": args.max_num_seqs},
            },
        )
        await stack.wait_ready(MODEL, 1, args.timeout_s)
        deadline = time.monotonic() + args.timeout_s
        t0 = time.time()
        driver = asyncio.ensure_future(_clients(stack.gateway_url, stack.key, args.clients, stop))
        try:
            served_at = None
            async with httpx.AsyncClient(timeout=5) as http:
                while served_at is None:
                    if time.monotonic() > deadline:
                        raise TimeoutError("no second instance served within --timeout-s")
                    jobs = await rows(stack.dsn, _JOBS)
                    if len(jobs) > 1 and jobs[1]["ready"] is not None and await _served(http, jobs[1]):
                        served_at = time.time()
                    await asyncio.sleep(0.1)
        finally:
            stop.set()
            await driver
        [decision, *_] = await rows(stack.dsn, _DECISIONS)
    job = jobs[1]
    phases = {
        "detection_s": decision["at"] - t0,
        "submit_s": job["submitted"] - decision["at"],
        "start_s": job["registered"] - job["submitted"],
        "ready_s": job["ready"] - job["registered"],
        "routed_s": served_at - job["ready"],
        "total_s": served_at - t0,
    }
    return {
        "benchmark": "autoscale-reaction",
        "launcher": args.launcher,
        "engine": "hpcgate sim (paced)",
        "settings": {
            k: getattr(args, k)
            for k in ("clients", "max_num_seqs", "threshold_s", "sustain_s", "window_s", "interval_s")
        },
        "decision": f"{decision['from_instances']} -> {decision['to_instances']} ({decision['reason']})",
        "phases": {k: round(v, 2) for k, v in phases.items()},
        "machine": os.uname().nodename,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def cmd_autoscale(args: argparse.Namespace, results_dir: str) -> int:
    doc = asyncio.run(measure(args))
    print(json.dumps(doc, indent=1))
    path = Path(args.result_file or Path(results_dir) / f"autoscale-{time.strftime('%Y%m%dT%H%M%S')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    print(f"results: {path}")
    return 0
