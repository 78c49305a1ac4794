"""End to end: a simulated model goes from 1 to 3 instances under load and back to 1 after it,
driven only by ``hpcgate control autoscaler`` (short windows) through the real Job Worker (local
launcher), control API, Endpoint Worker, PostgreSQL and Redis; the decisions are in the history.

The simulator runs with 2 sequences at a time (``slurm_resources.sim_max_num_seqs``) at a
GPU-like pace, so a dozen concurrent clients keep requests waiting: the engines' queue time
(or, while nothing gets scheduled, the stalled queue) passes the threshold.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import msgspec
import redis.asyncio as aioredis

from hpcgate.schemas import EndpointTable, RedisNames
from tests.jobs.autoscale_helpers import FAST_JOBS, FAST_SCALER, MODEL, scale_1_to_3_and_back
from tests.jobs.stack import ControlPlane, db_rows, free_port, poll, start_daemon, stopping


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
