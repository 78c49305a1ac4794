"""What the Endpoint Worker does with one probe round: a pure plan, tested without sockets.

Input: every endpoint row with its job's state and the model's startup timeout, the probe
result (None when not probed, e.g. the job already ended), whether the launcher says the job
is gone, and the time. Output: one action per endpoint. Rules, in order:

1. job ``ended``/``failed``: the endpoint row is removed (its port is freed);
2. the launcher reports the job gone: the job ends (``ended`` if it was being drained or
   cancelled, else ``failed``) and the endpoint is removed;
3. probe answered 200: first time, the endpoint and its job become ready; later, a failure
   count is reset;
4. probe failed: the count grows; an endpoint that never became ready within the model's
   ``startup_timeout_s`` of registering, or a ready one that failed ``dead_after`` probes in a
   row, fails its job with the reason, and is removed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from control.health.probe import ProbeResult

FINAL_JOB_STATES = frozenset({"ended", "failed"})
WINDING_DOWN_STATES = frozenset({"draining", "cancelling"})


@dataclass(frozen=True, slots=True)
class EndpointState:
    endpoint_id: int
    endpoint_job_id: int
    node: str
    port: int
    bearer_token: str
    job_state: str
    launcher: str
    launcher_job_id: str | None
    registered_at: datetime
    ready: bool  # ready_at is set
    consecutive_failures: int
    startup_timeout_s: int


@dataclass(frozen=True, slots=True)
class MarkReady:
    endpoint_id: int
    endpoint_job_id: int


@dataclass(frozen=True, slots=True)
class RecordProbe:
    endpoint_id: int
    consecutive_failures: int


@dataclass(frozen=True, slots=True)
class Remove:
    endpoint_id: int
    endpoint_job_id: int
    job_state: Literal["ended", "failed"] | None  # None: leave the job row as it is
    reason: str


Action = MarkReady | RecordProbe | Remove


def plan_endpoint(
    ep: EndpointState, result: ProbeResult | None, launcher_gone: bool, now: datetime, *, dead_after: int
) -> Action | None:
    if ep.job_state in FINAL_JOB_STATES:
        return Remove(ep.endpoint_id, ep.endpoint_job_id, None, f"job {ep.job_state}")
    if launcher_gone:
        final: Literal["ended", "failed"] = "ended" if ep.job_state in WINDING_DOWN_STATES else "failed"
        return Remove(ep.endpoint_id, ep.endpoint_job_id, final, "launcher reports the job gone")
    if result is None:
        return None
    if result.ok:
        if not ep.ready:
            return MarkReady(ep.endpoint_id, ep.endpoint_job_id)
        if ep.consecutive_failures:
            return RecordProbe(ep.endpoint_id, 0)
        return None
    failures = ep.consecutive_failures + 1
    if not ep.ready and (now - ep.registered_at).total_seconds() > ep.startup_timeout_s:
        return Remove(
            ep.endpoint_id,
            ep.endpoint_job_id,
            "failed",
            f"not ready within startup_timeout_s={ep.startup_timeout_s} ({result.error})",
        )
    if ep.ready and failures >= dead_after:
        return Remove(
            ep.endpoint_id,
            ep.endpoint_job_id,
            "failed",
            f"unresponsive: {failures} consecutive failed health probes ({result.error})",
        )
    return RecordProbe(ep.endpoint_id, failures)


def plan_round(
    endpoints: Iterable[EndpointState],
    results: dict[int, ProbeResult],
    gone: frozenset[int],
    now: datetime,
    *,
    dead_after: int,
) -> list[Action]:
    """Actions for a whole round; ``results`` and ``gone`` are keyed by endpoint id / job id."""
    actions = []
    for ep in endpoints:
        action = plan_endpoint(
            ep, results.get(ep.endpoint_id), ep.endpoint_job_id in gone, now, dead_after=dead_after
        )
        if action is not None:
            actions.append(action)
    return actions


def needs_probe(ep: EndpointState) -> bool:
    return ep.job_state not in FINAL_JOB_STATES
