"""The Job Worker with the local launcher, against the real control API, Endpoint Worker,
PostgreSQL and Redis: scale up/down with draining, replacement of a killed job, walltime
replacement, the kill -9 restart case, and failing models."""

from __future__ import annotations

import functools
import os
import signal
import time
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as aioredis

from control.jobs.naming import name_prefix
from control.jobs.settings import JobsSettings
from control.launchers.local import LocalLauncher
from hpcgate.schemas import EndpointTable, RedisNames
from tests.jobs.stack import ControlPlane, Daemon, db_rows, poll, stopping, submit_without_recording

FAST = {"interval_s": "0.3", "drain_grace_s": "0.3", "backoff_base_s": "0.2", "backoff_max_s": "1",
        "cancel_retry_s": "2"}


def _jobs_settings(plane: ControlPlane, data_dir: Path, prefix: str, **extra: str) -> dict[str, str]:
    return {"launcher": "local", "job_name_prefix": prefix, **FAST, **extra,
            "data_dir": str(data_dir)}


async def _create_model(plane: ControlPlane, name: str, **fields: Any) -> dict[str, Any]:
    status, body = await plane.admin().call("POST", "/admin/models", {"name": name, **fields})
    assert status == 201, body
    return dict(body)


async def _insert_model(dsn: str, name: str, template: str, resources: dict[str, Any]) -> None:
    """A configuration written past the admin API (psql, an older version): the worker checks
    what it finds in the database too."""
    await db_rows(dsn, """INSERT INTO ai_model_configurations (name, slurm_template, slurm_resources,
                                                               max_instances, desired_instances)
                          VALUES ($1, $2, $3::jsonb, 1, 1) RETURNING model_id""",
                  name, template, msgspec.json.encode(resources).decode())


async def _patch_model(plane: ControlPlane, name: str, **fields: Any) -> None:
    status, body = await plane.admin().call("PATCH", f"/admin/models/{name}", fields)
    assert status == 200, body


async def _jobs(dsn: str, model: str) -> list[dict[str, Any]]:
    return await db_rows(dsn, """SELECT j.*, e.endpoint_id, e.node, e.port, e.ready_at AS ep_ready_at
                                   FROM ai_model_endpoint_jobs j
                                   JOIN ai_model_configurations m USING (model_id)
                                   LEFT JOIN ai_model_endpoints e USING (endpoint_job_id)
                                  WHERE m.name = $1 ORDER BY j.endpoint_job_id""", model)


def _live(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["state"] not in ("ended", "failed")]


def _ready(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in _live(rows) if r["ep_ready_at"] is not None and r["state"] in ("registered", "ready")]


async def _local_alive(data_dir: Path, prefix: str) -> list[str]:
    launcher = LocalLauncher(data_dir / "jobs" / "local-state")
    return [o.launcher_job_id for o in await launcher.observe(name_prefix(prefix)) if o.alive]


async def _published(plane: ControlPlane, model: str) -> list[Any]:
    client = aioredis.from_url(plane.redis_url)
    try:
        raw = await client.get(RedisNames(plane.redis_prefix).endpoint_table)
    finally:
        await client.aclose()
    if raw is None:
        return []
    table = msgspec.json.decode(raw, type=EndpointTable)
    return [e for e in table.endpoints if e.model == model and e.ready and not e.draining]


