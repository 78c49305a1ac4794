"""The Job Worker's decisions: desired state + observed state -> actions. Pure, no I/O, no clock.

``plan_model`` is level-based (STYLE §2.9): it looks only at what is true now (the model's row,
its live job rows, what the launcher reports, in-flight counts of draining endpoints) and
returns the actions that move it towards the goal. Every action is safe to repeat, so a plan
computed from slightly stale data, or re-run after a crash, never does harm:

- a pending row with no launcher id is first looked up by name (``Adopt``) and only submitted
  when the launcher has no job of that name (``Submit``): no duplicate after a crash;
- a launcher job with our name prefix that no live row claims is cancelled (``CancelOrphan``);
- a job is removed from service by draining first (``Drain``: no new requests), then cancelled
  once its in-flight count is 0 after a grace period, or when the drain deadline passes;
- a ready job near its time limit, or of an older generation, gets a replacement first
  (``Create(replaces=...)``); it is drained once the replacement is ready, so capacity never
  drops to zero because of an expiring job;
- a job that ends before becoming ready counts as a start failure (``Finish(failure=True)``):
  the store backs the model off and marks it failed after ``max_failures`` in a row.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import msgspec

from control.launchers.base import JobState, ObservedJob, Outcome

LIVE_STATES = ("pending", "submitted", "registered", "ready", "draining", "cancelling")
ACTIVE_STATES = ("pending", "submitted", "registered", "ready")


class PlanParams(msgspec.Struct, frozen=True, kw_only=True):
    walltime_lead_s: float = 600.0  # submit a replacement this long before the time limit
    drain_timeout_s: float = 300.0  # cancel a draining job after this even with requests in flight
    drain_grace_s: float = 2.0  # let gateways see the draining flag before trusting "0 in flight"
    cancel_retry_s: float = 30.0  # re-send a cancel that has not taken effect


class ModelView(msgspec.Struct, frozen=True, kw_only=True):
    model_id: int
    name: str
    state: str  # active | draining | failed
    desired: int
    generation: int
    startup_timeout_s: float
    retry_not_before: float | None = None  # unix time; no new job before it (failure backoff)
    failures: int = 0  # consecutive start failures so far
    config_error: str | None = None  # resources/template invalid: terminal until changed


class JobView(msgspec.Struct, frozen=True, kw_only=True):
    endpoint_job_id: int
    generation: int
    state: str
    launcher_job_id: str | None = None
    created_at: float = 0.0
    ready_at: float | None = None
    replaces: int | None = None
    draining_since: float | None = None
    cancel_requested_at: float | None = None
    has_endpoint: bool = False
    in_flight: int | None = None  # scraped running+waiting of a draining endpoint; None: unknown


# --- actions ------------------------------------------------------------------------------


class Create(msgspec.Struct, frozen=True, tag=True):
    model_id: int
    replaces: int | None = None


class Submit(msgspec.Struct, frozen=True, tag=True):
    endpoint_job_id: int


class Adopt(msgspec.Struct, frozen=True, tag=True):
    endpoint_job_id: int
    launcher_job_id: str


class Drain(msgspec.Struct, frozen=True, tag=True):
    endpoint_job_id: int
    reason: str


class Cancel(msgspec.Struct, frozen=True, tag=True):
    """Stop the launcher job; the row becomes ``cancelling`` and ends when the job is gone."""

    endpoint_job_id: int
    launcher_job_id: str | None
    reason: str


class Finish(msgspec.Struct, frozen=True, tag=True):
    """The job is over: final state, reason; ``failure`` counts towards the model's failures."""

    endpoint_job_id: int
    state: str  # ended | failed
    reason: str
    failure: bool = False
    read_output: bool = False  # append the tail of the job's output to the reason
    cancel_launcher_job: str | None = None  # still alive at the launcher: cancel it too


class CancelOrphan(msgspec.Struct, frozen=True, tag=True):
    launcher_job_id: str
    name: str
    reason: str


class FailModel(msgspec.Struct, frozen=True, tag=True):
    model_id: int
    reason: str


class ResetFailures(msgspec.Struct, frozen=True, tag=True):
    model_id: int


Action = Create | Submit | Adopt | Drain | Cancel | Finish | CancelOrphan | FailModel | ResetFailures


# --- pure helpers -------------------------------------------------------------------------


