"""End to end: a simulated model goes from 1 to 3 instances under load and back to 1 after it,
driven only by ``hpcgate control autoscaler`` (short windows) through the real Job Worker (local
launcher), control API, Endpoint Worker, PostgreSQL and Redis; the decisions are in the history.

The simulator runs with 2 sequences at a time (``slurm_resources.sim_max_num_seqs``) at a
GPU-like pace, so a dozen concurrent clients keep requests waiting: the engines' queue time
(or, while nothing gets scheduled, the stalled queue) passes the threshold.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import redis.asyncio as aioredis

from control.jobs.naming import name_prefix
from control.launchers.local import LocalLauncher
from hpcgate.schemas import EndpointTable, RedisNames
from tests.jobs.stack import ControlPlane, Daemon, db_rows, free_port, poll, start_daemon, stopping

FAST_JOBS = {
    "interval_s": "0.3",
    "drain_grace_s": "0.3",
    "backoff_base_s": "0.2",
    "backoff_max_s": "1",
    "cancel_retry_s": "2",
}
FAST_SCALER = {
    "INTERVAL_S": "0.5",
    "QUEUE_TIME_WINDOW_S": "3",
    "SCALE_UP_QUEUE_TIME_S": "0.5",
    "SCALE_UP_SUSTAIN_S": "1",
    "COOLDOWN_S": "1",
    "SCALE_DOWN_STABILISE_S": "3",
    "STANDBY_POLL_S": "0.2",
}
MODEL = "auto-e2e"


@pytest.fixture
async def prefix(tmp_path: Path) -> AsyncIterator[str]:
    value = "a" + uuid.uuid4().hex[:10]
    yield value
    launcher = LocalLauncher(tmp_path / "jobs" / "local-state", kill_wait_s=0)
    for job in await launcher.observe(name_prefix(value)):
        if job.alive:
            await launcher.cancel(job.launcher_job_id)


async def ready_endpoints(dsn: str, model: str = MODEL) -> list[dict[str, Any]]:
    return await db_rows(
        dsn,
        """SELECT e.node, e.port, e.bearer_token FROM ai_model_endpoints e
                                  JOIN ai_model_endpoint_jobs j USING (endpoint_job_id)
                                  JOIN ai_model_configurations m ON m.model_id = e.model_id
                                 WHERE m.name = $1 AND j.state = 'ready' AND NOT e.draining""",
        model,
    )


async def desired(dsn: str, model: str = MODEL) -> int:
    rows = await db_rows(dsn, "SELECT desired_instances FROM ai_model_configurations WHERE name = $1", model)
    return int(rows[0]["desired_instances"])


async def load(dsn: str, stop: asyncio.Event, clients: int, model: str = MODEL) -> None:
    """``clients`` closed-loop clients, each sending to a random ready instance."""
    endpoints: list[dict[str, Any]] = []

    async def refresh() -> None:
        nonlocal endpoints
        while not stop.is_set():
            endpoints = await ready_endpoints(dsn, model)
            await asyncio.sleep(0.3)

    async def client(http: httpx.AsyncClient) -> None:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 60,
            "ignore_eos": True,
        }
        while not stop.is_set():
            if not endpoints:
                await asyncio.sleep(0.1)
                continue
            ep = random.choice(endpoints)
            with contextlib.suppress(httpx.HTTPError):
                await http.post(
                    f"http://{ep['node']}:{ep['port']}/v1/chat/completions",
                    json=body,
                    headers={"authorization": f"Bearer {ep['bearer_token']}"},
                )

    async with httpx.AsyncClient(timeout=30) as http:
        tasks = [asyncio.ensure_future(refresh())] + [
            asyncio.ensure_future(client(http)) for _ in range(clients)
        ]
        await stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def scale_1_to_3_and_back(
    plane: ControlPlane, tmp_path: Path, prefix: str, model: str, **scaler: str
) -> tuple[list[dict[str, Any]], Daemon]:
    """Drive ``model`` (min 1, max 3) from 1 to 3 ready instances under load and back to 1
    desired after it, with an autoscaler of ``FAST_SCALER`` plus ``scaler`` settings; returns
    the decision history and the (stopped) autoscaler with its log."""
    dsn = plane.pg_dsn
    jobs = await plane.start_jobs(
        {"launcher": "local", "job_name_prefix": prefix, **FAST_JOBS, "data_dir": str(tmp_path)}
    )
    scaler_env = plane.env(**{f"HPCGATE_AUTOSCALER_{k}": v for k, v in {**FAST_SCALER, **scaler}.items()})
    daemon = await start_daemon("autoscaler", ["control", "autoscaler"], scaler_env, "autoscaler_started")
    async with stopping(jobs, plane), stopping(daemon, plane):
        status, body = await plane.admin().call(
            "POST",
            "/admin/models",
            {
                "name": model,
                "min_instances": 1,
                "max_instances": 3,
                "desired_instances": 1,
                "slurm_resources": {"sim_profile": "paced", "sim_max_num_seqs": 2},
            },
        )
        assert status == 201, body
        await poll(lambda: _n_ready(dsn, 1, model), 60, "the first instance ready")

        stop = asyncio.Event()
        driver = asyncio.ensure_future(load(dsn, stop, clients=14, model=model))
        try:
            await poll(lambda: _n_ready(dsn, 3, model), 60, "three ready instances under load", interval=0.3)
        except AssertionError as exc:
            status_rows = await db_rows(dsn, "SELECT hold, detail, signals FROM ai_model_autoscaling")
            raise AssertionError(f"{exc}; the autoscaler's last observation: {status_rows}") from None
        finally:
            stop.set()
            await driver
        await poll(lambda: _desired_is(dsn, 1, model), 60, "back to one instance after the load",
                   interval=0.3)
        rows = await db_rows(
            dsn,
            """SELECT from_instances, to_instances, reason, source, detail
                 FROM ai_model_scaling_decisions d JOIN ai_model_configurations m USING (model_id)
                WHERE m.name = $1 ORDER BY decision_id""",
            model,
        )
    # later tests in this module share the control plane: leave no instance of this model
    assert (await plane.admin().call("POST", f"/admin/models/{model}/drain"))[0] == 200
    return rows, daemon


async def test_a_model_scales_1_to_3_under_load_and_back_to_1(
    plane: ControlPlane, tmp_path: Path, prefix: str
) -> None:
    rows, scaler = await scale_1_to_3_and_back(plane, tmp_path, prefix, MODEL)
    steps = [(r["from_instances"], r["to_instances"], r["reason"]) for r in rows]
    assert steps == [
        (1, 2, "queue_time_sustained"),
        (2, 3, "queue_time_sustained"),
        (3, 2, "idle_stabilised"),
        (2, 1, "idle_stabilised"),
    ], steps
    assert all(r["source"] == "autoscaler" for r in rows)
    assert scaler.find("autoscaler_decision", old=1, new=2, reason="queue_time_sustained") is not None
    status, scaling = await plane.admin().call("GET", f"/admin/models/{MODEL}/scaling")
    assert status == 200 and len(scaling["decisions"]) == 4


async def _n_ready(dsn: str, n: int, model: str = MODEL) -> bool:
    return len(await ready_endpoints(dsn, model)) == n


async def _desired_is(dsn: str, n: int, model: str = MODEL) -> bool:
    return await desired(dsn, model) == n


async def test_scale_from_zero_through_the_gateway_with_the_openai_sdk(
    plane: ControlPlane, tmp_path: Path, prefix: str
) -> None:
    """The whole chain: a request for a model at zero is held by the gateway and announced in
    Redis, the autoscaler raises desired to 1, the Job Worker starts an instance, and the held
    request is answered."""
    import openai

    model = "auto-zero"
    jobs = await plane.start_jobs(
        {"launcher": "local", "job_name_prefix": prefix, **FAST_JOBS, "data_dir": str(tmp_path)}
    )
    scaler_env = plane.env(**{f"HPCGATE_AUTOSCALER_{k}": v for k, v in FAST_SCALER.items()})
    scaler = await start_daemon("autoscaler", ["control", "autoscaler"], scaler_env, "autoscaler_started")
    gw_port = free_port()
    gateway = await start_daemon(
        "gateway", ["gateway", "--port", str(gw_port)], plane.env(), "gateway_listening"
    )
    async with stopping(jobs, plane), stopping(scaler, plane), stopping(gateway, plane):
        admin = plane.admin()
        assert (await admin.call("POST", "/admin/tenants", {"name": "zero"}))[0] == 201
        status, created = await admin.call("POST", "/admin/tenants/zero/keys", {})
        assert status == 201
        status, body = await admin.call("POST", "/admin/models", {"name": model, "max_instances": 1})
        assert status == 201 and body["desired_instances"] == 0
        sdk = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{gw_port}/v1", api_key=created["key"], max_retries=0
        )

        async def held_at_zero() -> int | None:
            """The version of a published table that marks the model scale-from-zero (the
            autoscaler has observed it), once the gateway holds that table."""
            client = aioredis.from_url(plane.redis_url)
            try:
                raw = await client.get(RedisNames(plane.redis_prefix).endpoint_table)
            finally:
                await client.aclose()
            table = msgspec.json.decode(raw, type=EndpointTable) if raw else None
            if table is None or not any(m.name == model and m.scale_from_zero for m in table.models):
                return None
            async with httpx.AsyncClient(timeout=5) as http:
                text = (await http.get(f"http://127.0.0.1:{gw_port}/metrics")).text
            held = [
                float(line.rpartition(" ")[2])
                for line in text.splitlines()
                if line.startswith("hpcgate_gateway_table_version{")
            ]
            return table.version if held and min(held) >= table.version else None

        await poll(held_at_zero, 20, "the gateway to hold the model as scale-from-zero")
        listed = {m.id: m.model_extra for m in (await sdk.models.list()).data}
        assert listed[model] == {"state": "stopped", "aliases": []}
        reply = await asyncio.wait_for(
            sdk.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3
            ),
            60,
        )
        assert reply.choices[0].message.content
        rows = await db_rows(
            plane.pg_dsn,
            """SELECT from_instances, to_instances, reason
                                                FROM ai_model_scaling_decisions d
                                                JOIN ai_model_configurations m USING (model_id)
                                               WHERE m.name = $1""",
            model,
        )
        assert [(r["from_instances"], r["to_instances"], r["reason"]) for r in rows] == [
            (0, 1, "zero_to_one")
        ]


async def _stream(ep: dict[str, Any], model: str, tokens: int) -> tuple[int, str | None, float, float]:
    """One streamed chat completion straight to an engine: (content chunks, finish reason,
    start and end in wall seconds). A cut stream raises or ends without its finish reason."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
    }
    chunks, finish, start = 0, None, time.time()
    async with httpx.AsyncClient(timeout=60) as http, http.stream(
        "POST",
        f"http://{ep['node']}:{ep['port']}/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {ep['bearer_token']}"},
    ) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            choice = msgspec.json.decode(line[6:])["choices"]
            if choice and choice[0]["delta"].get("content"):
                chunks += 1
            if choice and choice[0].get("finish_reason"):
                finish = choice[0]["finish_reason"]
    return chunks, finish, start, time.time()