async def test_scale_up_drain_down_replace_and_scale_to_zero(
    plane: ControlPlane, tmp_path: Path, prefix: str
) -> None:
    dsn, model = plane.pg_dsn, "local-m1"
    worker = await plane.start_jobs(_jobs_settings(plane, tmp_path, prefix))
    async with stopping(worker, plane):
        await _create_model(plane, model, max_instances=3, desired_instances=2)
        rows = await poll(lambda: _ready_n(dsn, model, 2), 60, "two ready endpoints")
        assert {r["launcher"] for r in rows} == {"local"}
        assert all(r["job_name"].startswith(f"{prefix}-{model}-g1-e") for r in rows)
        assert len({(r["node"], r["port"]) for r in rows}) == 2
        published = await poll(lambda: _published_n(plane, model, 2), 20, "both endpoints published")
        assert {e.endpoint_job_id for e in published} == {r["endpoint_job_id"] for r in rows}

        # scale to 1: one job drains (no new requests), then is cancelled and ends
        await _patch_model(plane, model, desired_instances=1)
        rows = await poll(lambda: _ended_n(dsn, model, 1), 30, "one job ended after draining")
        gone = next(r for r in rows if r["state"] == "ended")
        assert gone["state_reason"].startswith("stopped by hpcgate")
        assert gone["draining_since"] is not None and gone["cancel_requested_at"] is not None
        assert worker.find("job_draining", endpoint_job_id=gone["endpoint_job_id"]) is not None
        assert worker.find("job_cancelling", endpoint_job_id=gone["endpoint_job_id"], reason="drained")
        survivors = _live(rows)
        assert len(survivors) == 1
        await poll(lambda: _alive_n(tmp_path, prefix, 1), 15, "one local job process left")

        # a job killed from outside is replaced
        victim = survivors[0]
        state_file = tmp_path / "jobs" / "local-state" / f"{victim['launcher_job_id']}.json"
        os.killpg(msgspec.json.decode(state_file.read_bytes())["pid"], signal.SIGKILL)
        rows = await poll(lambda: _replaced(dsn, model, victim["endpoint_job_id"]), 60, "a replacement ready")
        assert len(_ready(rows)) == 1
        killed = next(r for r in rows if r["endpoint_job_id"] == victim["endpoint_job_id"])
        assert killed["state"] == "ended" and "the job" in killed["state_reason"]

        # scale to 0: nothing left, in the database or as processes
        await _patch_model(plane, model, desired_instances=0)
        await poll(lambda: _no_live(dsn, model), 30, "no live jobs")
        await poll(lambda: _alive_n(tmp_path, prefix, 0), 15, "no local job processes")
        assert not await _jobs_with_endpoint(dsn, model)


async def _ready_n(dsn: str, model: str, n: int) -> list[dict[str, Any]] | None:
    rows = await _jobs(dsn, model)
    ready = _ready(rows)
    return ready if len(ready) == n and len(_live(rows)) == n else None


async def _published_n(plane: ControlPlane, model: str, n: int) -> list[Any] | None:
    eps = await _published(plane, model)
    return eps if len(eps) == n else None


async def _ended_n(dsn: str, model: str, n: int) -> list[dict[str, Any]] | None:
    rows = await _jobs(dsn, model)
    return rows if sum(r["state"] == "ended" for r in rows) == n and len(_live(rows)) == 1 else None


async def _alive_n(data_dir: Path, prefix: str, n: int) -> bool:
    return len(await _local_alive(data_dir, prefix)) == n


async def _replaced(dsn: str, model: str, victim: int) -> list[dict[str, Any]] | None:
    rows = await _jobs(dsn, model)
    dead = [r for r in rows if r["endpoint_job_id"] == victim and r["state"] in ("ended", "failed")]
    newer = [r for r in _ready(rows) if r["endpoint_job_id"] > victim]
    return rows if dead and newer and len(_live(rows)) == 1 else None


async def _no_live(dsn: str, model: str) -> bool:
    return not _live(await _jobs(dsn, model))


async def _jobs_with_endpoint(dsn: str, model: str) -> list[dict[str, Any]]:
    return [r for r in await _jobs(dsn, model) if r["endpoint_id"] is not None]


async def test_restart_between_submit_and_database_write_adopts_the_job(
    plane: ControlPlane, tmp_path: Path, prefix: str
) -> None:
    """The exact state a kill -9 between ``submit()`` and the database write leaves behind:
    a pending row without a launcher id, and a running launcher job carrying its name."""
    dsn, model = plane.pg_dsn, "local-restart"
    await _create_model(plane, model, max_instances=1, desired_instances=1)
    settings = msgspec.convert(_jobs_settings(plane, tmp_path, prefix, database_url=dsn,
                                              control_url=plane.control_url), JobsSettings, strict=False)
    job_id, submitted = await submit_without_recording(
        settings, LocalLauncher(tmp_path / "jobs" / "local-state"), model, tmp_path / "jobs")
    # ...and here the worker died: no record_submitted. The job is held (SIGSTOP) like a job
    # still queued in Slurm, so it cannot register before the new worker looks at it.
    state = msgspec.json.decode((tmp_path / "jobs" / "local-state" / f"{submitted}.json").read_bytes())
    os.killpg(state["pid"], signal.SIGSTOP)

    daemon = await plane.start_jobs(_jobs_settings(plane, tmp_path, prefix))
    async with stopping(daemon, plane):
        await daemon.wait_event("job_adopted", 30, endpoint_job_id=job_id, launcher_job_id=submitted)
        os.killpg(state["pid"], signal.SIGCONT)
        rows = await poll(lambda: _ready_n(dsn, model, 1), 60, "the adopted job ready")
        assert [r["endpoint_job_id"] for r in rows] == [job_id]
        assert rows[0]["launcher_job_id"] == submitted
        assert daemon.find("job_submitted") is None  # nothing was submitted a second time
        assert await _local_alive(tmp_path, prefix) == [submitted]
        assert len(await _jobs(dsn, model)) == 1
        await _patch_model(plane, model, desired_instances=0)
        await poll(lambda: _alive_n(tmp_path, prefix, 0), 30, "no local job processes")