def ended_reason(obs: ObservedJob | None) -> str:
    if obs is None:
        return "the launcher no longer knows the job"
    what = {
        Outcome.COMPLETED: "the job exited",
        Outcome.FAILED: "the job failed",
        Outcome.CANCELLED: "the job was cancelled outside hpcgate",
        Outcome.TIMEOUT: "the job reached its time limit",
    }.get(obs.outcome or Outcome.UNKNOWN, "the job ended")
    details = []
    if obs.exit_code is not None:
        details.append(f"exit code {obs.exit_code}")
    if obs.reason:
        details.append(f"reason {obs.reason}")
    return f"{what} ({', '.join(details)})" if details else what


def remaining_s(obs: ObservedJob | None, now: float) -> float | None:
    """Seconds until the job's time limit; None when unlimited or not started."""
    if obs is None or obs.start_time is None or obs.time_limit_s is None:
        return None
    return obs.start_time + obs.time_limit_s - now


def _victim_order(job: JobView, obs: ObservedJob | None, model: ModelView, now: float) -> tuple[float, ...]:
    """Sort key for scale-down: not-yet-serving jobs first, then old generation, then the
    ready job with the least time left, then the newest."""
    stage = {"pending": 0, "submitted": 1, "registered": 2, "ready": 3}.get(job.state, 4)
    old = 0 if job.generation < model.generation else 1
    left = remaining_s(obs, now)
    return (stage, old, left if left is not None else float("inf"), -job.created_at)


# --- the plan -----------------------------------------------------------------------------


def plan_model(
    model: ModelView,
    jobs: Iterable[JobView],
    observed: Mapping[int, ObservedJob],
    now: float,
    params: PlanParams,
) -> list[Action]:
    """Actions for one model. ``observed`` maps endpoint job ids (from job names) to what the
    launcher reports; a job missing from it is gone."""
    actions: list[Action] = []
    live = [j for j in jobs if j.state in LIVE_STATES]
    active: list[JobView] = []

    for job in live:
        obs = observed.get(job.endpoint_job_id)
        if job.launcher_job_id is None:
            if obs is not None:
                actions.append(Adopt(job.endpoint_job_id, obs.launcher_job_id))
                if job.state in ACTIVE_STATES:
                    active.append(job)
            elif job.state in ("cancelling", "draining"):
                actions.append(Finish(job.endpoint_job_id, "ended", "cancelled before it was submitted"))
            else:
                active.append(job)  # submitted below if still wanted
            continue
        if obs is None or not obs.alive:
            if job.state in ("cancelling", "draining"):
                code = f" (exit code {obs.exit_code})" if obs and obs.exit_code else ""
                reason = f"stopped by hpcgate{code}"
                actions.append(Finish(job.endpoint_job_id, "ended", reason))
            elif job.state == "ready":
                actions.append(Finish(job.endpoint_job_id, "ended", ended_reason(obs)))
            else:
                actions.append(Finish(job.endpoint_job_id, "failed", f"ended before it became ready: "
                                      f"{ended_reason(obs)}", failure=True, read_output=True))
            continue
        if job.state == "cancelling":
            if job.cancel_requested_at is None or now - job.cancel_requested_at >= params.cancel_retry_s:
                actions.append(Cancel(job.endpoint_job_id, job.launcher_job_id, "cancel requested"))
            continue
        if job.state == "draining":
            if job.draining_since is None:
                actions.append(Drain(job.endpoint_job_id, "drain requested"))
                continue
            drained = job.in_flight == 0 and now - job.draining_since >= params.drain_grace_s
            if not job.has_endpoint or drained:
                actions.append(Cancel(job.endpoint_job_id, job.launcher_job_id, "drained"))
            elif now - job.draining_since >= params.drain_timeout_s:
                actions.append(Cancel(job.endpoint_job_id, job.launcher_job_id,
                                      f"drain deadline ({params.drain_timeout_s:g}s) passed"))
            continue
        # pending/submitted/registered/ready and alive at the launcher
        started = obs.start_time
        if (job.state in ("submitted", "registered", "pending") and obs.state is JobState.RUNNING
                and started is not None and now - started > model.startup_timeout_s):
            actions.append(Finish(job.endpoint_job_id, "failed",
                                  f"not ready {model.startup_timeout_s:g}s after it started",
                                  failure=True, read_output=True, cancel_launcher_job=job.launcher_job_id))
            continue
        active.append(job)

    if model.state == "active" and model.config_error is not None:
        actions.append(FailModel(model.model_id, model.config_error))
    if (model.failures or model.retry_not_before is not None) and any(j.state == "ready" for j in active):
        actions.append(ResetFailures(model.model_id))

    wanted = 0 if model.state == "draining" else model.desired
    can_create = (model.state == "active" and model.config_error is None
                  and (model.retry_not_before is None or now >= model.retry_not_before))

    by_id = {j.endpoint_job_id: j for j in active}
    replaced = {j.replaces for j in active if j.replaces is not None and j.replaces in by_id}
    counted = [j for j in active if j.endpoint_job_id not in replaced]
    drained_now: set[int] = set()

    # A ready replacement takes over: drain the job it replaces.
    for job in active:
        if job.replaces in by_id and job.state == "ready":
            actions.append(Drain(job.replaces, f"replaced by endpoint job {job.endpoint_job_id}"))
            drained_now.add(job.replaces)

    # Too many: stop the surplus, least useful first.
    surplus = len(counted) - wanted
    if surplus > 0:
        order = sorted(counted, key=lambda j: _victim_order(j, observed.get(j.endpoint_job_id), model, now))
        for job in order[:surplus]:
            counted.remove(job)
            reason = "scaled down" if model.state == "active" else f"model is {model.state}"
            if job.state == "ready":
                actions.append(Drain(job.endpoint_job_id, reason))
            elif job.launcher_job_id is None and job.endpoint_job_id not in observed:
                actions.append(Finish(job.endpoint_job_id, "ended", f"{reason} before it was submitted"))
            else:
                launcher_id = job.launcher_job_id or observed[job.endpoint_job_id].launcher_job_id
                actions.append(Cancel(job.endpoint_job_id, launcher_id, reason))
            drained_now.add(job.endpoint_job_id)

    # Pending rows still wanted and unknown to the launcher: submit them.
    for job in counted:
        if job.launcher_job_id is None and job.endpoint_job_id not in observed:
            if can_create:
                actions.append(Submit(job.endpoint_job_id))
            elif model.config_error is not None or model.state != "active":
                reason = model.config_error or f"model is {model.state}"
                actions.append(Finish(job.endpoint_job_id, "ended", reason))

    # Replacements for ready jobs that expire soon or run an old generation.
    for job in counted:
        if job.state != "ready" or job.endpoint_job_id in drained_now:
            continue
        left = remaining_s(observed.get(job.endpoint_job_id), now)
        expiring = left is not None and left <= params.walltime_lead_s
        if (expiring or job.generation < model.generation) and can_create:
            actions.append(Create(model.model_id, replaces=job.endpoint_job_id))

    # Too few: create the missing jobs.
    if can_create:
        actions.extend(Create(model.model_id) for _ in range(wanted - len(counted)))
    return actions


