"""The Job Worker's pure plan: fed rows and observations, checked action by action (no I/O)."""

from __future__ import annotations

from control.jobs.plan import (
    Adopt,
    Cancel,
    CancelOrphan,
    Create,
    Drain,
    FailModel,
    Finish,
    JobView,
    ModelView,
    PlanParams,
    ResetFailures,
    Submit,
    index_observed,
    plan_model,
    plan_orphans,
)
from control.launchers.base import JobState, ObservedJob, Outcome

NOW = 1_000_000.0
P = PlanParams(walltime_lead_s=600, drain_timeout_s=300, drain_grace_s=2, cancel_retry_s=30)


def model(**kw: object) -> ModelView:
    base: dict[str, object] = {"model_id": 1, "name": "m", "state": "active", "desired": 2, "generation": 1,
                               "startup_timeout_s": 1800.0}
    base.update(kw)
    return ModelView(**base)  # type: ignore[arg-type]


def job(eid: int, state: str, lid: str | None = "auto", **kw: object) -> JobView:
    launcher_id = f"L{eid}" if lid == "auto" else lid
    base: dict[str, object] = {"endpoint_job_id": eid, "generation": 1, "state": state,
                               "launcher_job_id": launcher_id, "created_at": NOW - 100 + eid,
                               "has_endpoint": state in ("ready", "draining")}
    base.update(kw)
    return JobView(**base)  # type: ignore[arg-type]


def running(eid: int, start: float = NOW - 50, limit: int | None = None) -> ObservedJob:
    return ObservedJob(launcher_job_id=f"L{eid}", name=f"p-m-g1-e{eid}", state=JobState.RUNNING,
                       start_time=start, time_limit_s=limit)


def ended(eid: int, outcome: Outcome, code: int | None = None) -> ObservedJob:
    return ObservedJob(launcher_job_id=f"L{eid}", name=f"p-m-g1-e{eid}", state=JobState.ENDED,
                       outcome=outcome, exit_code=code)


def test_scale_up_from_zero_creates_desired() -> None:
    assert plan_model(model(desired=2), [], {}, NOW, P) == [Create(1), Create(1)]


def test_steady_state_does_nothing() -> None:
    jobs = [job(1, "ready"), job(2, "ready")]
    assert plan_model(model(), jobs, {1: running(1), 2: running(2)}, NOW, P) == []
    # a job reaching ready clears the failure count
    acts = plan_model(model(failures=2), jobs, {1: running(1), 2: running(2)}, NOW, P)
    assert acts == [ResetFailures(1)]


def test_pending_row_is_adopted_not_resubmitted() -> None:
    # the worker died between submit and the database write: the job exists under its name
    jobs = [job(1, "pending", lid=None), job(2, "ready")]
    acts = plan_model(model(), jobs, {1: running(1), 2: running(2)}, NOW, P)
    assert Adopt(1, "L1") in acts
    assert not any(isinstance(a, (Submit, Create)) for a in acts)


def test_pending_row_unknown_to_launcher_is_submitted() -> None:
    acts = plan_model(model(desired=1), [job(1, "pending", lid=None)], {}, NOW, P)
    assert acts == [Submit(1)]


def test_start_failure_counts_and_replaces_after_backoff() -> None:
    acts = plan_model(model(desired=1), [job(1, "submitted")], {1: ended(1, Outcome.FAILED, 3)}, NOW, P)
    assert acts[0] == Finish(1, "failed", "ended before it became ready: the job failed (exit code 3)",
                             failure=True, read_output=True)
    assert acts[1:] == [Create(1)]
    # during the backoff nothing new is created
    backoff = model(desired=1, retry_not_before=NOW + 10)
    assert plan_model(backoff, [], {}, NOW, P) == []
    # a failed model keeps quiet
    assert plan_model(model(desired=1, state="failed"), [], {}, NOW, P) == []


def test_ready_job_killed_outside_is_replaced_without_failure() -> None:
    jobs = [job(1, "ready"), job(2, "ready")]
    acts = plan_model(model(), jobs, {1: ended(1, Outcome.CANCELLED), 2: running(2)}, NOW, P)
    assert Finish(1, "ended", "the job was cancelled outside hpcgate") in acts
    assert Create(1) in acts
    assert not any(isinstance(a, Finish) and a.failure for a in acts)


def test_vanished_job_is_finished() -> None:
    acts = plan_model(model(desired=1), [job(1, "ready")], {}, NOW, P)
    assert acts[0] == Finish(1, "ended", "the launcher no longer knows the job")


def test_scale_down_drains_ready_then_cancels_when_idle() -> None:
    jobs = [job(1, "ready"), job(2, "ready", created_at=NOW - 10)]
    acts = plan_model(model(desired=1), jobs, {1: running(1), 2: running(2)}, NOW, P)
    assert Drain(2, "scaled down") in acts  # the newest goes first
    assert not any(isinstance(a, Cancel) for a in acts)
    draining = job(2, "draining", draining_since=NOW - 1, in_flight=0)
    # within the grace period: wait even with nothing in flight
    acts = plan_model(model(desired=1), [jobs[0], draining], {1: running(1), 2: running(2)}, NOW, P)
    assert not any(isinstance(a, Cancel) for a in acts)
    # after the grace period with requests in flight: wait
    busy = job(2, "draining", draining_since=NOW - 10, in_flight=3)
    acts = plan_model(model(desired=1), [jobs[0], busy], {1: running(1), 2: running(2)}, NOW, P)
    assert not any(isinstance(a, Cancel) for a in acts)
    idle = job(2, "draining", draining_since=NOW - 10, in_flight=0)
    acts = plan_model(model(desired=1), [jobs[0], idle], {1: running(1), 2: running(2)}, NOW, P)
    assert Cancel(2, "L2", "drained") in acts
    # the deadline wins over requests in flight
    late = job(2, "draining", draining_since=NOW - 301, in_flight=5)
    acts = plan_model(model(desired=1), [jobs[0], late], {1: running(1), 2: running(2)}, NOW, P)
    assert Cancel(2, "L2", "drain deadline (300s) passed") in acts


