"""The autoscaler end to end in its other modes: a schedule whose window ends (on the simulated
schedule clock) drains an instance without cutting its stream, and target tracking (Knative's
KPA) scales on waiting requests and back. Same stack as ``test_autoscale_e2e.py``."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

from tests.jobs.autoscale_helpers import (
    FAST_JOBS,
    FAST_SCALER,
    create_paced_model,
    desired_is,
    n_jobs_live,
    n_ready,
    ready_endpoints,
    scale_1_to_3_and_back,
    stream_direct,
)
from tests.jobs.stack import ControlPlane, db_rows, poll, start_daemon, stopping


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
        await create_paced_model(plane, model, max_instances=2, desired_instances=2)
        status, body = await plane.admin().call(
            "PUT",
            f"/admin/models/{model}/schedule",
            {"schedule": "daily 07:00-07:01 UTC: min 2\notherwise: max 1"},
        )
        assert status == 200, body
        await poll(lambda: n_ready(dsn, 2, model), 60, "two ready instances")
        endpoints = await ready_endpoints(dsn, model)
        # 400 tokens at 50 tokens/s: the streams outlast the schedule's window by about 4 s
        streams = [asyncio.ensure_future(stream_direct(ep, model, 400)) for ep in endpoints]
        started = time.time()
        scaler_env = plane.env(
            **{f"HPCGATE_AUTOSCALER_{k}": v for k, v in FAST_SCALER.items()},
            HPCGATE_AUTOSCALER_SCHEDULE_CLOCK_START="2026-12-01T07:00:56+00:00",
            HPCGATE_AUTOSCALER_SCHEDULE_CLOCK_ORIGIN=datetime.fromtimestamp(started, UTC).isoformat(),
        )
        scaler = await start_daemon("autoscaler", ["control", "autoscaler"], scaler_env, "autoscaler_started")
        async with stopping(scaler, plane):
            await poll(lambda: desired_is(dsn, 1, model), 30, "the schedule's 'max 1' after 07:01")
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
            await poll(lambda: n_jobs_live(dsn, 1, model), 30, "the drained instance's job ended")
            [ended] = await db_rows(
                dsn,
                "SELECT extract(epoch FROM j.ended_at)::float8 AS at FROM ai_model_endpoint_jobs j "
                "JOIN ai_model_configurations m USING (model_id) WHERE m.name = $1 AND j.state = 'ended'",
                model,
            )
            assert ended["at"] >= min(end for *_, end in results) - 0.5
        assert (await plane.admin().call("POST", f"/admin/models/{model}/drain"))[0] == 200


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