def plan_orphans(
    prefix_ids: Mapping[int, ObservedJob], live_ids: set[int], claimed_launcher_ids: set[str]
) -> list[Action]:
    """Launcher jobs with our name that no live row claims (the row ended, failed, was never
    written or was deleted): cancel them so nothing runs unaccounted for."""
    actions: list[Action] = []
    for endpoint_job_id, obs in prefix_ids.items():
        if not obs.alive or endpoint_job_id in live_ids or obs.launcher_job_id in claimed_launcher_ids:
            continue
        actions.append(CancelOrphan(obs.launcher_job_id, obs.name,
                                    f"no live endpoint job {endpoint_job_id} claims it"))
    return actions


def index_observed(
    jobs: Iterable[ObservedJob], ids_of: Mapping[str, int], row_launcher_ids: Mapping[int, str | None]
) -> tuple[dict[int, ObservedJob], list[Action]]:
    """Map launcher jobs to endpoint job ids (``ids_of``: job name -> id) and cancel duplicates.

    Two launcher jobs may carry one name only if something submitted twice (a bug or a second
    worker); the one the row records wins, else the live one, and other live ones are cancelled.
    """
    chosen: dict[int, ObservedJob] = {}
    extras: list[ObservedJob] = []
    for obs in jobs:
        eid = ids_of.get(obs.name)
        if eid is None:
            continue
        current = chosen.get(eid)
        if current is None:
            chosen[eid] = obs
            continue
        recorded = row_launcher_ids.get(eid)
        if current.launcher_job_id == recorded:
            prefer_new = False
        else:
            prefer_new = obs.launcher_job_id == recorded or (obs.alive and not current.alive)
        keep, drop = (obs, current) if prefer_new else (current, obs)
        chosen[eid] = keep
        extras.append(drop)
    reason = "duplicate launcher job for one endpoint job"
    actions: list[Action] = [CancelOrphan(o.launcher_job_id, o.name, reason) for o in extras if o.alive]
    return chosen, actions