async def test_kill_9_of_the_worker_converges_without_duplicates(
    plane: ControlPlane, tmp_path: Path, prefix: str
) -> None:
    dsn, model = plane.pg_dsn, "local-kill9"
    settings = _jobs_settings(plane, tmp_path, prefix)
    first = await plane.start_jobs(settings)
    await _create_model(plane, model, max_instances=2, desired_instances=2)
    await first.wait_event("job_created", 30)
    await first.kill9()  # somewhere between creating rows, submitting and recording
    second = await plane.start_jobs(settings)
    async with stopping(second, plane):
        rows = await poll(lambda: _ready_n(dsn, model, 2), 60, "two ready endpoints after the restart")
        alive = await _local_alive(tmp_path, prefix)
        assert sorted(alive) == sorted(r["launcher_job_id"] for r in rows)
        # no launcher job without a live row, no live row without its launcher job
        await _patch_model(plane, model, desired_instances=0)
        await poll(lambda: _no_live(dsn, model), 30, "no live jobs")
        await poll(lambda: _alive_n(tmp_path, prefix, 0), 15, "no local job processes")


async def test_a_second_worker_stands_by_and_takes_over_after_kill_9_without_duplicates(
    plane: ControlPlane, tmp_path: Path, prefix: str
) -> None:
    """Two Job Worker replicas (a rolling update, a mistaken ``replicas: 2``): one acts, the other
    waits on the advisory lock, submits nothing, and takes over within a second of a kill -9."""
    settings = _jobs_settings(plane, tmp_path, prefix, standby_poll_s="0.2")
    first = await plane.start_jobs(settings)
    async with stopping(first, plane):
        second = await plane.start_jobs(settings, standby=True)
        async with stopping(second, plane):
            await _standby_takes_over(plane, tmp_path, prefix, first, second)


async def _standby_takes_over(plane: ControlPlane, tmp_path: Path, prefix: str, first: Daemon,
                              second: Daemon) -> None:
    dsn, model = plane.pg_dsn, "local-singleton"
    assert "hpcgate-control-jobs" in second.find("singleton_state", new="standby")["holder"]
    await _create_model(plane, model, max_instances=3, desired_instances=2)
    rows = await poll(lambda: _ready_n(dsn, model, 2), 60, "two ready endpoints")
    assert second.find("job_created") is None and second.find("jobs_worker_started") is None

    await first.kill9()
    killed_at = time.time()
    active = await second.wait_event("singleton_state", 10, new="active")
    assert active["old"] == "standby"
    assert active["ts"] - killed_at < 1.0  # standby_poll_s 0.2, with room for a busy machine
    await second.wait_event("jobs_worker_started", 10)

    # The new active worker adopts the two jobs and acts on a change: one more, not three.
    await _patch_model(plane, model, desired_instances=3)
    rows = await poll(lambda: _ready_n(dsn, model, 3), 60, "three ready endpoints after the takeover")
    all_rows = await _jobs(dsn, model)
    assert len(all_rows) == 3, all_rows  # no job row was created twice
    assert sorted(await _local_alive(tmp_path, prefix)) == sorted(r["launcher_job_id"] for r in rows)
    await _patch_model(plane, model, desired_instances=0)
    await poll(lambda: _no_live(dsn, model), 30, "no live jobs")
    await poll(lambda: _alive_n(tmp_path, prefix, 0), 15, "no local job processes")


BAD_REGISTRATION = """#!/bin/bash
# a site template whose registration is refused (wrong token): must fail fast and visibly
{{sbatch}}
set -euo pipefail
{{setup}}
export HPCGATE_JOB_REGISTRATION_TOKEN=not-the-token-of-this-job-0123456789
{{register}}
exec sleep 600
"""