def test_scale_down_prefers_jobs_not_yet_serving() -> None:
    jobs = [job(1, "ready"), job(2, "submitted"), job(3, "pending", lid=None)]
    acts = plan_model(model(desired=1), jobs, {1: running(1), 2: running(2)}, NOW, P)
    assert Finish(3, "ended", "scaled down before it was submitted") in acts
    assert Cancel(2, "L2", "scaled down") in acts
    assert not any(isinstance(a, Drain) for a in acts)


def test_scale_to_zero_and_model_draining() -> None:
    jobs = [job(1, "ready"), job(2, "ready")]
    obs = {1: running(1), 2: running(2)}
    acts = plan_model(model(desired=0), jobs, obs, NOW, P)
    assert {a.endpoint_job_id for a in acts if isinstance(a, Drain)} == {1, 2}
    acts = plan_model(model(state="draining"), jobs, obs, NOW, P)
    assert {a.reason for a in acts if isinstance(a, Drain)} == {"model is draining"}


def test_cancelling_job_is_finished_when_gone_and_cancel_resent() -> None:
    recent = job(1, "cancelling", cancel_requested_at=NOW - 5)
    assert plan_model(model(desired=0), [recent], {1: running(1)}, NOW, P) == []
    stale = job(1, "cancelling", cancel_requested_at=NOW - 31)
    acts = plan_model(model(desired=0), [stale], {1: running(1)}, NOW, P)
    assert acts == [Cancel(1, "L1", "cancel requested")]
    acts = plan_model(model(desired=0), [job(1, "cancelling")], {1: ended(1, Outcome.CANCELLED)}, NOW, P)
    assert acts == [Finish(1, "ended", "stopped by hpcgate")]


def test_walltime_replacement_then_drain_old() -> None:
    old = job(1, "ready")
    near_end = running(1, start=NOW - 3500, limit=3600)  # 100 s left < 600 s lead
    acts = plan_model(model(desired=1), [old], {1: near_end}, NOW, P)
    assert Create(1, replaces=1) in acts
    assert not any(isinstance(a, Create) and a.replaces is None for a in acts)
    # the replacement exists but is not ready: nothing else happens, and no second replacement
    new = job(2, "submitted", replaces=1)
    acts = plan_model(model(desired=1), [old, new], {1: near_end, 2: running(2)}, NOW, P)
    assert not any(isinstance(a, (Create, Drain, Cancel)) for a in acts)
    # the replacement is ready: drain the old one
    new_ready = job(2, "ready", replaces=1)
    acts = plan_model(model(desired=1), [old, new_ready], {1: near_end, 2: running(2)}, NOW, P)
    assert Drain(1, "replaced by endpoint job 2") in acts
    assert not any(isinstance(a, Create) for a in acts)


def test_generation_change_rolls_jobs() -> None:
    acts = plan_model(model(desired=1, generation=2), [job(1, "ready")], {1: running(1)}, NOW, P)
    assert Create(1, replaces=1) in acts


def test_startup_timeout_is_a_failure() -> None:
    slow = running(1, start=NOW - 1801)
    acts = plan_model(model(desired=1), [job(1, "registered")], {1: slow}, NOW, P)
    assert acts[0] == Finish(1, "failed", "not ready 1800s after it started", failure=True, read_output=True,
                             cancel_launcher_job="L1")
    # queue time does not count: a pending job is never timed out
    queued = ObservedJob(launcher_job_id="L1", name="x", state=JobState.PENDING)
    assert plan_model(model(desired=1), [job(1, "submitted")], {1: queued}, NOW, P) == []


def test_config_error_fails_model_and_ends_pending_rows() -> None:
    bad = model(desired=1, config_error="slurm_resources.time: malformed")
    acts = plan_model(bad, [job(1, "pending", lid=None)], {}, NOW, P)
    assert FailModel(1, "slurm_resources.time: malformed") in acts
    assert Finish(1, "ended", "slurm_resources.time: malformed") in acts
    assert not any(isinstance(a, (Create, Submit)) for a in acts)


def test_orphans_and_duplicates() -> None:
    obs = {5: running(5), 6: ended(6, Outcome.COMPLETED), 7: running(7)}
    acts = plan_orphans(obs, live_ids={7}, claimed_launcher_ids=set())
    assert acts == [CancelOrphan("L5", "p-m-g1-e5", "no live endpoint job 5 claims it")]
    a = ObservedJob(launcher_job_id="100", name="p-m-g1-e9", state=JobState.RUNNING)
    b = ObservedJob(launcher_job_id="101", name="p-m-g1-e9", state=JobState.RUNNING)
    chosen, extra = index_observed([a, b], {"p-m-g1-e9": 9}, {9: "101"})
    assert chosen[9] is b
    assert extra == [CancelOrphan("100", "p-m-g1-e9", "duplicate launcher job for one endpoint job")]
    chosen, extra = index_observed([a, b], {"p-m-g1-e9": 9}, {9: None})
    assert chosen[9] is a and [x.launcher_job_id for x in extra if isinstance(x, CancelOrphan)] == ["101"]