async def test_a_schedule_change_drains_an_instance_without_cutting_its_stream(
    plane: ControlPlane, tmp_path: Path, prefix: str
) -> None:
    """A schedule's window ends (on the autoscaler's simulated schedule clock, four seconds
    after it starts) while both instances stream: desired goes 2 -> 1 with source "schedule",
    the extra instance is drained, its stream ends whole, and only then is its job ended."""
    dsn, model = plane.pg_dsn, "auto-schedule"
    jobs = await plane.start_jobs(
        {"launcher": "local", "job_name_prefix": prefix, **FAST_JOBS, "data_dir": str(tmp_path)}
    )
    async with stopping(jobs, plane):
        status, body = await plane.admin().call(
            "POST",
            "/admin/models",
            {
                "name": model,
                "min_instances": 1,
                "max_instances": 2,
                "desired_instances": 2,
                "slurm_resources": {"sim_profile": "paced", "sim_max_num_seqs": 2},
            },
        )
        assert status == 201, body
        status, body = await plane.admin().call(
            "PUT",
            f"/admin/models/{model}/schedule",
            {"schedule": "daily 07:00-07:01 UTC: min 2\notherwise: max 1"},
        )
        assert status == 200, body
        await poll(lambda: _n_ready(dsn, 2, model), 60, "two ready instances")
        endpoints = await ready_endpoints(dsn, model)
        # 400 tokens at 50 tokens/s: the streams outlast the schedule's window by about 4 s
        streams = [asyncio.ensure_future(_stream(ep, model, 400)) for ep in endpoints]
        started = time.time()
        scaler_env = plane.env(
            **{f"HPCGATE_AUTOSCALER_{k}": v for k, v in FAST_SCALER.items()},
            HPCGATE_AUTOSCALER_SCHEDULE_CLOCK_START="2026-12-01T07:00:56+00:00",
            HPCGATE_AUTOSCALER_SCHEDULE_CLOCK_ORIGIN=datetime.fromtimestamp(started, UTC).isoformat(),
        )
        scaler = await start_daemon("autoscaler", ["control", "autoscaler"], scaler_env, "autoscaler_started")
        async with stopping(scaler, plane):
            await poll(lambda: _desired_is(dsn, 1, model), 30, "the schedule's 'max 1' after 07:01")
            decided = await db_rows(
                dsn,
                "SELECT extract(epoch FROM decided_at)::float8 AS at, from_instances, to_instances, "
                "reason, source FROM ai_model_scaling_decisions JOIN ai_model_configurations m "
                "USING (model_id) WHERE m.name = $1",
                model,
            )
            assert [(d["from_instances"], d["to_instances"], d["reason"], d["source"]) for d in decided] == [
                (2, 1, "schedule", "schedule")
            ]
            assert decided[0]["at"] - started >= 3.0, "the window ended on wall time, not the schedule clock"
            results = await asyncio.gather(*streams)
            for chunks, finish, _, end in results:
                assert (chunks, finish) == (400, "length")
                assert end > decided[0]["at"], "the stream ended before the schedule changed"
            await poll(lambda: _n_jobs_live(dsn, 1, model), 30, "the drained instance's job ended")
            [ended] = await db_rows(
                dsn,
                "SELECT extract(epoch FROM j.ended_at)::float8 AS at FROM ai_model_endpoint_jobs j "
                "JOIN ai_model_configurations m USING (model_id) WHERE m.name = $1 AND j.state = 'ended'",
                model,
            )
            assert ended["at"] >= min(end for *_, end in results) - 0.5
        assert (await plane.admin().call("POST", f"/admin/models/{model}/drain"))[0] == 200