async def test_failing_models_are_marked_failed_with_the_reason(
    plane: ControlPlane, tmp_path: Path, prefix: str
) -> None:
    dsn = plane.pg_dsn
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "badreg.sbatch").write_text(BAD_REGISTRATION)
    daemon = await plane.start_jobs(_jobs_settings(plane, tmp_path, prefix, max_failures="2",
                                                     template_dirs=str(templates)))
    async with stopping(daemon, plane):
        # the admin API knows only the built-in templates here (no api.template_dirs)
        await _insert_model(dsn, "local-badreg", "badreg", {})
        await _create_model(plane, "local-badsim", max_instances=1, desired_instances=1,
                            slurm_resources={"sim_profile": "no-such-profile"})
        await _insert_model(dsn, "local-badres", "sim", {"time": "soon"})
        for name in ("local-badreg", "local-badsim", "local-badres"):
            await poll(functools.partial(_model_failed, plane, name), 60, f"{name} failed")
        _, reg = await plane.admin().call("GET", "/admin/models/local-badreg")
        assert "2 job starts failed in a row" in reg["state_reason"]
        assert "registration refused: HTTP 401" in reg["state_reason"]
        _, sim = await plane.admin().call("GET", "/admin/models/local-badsim")
        assert "no-such-profile" in sim["state_reason"]
        _, res = await plane.admin().call("GET", "/admin/models/local-badres")
        assert "slurm_resources.time" in res["state_reason"] and "malformed Slurm time" in res["state_reason"]
        # not retried forever: exactly max_failures jobs for each, then nothing
        assert len(await _jobs(dsn, "local-badreg")) == 2
        assert len(await _jobs(dsn, "local-badsim")) == 2
        assert await _jobs(dsn, "local-badres") == []
        failed = [r for r in await _jobs(dsn, "local-badreg") if r["state"] == "failed"]
        assert len(failed) == 2 and all("ended before it became ready" in r["state_reason"] for r in failed)
        assert await _local_alive(tmp_path, prefix) == []


async def _model_failed(plane: ControlPlane, name: str) -> bool:
    status, body = await plane.admin().call("GET", f"/admin/models/{name}")
    return status == 200 and body["state"] == "failed"


async def test_walltime_replacement_keeps_the_model_serving(
    plane: ControlPlane, tmp_path: Path, prefix: str
) -> None:
    """Jobs of one minute with a 56 s lead: each is replaced ~4 s after it starts, and drained
    once the replacement is ready, so a ready endpoint exists at every moment."""
    dsn, model = plane.pg_dsn, "local-walltime"
    daemon = await plane.start_jobs(_jobs_settings(plane, tmp_path, prefix, walltime_lead_s="56"))
    async with stopping(daemon, plane):
        await _create_model(plane, model, max_instances=1, desired_instances=1, slurm_resources={"time": "1"})
        (first,) = await poll(lambda: _ready_n(dsn, model, 1), 60, "the first job ready")
        samples = []

        async def replaced_once() -> dict[str, Any] | None:
            rows = await _jobs(dsn, model)
            samples.append(len(_ready(rows)))
            old = next(r for r in rows if r["endpoint_job_id"] == first["endpoint_job_id"])
            successor = [r for r in rows if r["replaces_endpoint_job_id"] == old["endpoint_job_id"]]
            return {"old": old, "new": successor[0]} if old["state"] == "ended" and successor else None

        pair = await poll(replaced_once, 60, "the first ready job replaced and ended", interval=0.1)
        assert min(samples) >= 1, "the model dropped to zero ready endpoints during the replacement"
        assert pair["old"]["walltime_s"] == 60
        assert pair["old"]["state_reason"].startswith("stopped by hpcgate")
        assert daemon.find("job_draining", endpoint_job_id=pair["old"]["endpoint_job_id"],
                           reason=f"replaced by endpoint job {pair['new']['endpoint_job_id']}") is not None
        # a start failure is not part of this scenario; show its reason if one happened
        failed = [r["state_reason"] for r in await _jobs(dsn, model) if r["state"] == "failed"]
        assert not failed, failed
        await _patch_model(plane, model, desired_instances=0)
        await poll(lambda: _no_live(dsn, model), 30, "no live jobs")
        await poll(lambda: _alive_n(tmp_path, prefix, 0), 15, "no local job processes")

