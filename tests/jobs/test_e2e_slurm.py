"""End to end on the real single-node Slurm: the control API, the Endpoint Worker, the Job Worker
(Slurm CLI launcher) and a gateway as real processes; model instances are Slurm jobs running
the simulator.

create a model with 2 instances -> two Slurm jobs -> both register and become ready -> the
published table has both -> requests through the gateway reach both -> scale to 1 -> one drains
and is cancelled -> a job killed with scancel from outside is replaced -> scale to 0 -> no jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from openai import AsyncOpenAI

from control.jobs.naming import name_prefix
from control.jobs.settings import JobsSettings
from control.launchers.slurm_cli import SlurmCliLauncher
from tests.jobs.stack import ControlPlane, db_rows, poll, start_daemon, stopping, submit_without_recording
from tests.support.services import start_slurm

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def slurm_env() -> dict[str, str]:
    return start_slurm()


async def _slurm_jobs(env: dict[str, str], prefix: str) -> list[Any]:
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = env["SLURM_CONF"]
    try:
        return [j for j in await SlurmCliLauncher().observe(name_prefix(prefix)) if j.alive]
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


@pytest.fixture
async def prefix(slurm_env: dict[str, str]) -> AsyncIterator[str]:
    value = "e" + uuid.uuid4().hex[:10]
    yield value
    for job in await _slurm_jobs(slurm_env, value):  # pass or fail, leave nothing on the cluster
        await _scancel(slurm_env, job.launcher_job_id)


async def _scancel(env: dict[str, str], job_id: str) -> int:
    proc = await asyncio.create_subprocess_exec("scancel", job_id, env={**os.environ, **env})
    return await proc.wait()


async def _jobs(dsn: str, model: str) -> list[dict[str, Any]]:
    return await db_rows(dsn, """SELECT j.*, e.node, e.port, e.ready_at AS ep_ready_at, e.bearer_token
                                   FROM ai_model_endpoint_jobs j
                                   JOIN ai_model_configurations m USING (model_id)
                                   LEFT JOIN ai_model_endpoints e USING (endpoint_job_id)
                                  WHERE m.name = $1 ORDER BY j.endpoint_job_id""", model)


def _live(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["state"] not in ("ended", "failed")]


async def _ready_exactly(dsn: str, model: str, n: int) -> list[dict[str, Any]] | None:
    rows = _live(await _jobs(dsn, model))
    ready = [r for r in rows if r["ep_ready_at"] is not None and r["state"] in ("registered", "ready")]
    return ready if len(ready) == n and len(rows) == n else None


async def _success_count(node: str, port: int) -> float:
    reader, writer = await asyncio.open_connection(node, port)
    try:
        writer.write(f"GET /metrics HTTP/1.1\r\nHost: {node}\r\nConnection: close\r\n\r\n".encode())
        data = (await asyncio.wait_for(reader.read(), 5)).decode()
    finally:
        writer.close()
    return sum(float(line.rsplit(" ", 1)[1]) for line in data.splitlines()
               if line.startswith("vllm:request_success_total"))


async def test_model_instances_on_slurm_end_to_end(
    slurm_env: dict[str, str], plane: ControlPlane, prefix: str, tmp_path: Path
) -> None:
    dsn, model = plane.pg_dsn, "e2e-slurm"
    admin = plane.admin()
    status, _ = await admin.call("POST", "/admin/tenants", {"name": "e2e"})
    assert status == 201
    status, created = await admin.call("POST", "/admin/tenants/e2e/keys", {})
    assert status == 201
    api_key = created["key"]

    settings = {"launcher": "slurm", "job_name_prefix": prefix, "data_dir": str(tmp_path),
                "interval_s": "0.5", "drain_grace_s": "0.5", "backoff_base_s": "0.5"}
    jobs = await plane.start_jobs(settings, raw_env={"SLURM_CONF": slurm_env["SLURM_CONF"]})
    async with stopping(jobs, plane), contextlib.AsyncExitStack() as stack:
        gateway = await start_daemon("gateway", ["gateway", "--port", "0"], plane.env(), "gateway_listening")
        await stack.enter_async_context(stopping(gateway))
        spec = {"name": model, "slurm_template": "sim", "max_instances": 3, "desired_instances": 2}
        status, body = await admin.call("POST", "/admin/models", spec)
        assert status == 201, body

        # two Slurm jobs run the simulator, register and become ready
        rows = await poll(functools.partial(_ready_exactly, dsn, model, 2), 60, "two ready Slurm jobs", 0.3)
        slurm_jobs = await _slurm_jobs(slurm_env, prefix)
        assert sorted(j.launcher_job_id for j in slurm_jobs) == sorted(r["launcher_job_id"] for r in rows)
        assert all(r["launcher"] == "slurm" and r["launcher_job_id"].isdigit() for r in rows)
        assert all(j.state.value == "running" for j in slurm_jobs)

        # requests through the gateway reach both instances
        port = (gateway.find("gateway_listening") or {})["port"]
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, max_retries=0)

        async def one_request() -> str:
            resp = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=8)
            return resp.choices[0].message.content or ""

        await poll(functools.partial(_gateway_serves, client, model), 30, "the gateway routing to the model")
        answers = await asyncio.gather(*(one_request() for _ in range(24)))
        assert all(answers)
        counts = [await _success_count(r["node"], r["port"]) for r in rows]
        assert all(c > 0 for c in counts), f"requests were not spread over both instances: {counts}"
        await client.close()

        # scale to 1: one job drains, then is cancelled
        status, _ = await admin.call("PATCH", f"/admin/models/{model}", {"desired_instances": 1})
        assert status == 200
        rows = await poll(functools.partial(_ready_exactly, dsn, model, 1), 45, "one job left", 0.3)
        all_rows = await _jobs(dsn, model)
        stopped = [r for r in all_rows if r["state"] == "ended"]
        assert len(stopped) == 1 and stopped[0]["draining_since"] is not None
        assert stopped[0]["state_reason"].startswith("stopped by hpcgate")
        assert jobs.find("job_cancelling", endpoint_job_id=stopped[0]["endpoint_job_id"]) is not None
        await poll(functools.partial(_slurm_count, slurm_env, prefix, 1), 20, "one Slurm job left")

        # a job killed with scancel from outside is replaced
        victim = rows[0]
        assert await _scancel(slurm_env, victim["launcher_job_id"]) == 0
        rows = await poll(functools.partial(_replaced, dsn, model, victim["endpoint_job_id"]), 60,
                          "a replacement for the scancelled job")
        killed = next(r for r in await _jobs(dsn, model) if r["endpoint_job_id"] == victim["endpoint_job_id"])
        assert killed["state"] == "ended" and "cancelled outside hpcgate" in killed["state_reason"]

        # scale to 0: no jobs left
        status, _ = await admin.call("PATCH", f"/admin/models/{model}", {"desired_instances": 0})
        assert status == 200
        await poll(functools.partial(_slurm_count, slurm_env, prefix, 0), 45, "no Slurm jobs left")
        await poll(functools.partial(_no_live, dsn, model), 20, "no live job rows")


async def _gateway_serves(client: AsyncOpenAI, model: str) -> bool:
    try:
        await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                             max_tokens=1)
    except Exception:
        return False
    return True


async def _slurm_count(env: dict[str, str], prefix: str, n: int) -> bool:
    return len(await _slurm_jobs(env, prefix)) == n


async def _replaced(dsn: str, model: str, victim: int) -> list[dict[str, Any]] | None:
    ready = await _ready_exactly(dsn, model, 1)
    return ready if ready and ready[0]["endpoint_job_id"] > victim else None


async def _no_live(dsn: str, model: str) -> bool:
    return not _live(await _jobs(dsn, model))


async def test_restart_between_sbatch_and_database_write_on_slurm(
    slurm_env: dict[str, str], plane: ControlPlane, prefix: str, tmp_path: Path
) -> None:
    """What a kill -9 of the Job Worker right after ``sbatch`` leaves behind — a pending row
    without a launcher id and a Slurm job carrying its name (held, like a job still queued) —
    converges to that one job: adopted by name, never submitted twice."""
    dsn, model = plane.pg_dsn, "e2e-restart"
    status, body = await plane.admin().call("POST", "/admin/models", {"name": model, "desired_instances": 1,
                                                                      "max_instances": 1})
    assert status == 201, body
    raw = {"launcher": "slurm", "job_name_prefix": prefix, "data_dir": str(tmp_path), "interval_s": "0.5"}
    settings = msgspec.convert({**raw, "database_url": dsn, "control_url": plane.control_url}, JobsSettings,
                               strict=False)
    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = slurm_env["SLURM_CONF"]  # for sbatch, as the worker's environment
    try:
        # A held job, like one still queued in Slurm; the worker "dies" right after sbatch.
        job_id, submitted = await submit_without_recording(
            settings, SlurmCliLauncher(), model, tmp_path / "jobs",
            edit_script=lambda text: text.replace("#SBATCH ", "#SBATCH --hold\n#SBATCH ", 1))
    finally:
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf

    daemon = await plane.start_jobs(raw, raw_env={"SLURM_CONF": slurm_env["SLURM_CONF"]})
    async with stopping(daemon, plane):
        await daemon.wait_event("job_adopted", 30, endpoint_job_id=job_id, launcher_job_id=submitted)
        proc = await asyncio.create_subprocess_exec("scontrol", "release", submitted,
                                                    env={**os.environ, **slurm_env})
        assert await proc.wait() == 0
        rows = await poll(functools.partial(_ready_exactly, dsn, model, 1), 60, "the adopted job ready", 0.3)
        assert [(r["endpoint_job_id"], r["launcher_job_id"]) for r in rows] == [(job_id, submitted)]
        assert daemon.find("job_submitted") is None
        assert [j.launcher_job_id for j in await _slurm_jobs(slurm_env, prefix)] == [submitted]
        assert len(await _jobs(dsn, model)) == 1
        status, _ = await plane.admin().call("PATCH", f"/admin/models/{model}", {"desired_instances": 0})
        assert status == 200
        await poll(functools.partial(_slurm_count, slurm_env, prefix, 0), 45, "no Slurm jobs left")