async def _n_jobs_live(dsn: str, n: int, model: str) -> bool:
    rows = await db_rows(
        dsn,
        "SELECT count(*) AS n FROM ai_model_endpoint_jobs j JOIN ai_model_configurations m USING (model_id) "
        "WHERE m.name = $1 AND j.state <> 'ended'",
        model,
    )
    return int(rows[0]["n"]) == n


async def test_target_tracking_mode_scales_on_waiting_requests_and_back(
    plane: ControlPlane, tmp_path: Path, prefix: str
) -> None:
    """``mode = "target"`` (Knative's KPA): desired follows the waiting requests per instance
    up to max, then steps down one at a time after the stabilisation window."""
    rows, scaler = await scale_1_to_3_and_back(
        plane, tmp_path, prefix, "auto-target",
        MODE="target", TARGET_WAITING_PER_INSTANCE="2", STABLE_WINDOW_S="3", PANIC_WINDOW_S="1",
    )
    ups = [r for r in rows if r["to_instances"] > r["from_instances"]]
    downs = [(r["from_instances"], r["to_instances"], r["reason"]) for r in rows if r not in ups]
    assert ups and {r["reason"] for r in ups} <= {"target_tracking", "panic"}, rows
    assert ups[-1]["to_instances"] == 3
    assert downs == [(3, 2, "idle_stabilised"), (2, 1, "idle_stabilised")], rows
    assert scaler.find("autoscaler_decision", reason=ups[0]["reason"]) is not None
