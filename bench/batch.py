"""``hpcgate bench batch``: the batch machinery against the engines' capacity, and backfill.

One run, one stack on this machine: a fresh PostgreSQL database, one simulator (profile
``paced`` with ``--max-num-seqs 64`` by default: 20 ms per step, so the engine, not the CPU, is
the bottleneck at 64 x 50 = 3,200 tokens/s), the control API, a gateway (keys from PostgreSQL,
``endpoint_max_inflight`` = the engine's slots, so requests beyond them wait in the gateway's
model queue, where batch requests come after interactive ones) and one batch runner (a
subprocess; it scrapes the simulator's queue through a registered endpoint row). Three phases:

1. **direct**: ``hpcgate bench run``'s driver saturates the engine through the gateway
   (chat, ``--direct-requests`` requests at the engine's slot count): output tokens/s.
2. **batch**: a ``--lines``-line batch of the same requests (prompt and output length), uploaded
   through the gateway (``/v1/files``, ``/v1/batches``) and run by the runner: output tokens /
   (finalizing_at - in_progress_at), its ratio to the direct throughput, and the runner's CPU seconds per 1000
   lines.
3. **backfill**: a light interactive load (``--interactive-requests`` at ``--interactive-rate``
   req/s) alone, then again while a second batch runs: TTFT p50/p99 of both, their ratio.

Read the results as ratios measured in one run (the machine is shared), never as absolute times.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import httpx

from bench.bench_db import ADMIN_DSN, create_database, drop_database
from bench.sim.textgen import make_prompt
from hpcgate.schemas import hash_api_key, key_prefix, new_api_key

if TYPE_CHECKING:  # the bench extra (numpy, psutil) is imported when the command runs
    from bench import procs
    from bench.workload import Workload

MODEL = "bench-batch"
SECRET = "bench-batch-key-secret"
ADMIN = "bench-batch-admin"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("batch", help="a batch of N lines vs a direct run at the engines' capacity, "
                                     "and interactive TTFT with and without a batch (backfill)")
    p.add_argument("--lines", type=int, default=10_000, help="lines of the measured batch (default 10000)")
    p.add_argument("--backfill-lines", type=int, default=3000,
                   help="lines of the batch running under the interactive load (default 3000)")
    p.add_argument("--direct-requests", type=int, default=2000,
                   help="requests of the direct run (default 2000)")
    p.add_argument("--prompt-tokens", type=int, default=64,
                   help="prompt length of every request (default 64)")
    p.add_argument("--output-tokens", type=int, default=8, help="output length of every request (default 8)")
    p.add_argument("--slots", type=int, default=64, help="the simulator's --max-num-seqs (default 64)")
    p.add_argument("--interactive-requests", type=int, default=200,
                   help="requests of the interactive load (default 200)")
    p.add_argument("--interactive-rate", type=float, default=10.0, help="req/s (default 10)")
    p.add_argument("--waiting-tolerance", type=float,
                   help="the runner's batches.waiting_tolerance (default: the runner's default)")
    p.add_argument("--admin-dsn", default=ADMIN_DSN,
                   help="where to create (and drop) the run's database")
    p.add_argument("--result-file", help="where to write the JSON results")


def _workload(n: int, prompt: int, out: int, name: str) -> Workload:
    from bench.workload import Workload

    return Workload(name=name, source=f"{n} x ({prompt} prompt, {out} output tokens)",
                    prompt_lens=[prompt] * n, output_lens=[out] * n)


def _lines(n: int, prompt: int, out: int, tag: str) -> bytes:
    return b"".join(json.dumps({
        "custom_id": f"{tag}-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": MODEL, "max_completion_tokens": out, "ignore_eos": True,
                 "messages": [{"role": "user", "content": make_prompt(prompt, offset=i)}]},
    }).encode() + b"\n" for i in range(n))


async def _seed(dsn: str, sim: procs.Child) -> str:
    """A tenant with a key, the model, and the simulator as its registered, ready endpoint (the
    runner scrapes the queue of the endpoints it finds in PostgreSQL)."""
    key = new_api_key()
    conn = await asyncpg.connect(dsn)
    try:
        tenant = await conn.fetchval(
            "INSERT INTO identity_tenants (name) VALUES ('bench') RETURNING tenant_id")
        await conn.execute("INSERT INTO identity_tenant_authentications (tenant_id, key_prefix, key_hash) "
                           "VALUES ($1, $2, $3)", tenant, key_prefix(key), hash_api_key(SECRET.encode(), key))
        model = await conn.fetchval("INSERT INTO ai_model_configurations (name, max_instances, "
                                    "desired_instances)"
                                    " VALUES ($1, 1, 0) RETURNING model_id", MODEL)
        job = await conn.fetchval(
            """INSERT INTO ai_model_endpoint_jobs (model_id, generation, launcher, state,
                                                   registration_token_hash, registration_expires_at)
               VALUES ($1, 1, 'local', 'ready', $2, now()) RETURNING endpoint_job_id""", model, bytes(32))
        await conn.execute(
            """INSERT INTO ai_model_endpoints (endpoint_job_id, model_id, node, port, bearer_token, ready_at)
               VALUES ($1, $2, $3, $4, 'none', now())""", job, model, sim.host, sim.port)
    finally:
        await conn.close()
    return key


async def _start(args: list[str], env: dict[str, str], ready: str, log: Path) -> asyncio.subprocess.Process:
    """A daemon whose readiness is a URL answering 200 (or, for the runner, a log line)."""
    fh = log.open("wb")
    proc = await asyncio.create_subprocess_exec(*args, stdout=fh, stderr=fh, env=env, start_new_session=True)
    fh.close()
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(f"{args[1:3]} exited: {_tail(log)}")
            if ready.startswith("http"):
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(ready, timeout=1)).status_code == 200:
                        return proc
            elif ready in _tail(log, None):
                return proc
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{args[1:3]} not ready: {_tail(log)}")


def _tail(log: Path, chars: int | None = 800) -> str:
    text = log.read_text(errors="replace")
    return text if chars is None else text[-chars:]


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _start_batch(client: httpx.AsyncClient, data: bytes) -> str:
    """Upload and create (the SDK's calls, made with httpx: the bench extra has no SDK)."""
    r = await client.post("/v1/files", files={"file": ("bench.jsonl", data)}, data={"purpose": "batch"})
    r.raise_for_status()
    create = {"input_file_id": r.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    r = await client.post("/v1/batches", json=create)
    r.raise_for_status()
    return str(r.json()["id"])


async def _wait_batch(client: httpx.AsyncClient, batch_id: str, *,
                      until_done: int | None = None) -> dict[str, Any]:
    """Poll until the batch ends (or, with ``until_done``, until that many lines are done)."""
    while True:
        batch: dict[str, Any] = (await client.get(f"/v1/batches/{batch_id}")).json()
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            return batch
        if until_done is not None and batch["request_counts"]["completed"] >= until_done:
            return batch
        await asyncio.sleep(0.2)


async def _run_batch(client: httpx.AsyncClient, data: bytes) -> dict[str, Any]:
    return await _wait_batch(client, await _start_batch(client, data))


async def run(a: argparse.Namespace) -> dict[str, Any]:
    import psutil  # type: ignore[import-untyped]

    from bench import procs
    from bench.driver import RunSettings, git_commit, machine, run_benchmark

    work = Path(tempfile.mkdtemp(prefix="hpcgate-bench-batch-"))
    name, dsn = await create_database(a.admin_dsn, "batch")
    token = secrets.token_urlsafe(24)
    hpcgate = procs.HPCGATE
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("HPCGATE_")}
    base_env.update(HPCGATE_DATABASE_URL=dsn, HPCGATE_KEY_HASH_SECRET=SECRET, HPCGATE_ADMIN_TOKEN=ADMIN,
                    HPCGATE_INTERNAL_TOKEN=token, HPCGATE_BATCH_DIR=str(work / "files"),
                    HPCGATE_LOG_LEVEL="warning")
    api_port, gw_port = procs.free_port(), procs.free_port()
    sim = await procs.start_sim("paced", MODEL, "--max-num-seqs", str(a.slots))
    started: list[asyncio.subprocess.Process] = []
    client: httpx.AsyncClient | None = None
    try:
        key = await _seed(dsn, sim)
        started.append(await _start([hpcgate, "control", "api", "--port", str(api_port)], base_env,
                                    f"http://127.0.0.1:{api_port}/health", work / "api.log"))
        started.append(await _start(
            [hpcgate, "gateway", "--port", str(gw_port), "--static-endpoint", f"{MODEL}={sim.url}"],
            {**base_env, "HPCGATE_GATEWAY_BATCH_API_URL": f"http://127.0.0.1:{api_port}",
             "HPCGATE_GATEWAY_ENDPOINT_MAX_INFLIGHT": str(a.slots), "HPCGATE_GATEWAY_QUEUE_MAX": "100000",
             "HPCGATE_GATEWAY_QUEUE_TIMEOUT_S": "600", "HPCGATE_GATEWAY_ACCESS_LOG": "false"},
            f"http://127.0.0.1:{gw_port}/health", work / "gateway.log"))
        gw = f"http://127.0.0.1:{gw_port}"
        runner = await _start([hpcgate, "control", "batches", "--log-level", "info"],
                              {**base_env, "HPCGATE_BATCHES_GATEWAY_URL": gw, "HPCGATE_BATCHES_POLL_S": "0.2",
                               "HPCGATE_BATCHES_MAX_CONCURRENCY": str(2 * a.slots),
                               "HPCGATE_BATCHES_CONTROL_STEP_S": "0.5",
                               **({"HPCGATE_BATCHES_WAITING_TOLERANCE": str(a.waiting_tolerance)}
                                  if a.waiting_tolerance is not None else {})},
                              "batch_runner_started", work / "runner.log")
        started.append(runner)
        client = httpx.AsyncClient(base_url=gw, headers={"authorization": f"Bearer {key}"}, timeout=600)
        common = dict(base_url=gw, model=MODEL, endpoint="chat", ignore_eos=True, api_key=key)

        # 1. direct: saturate the engine through the gateway
        await run_benchmark(RunSettings(**common, num_prompts=a.slots, max_concurrency=a.slots,  # type: ignore[arg-type]
                                        label="warm-up"), _workload(a.slots, a.prompt_tokens, 1, "warm-up"),
                            progress=False)
        direct = await run_benchmark(RunSettings(**common, num_prompts=a.direct_requests,  # type: ignore[arg-type]
                                                 max_concurrency=a.slots, label="direct"),
                                     _workload(a.direct_requests, a.prompt_tokens, a.output_tokens, "direct"),
                                     progress=False)
        dm = direct["metrics"]
        assert isinstance(dm, dict)
        print(f"[batch] direct: {dm['output_throughput']:.0f} output tokens/s", flush=True)

        # 2. the batch alone
        runner_ps = psutil.Process(runner.pid)
        cpu0 = sum(runner_ps.cpu_times()[:2])
        batch = await _run_batch(client, _lines(a.lines, a.prompt_tokens, a.output_tokens, "b"))
        cpu = sum(runner_ps.cpu_times()[:2]) - cpu0
        conn = await asyncpg.connect(dsn)
        try:
            span = await conn.fetchval("SELECT extract(epoch FROM finalizing_at - in_progress_at) "
                                       "FROM batches WHERE batch_id = $1", batch["id"])
        finally:
            await conn.close()
        tokens = batch["usage"]["output_tokens"]
        batch_tps = tokens / float(span)
        print(f"[batch] {a.lines} lines: {batch['status']}, {span:.1f} s, {batch_tps:.0f} output tokens/s "
              f"({batch_tps / dm['output_throughput']:.2f} of direct), runner {cpu * 1000 / a.lines:.2f} "
              "CPU s / 1000 lines", flush=True)

        # 3. interactive TTFT alone, then with a batch running
        inter = RunSettings(**common, num_prompts=a.interactive_requests, request_rate=a.interactive_rate,  # type: ignore[arg-type]
                            label="interactive")
        wl = _workload(a.interactive_requests, a.prompt_tokens, a.output_tokens, "interactive")
        alone = await run_benchmark(inter, wl, progress=False)
        bf_id = await _start_batch(client, _lines(a.backfill_lines, a.prompt_tokens, a.output_tokens, "bf"))
        await _wait_batch(client, bf_id, until_done=min(a.backfill_lines, 4 * a.slots))  # it is running
        during = await run_benchmark(inter, wl, progress=False)
        bf = await _wait_batch(client, bf_id)
        am, wm = alone["metrics"], during["metrics"]
        assert isinstance(am, dict) and isinstance(wm, dict)
        print(f"[batch] interactive TTFT p50/p99 alone {am['median_ttft_ms']:.1f}/"
              f"{am['p99_ttft_ms']:.1f} ms, "
              f"with a batch {wm['median_ttft_ms']:.1f}/{wm['p99_ttft_ms']:.1f} ms", flush=True)
        return {
            "commit": git_commit(), "machine": machine(), "settings": vars(a),
            "direct": {"output_tokens_per_s": dm["output_throughput"], "completed": dm["completed"],
                       "failed": dm["failed"]},
            "batch": {"lines": a.lines, "status": batch["status"],
                      "completed": batch["request_counts"]["completed"],
                      "failed": batch["request_counts"]["failed"], "seconds": float(span),
                      "output_tokens": tokens, "output_tokens_per_s": batch_tps,
                      "ratio_to_direct": batch_tps / dm["output_throughput"],
                      "runner_cpu_s_per_1000_lines": cpu * 1000 / a.lines},
            "interactive": {
                "alone": {"ttft_p50_ms": am["median_ttft_ms"], "ttft_p99_ms": am["p99_ttft_ms"],
                          "failed": am["failed"]},
                "with_batch": {"ttft_p50_ms": wm["median_ttft_ms"], "ttft_p99_ms": wm["p99_ttft_ms"],
                               "failed": wm["failed"], "batch_status": bf["status"],
                               "batch_completed": bf["request_counts"]["completed"]},
            },
        }
    finally:
        if client is not None:
            await client.aclose()
        for p in reversed(started):
            await _stop(p)
        await procs.stop(sim)
        await drop_database(a.admin_dsn, name)


def cmd_batch(a: argparse.Namespace, results_dir: str) -> int:
    import uvloop

    doc = uvloop.run(run(a))
    path = Path(a.result_file or Path(results_dir) / f"batch-{time.strftime('%Y%m%dT%H%M%S')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str))
    print(f"results: {path}")
    return 0
