"""The pure half of ``hpcgate bench chaos``: fault schedules, request outcomes, the report.

Nothing here starts a process or opens a socket; :mod:`bench.chaos` runs the stack and the load
and hands this module plain data (one :class:`Outcome` per request, the times of the faults,
samples of the ready-instance count and of the gateway's resources, the usage PostgreSQL holds).
The invariants the issue asks for are computed here, so they are unit-tested by feeding data:

- no request fails before its first byte while an instance of its model was ready (the gateway
  retries those): ``failed_while_ready == 0``;
- a stream cut by a killed or stalled instance ends with an SSE error event; none hangs;
- a 503 comes only while no instance was ready, and carries ``Retry-After``;
- per tenant, the tokens in PostgreSQL equal the tokens the clients were told, across Redis
  and PostgreSQL restarts and SIGKILLed gateway workers (their successors write what they had
  counted: gateway/usage_spool.py);
- the gateway's RSS and open descriptors end near where they started (no leak).

A request a SIGKILLed gateway worker was serving dies with it (no process is left to write an
error event): a connection that failed while the kill happened is counted as
``lost_with_gateway_worker``, not as a violation.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

FAULT_KINDS: tuple[str, ...] = (
    "kill_instance", "kill_gateway_worker", "restart_redis", "restart_postgres",
    "kill_endpoint_worker", "kill_job_worker", "stall_instance", "kill_gateway_worker_redis_down",
)
REQUEST_KINDS: tuple[str, ...] = ("chat_stream", "chat", "completion_stream", "completion", "embedding")


@dataclass(frozen=True)
class Profile:
    """How long and how hard one chaos run is."""

    name: str
    duration_s: float  # the fault schedule repeats until this much time has passed (one pass at least)
    gap_s: float  # load without faults between one fault's recovery and the next fault
    concurrency: int  # client requests in flight
    tenants: int
    instances: int  # desired instances of the model
    gateway_workers: int
    stall_s: float  # how long a stalled instance stays stopped (longer than the run's 3 s read timeout)
    down_s: float  # how long Redis and PostgreSQL stay down when restarted
    recover_timeout_s: float  # a fault not recovered after this is a violation
    max_tokens: int  # output tokens per request (upper bound; streams last tokens x 20 ms)


PROFILES: dict[str, Profile] = {
    "quick": Profile("quick", duration_s=0, gap_s=2.0, concurrency=6, tenants=3, instances=2,
                     gateway_workers=2, stall_s=5.0, down_s=1.0, recover_timeout_s=40.0, max_tokens=24),
    "full": Profile("full", duration_s=300, gap_s=8.0, concurrency=12, tenants=4, instances=2,
                    gateway_workers=2, stall_s=8.0, down_s=3.0, recover_timeout_s=60.0, max_tokens=48),
}


def schedule(kinds: Sequence[str], elapsed_s: float, passes_done: int, duration_s: float) -> bool:
    """Whether another pass of ``kinds`` starts: always the first, then while time is left."""
    return bool(kinds) and (passes_done == 0 or elapsed_s < duration_s)


def parse_faults(text: str) -> tuple[str, ...]:
    """``--faults a,b``: known fault kinds in the given order; ValueError naming an unknown one."""
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if unknown:
        raise ValueError(f"unknown fault {unknown[0]!r} (known: {', '.join(FAULT_KINDS)})")
    return kinds


def request_kind(n: int) -> str:
    """The mix: streaming chat is the common case; every kind appears in any 10 requests."""
    return ("chat_stream", "chat_stream", "chat_stream", "chat", "completion_stream", "completion_stream",
            "completion", "embedding", "chat_stream", "completion_stream")[n % 10]


@dataclass
class Outcome:
    """What one client saw of one request. Times are seconds since the run started."""

    kind: str
    tenant: str
    start: float
    end: float = 0.0
    status: int = 0  # 0: no response head arrived
    retry_after: bool = False
    request_id: str = ""
    got_bytes: bool = False  # any byte of the response arrived
    complete: bool = False  # the whole response: [DONE] of a stream, or a parsed body
    error_event: bool = False  # a stream ended with an SSE error event
    timed_out: bool = False  # the client gave up: a hang
    prompt_tokens: int = 0  # from the usage the response carried
    completion_tokens: int = 0
    data_events: int = 0  # SSE data events of a stream, [DONE] and the gateway's error event left out
    error: str = ""

    @property
    def stream(self) -> bool:
        return self.kind.endswith("_stream")


@dataclass(frozen=True)
class Fault:
    kind: str
    at: float  # seconds since the run started
    recovery_s: float | None  # None: not recovered within the profile's timeout
    detail: str = ""


def ready_at(timeline: Sequence[tuple[float, int]], t: float) -> int:
    """Ready instances at ``t``: the last sample at or before it (the first one before any)."""
    if not timeline:
        return 0
    value = timeline[0][1]
    for at, n in timeline:
        if at > t:
            break
        value = n
    return value


def min_ready(timeline: Sequence[tuple[float, int]], start: float, end: float) -> int:
    """The fewest ready instances over ``[start, end]``."""
    values = [ready_at(timeline, start)] + [n for at, n in timeline if start < at <= end]
    return min(values)


def during_gateway_kill(o: Outcome, kills: Iterable[float], slack_s: float = 1.0) -> bool:
    """The request was in flight when a gateway worker was SIGKILLed and failed right after."""
    return any(o.start <= k + 0.05 and k - 0.05 <= o.end <= k + slack_s for k in kills)


def classify(o: Outcome, timeline: Sequence[tuple[float, int]], gateway_kills: Sequence[float]) -> str:
    """One category per request; the ones named in :data:`VIOLATIONS` break an invariant."""
    if o.timed_out:
        return "hung"
    if o.status == 200 and o.complete and not o.error_event:
        return "ok"
    if o.status == 200 and o.stream and o.got_bytes:
        if o.error_event:
            return "cut_with_error_event"
        return "lost_with_gateway_worker" if during_gateway_kill(o, gateway_kills) else "cut_without_event"
    if o.status == 0 and during_gateway_kill(o, gateway_kills):
        return "lost_with_gateway_worker"
    if o.status == 503 and min_ready(timeline, o.start, o.end) == 0:
        return "rejected_503" if o.retry_after else "rejected_503_without_retry_after"
    if 400 <= o.status < 500 and o.status != 429:
        return "client_error"
    if min_ready(timeline, o.start, o.end) > 0:
        return "failed_while_ready"
    return "failed_none_ready"


VIOLATIONS = ("hung", "cut_without_event", "rejected_503_without_retry_after", "client_error",
              "failed_while_ready")


def expected_usage(outcomes: Sequence[Outcome]) -> dict[str, tuple[int, int]]:
    """Per tenant, the (prompt, completion) tokens PostgreSQL must hold for what the clients saw:
    the usage of every complete response, plus for each stream cut with an error event the
    gateway's count of what it relayed (no usage event came: its content events, the first
    data event, the role or the [DONE] it assumes, not counted; gateway/sse.py)."""
    out: dict[str, tuple[int, int]] = {}
    for o in outcomes:
        if o.status != 200:
            continue
        if o.complete and not o.error_event:
            add = (o.prompt_tokens, o.completion_tokens)
        elif o.stream and o.error_event:
            add = (0, max(0, o.data_events - 1))
        else:
            continue
        p, c = out.get(o.tenant, (0, 0))
        out[o.tenant] = (p + add[0], c + add[1])
    return out


def usage_check(outcomes: Sequence[Outcome],
                recorded: dict[str, tuple[int, int]]) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Compare the usage clients were told (:func:`expected_usage`) with PostgreSQL's per tenant."""
    received = expected_usage(outcomes)
    table: dict[str, dict[str, int]] = {}
    problems: list[str] = []
    for tenant in sorted(set(received) | set(recorded)):
        got_p, got_c = received.get(tenant, (0, 0))
        pg_p, pg_c = recorded.get(tenant, (0, 0))
        lost = (got_p + got_c) - (pg_p + pg_c)
        table[tenant] = {"received_prompt": got_p, "received_completion": got_c, "recorded_prompt": pg_p,
                         "recorded_completion": pg_c, "lost": lost}
        if pg_p > got_p or pg_c > got_c:
            problems.append(f"tenant {tenant}: PostgreSQL holds more than clients received "
                            f"({pg_p}+{pg_c} > {got_p}+{got_c})")
        elif lost:
            problems.append(f"tenant {tenant}: {lost} tokens lost ({pg_p}+{pg_c} in PostgreSQL, "
                            f"clients received {got_p}+{got_c})")
    return table, problems


def flat(samples: Sequence[float], *, ratio: float, slack: float) -> bool:
    """The last quarter's median is at most ``ratio`` x the first quarter's median + ``slack``."""
    if len(samples) < 4:
        return True
    q = len(samples) // 4
    first, last = statistics.median(samples[:q]), statistics.median(samples[-q:])
    return last <= first * ratio + slack


@dataclass
class Resources:
    """The gateway's (master + workers) RSS and open descriptors, sampled through the run; the
    idle descriptor counts before the load starts and after it has stopped and drained."""

    rss_mib: list[float] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    fds_idle_before: int = 0
    fds_idle_after: int = 0


def resources_check(r: Resources, pooled_max: int) -> tuple[dict[str, object], list[str]]:
    """``pooled_max``: the idle upstream connections the workers may keep after the load (one
    per client in flight, per worker and instance); one descriptor leaked per request would be
    hundreds more."""
    problems = []
    rss_flat = flat(r.rss_mib, ratio=1.3, slack=32.0)
    fds_flat = r.fds_idle_after <= r.fds_idle_before + pooled_max
    if not rss_flat:
        problems.append(f"gateway RSS grew: {r.rss_mib[: len(r.rss_mib) // 4]} ... {r.rss_mib[-4:]}")
    if not fds_flat:
        problems.append(f"gateway descriptors grew: {r.fds_idle_before} idle before, "
                        f"{r.fds_idle_after} after")
    summary: dict[str, object] = {
        "rss_mib": {"first": r.rss_mib[0] if r.rss_mib else 0, "max": max(r.rss_mib, default=0),
                    "last": r.rss_mib[-1] if r.rss_mib else 0, "flat": rss_flat},
        "fds": {"idle_before": r.fds_idle_before, "idle_after": r.fds_idle_after,
                "max": max(r.fds, default=0), "flat": fds_flat},
        "samples": len(r.rss_mib),
    }
    return summary, problems


def build_report(*, profile: Profile, outcomes: Sequence[Outcome], faults: Sequence[Fault],
                 timeline: Sequence[tuple[float, int]], recorded: dict[str, tuple[int, int]],
                 resources: Resources, jobs: dict[str, object],
                 job_problems: Sequence[str], duration_s: float) -> dict[str, object]:
    """Everything the run found, and ``violations``: each broken invariant, one line each."""
    kills = [f.at for f in faults if f.kind.startswith("kill_gateway_worker")]
    categories: dict[str, int] = {}
    by_kind: dict[str, dict[str, int]] = {}
    examples: dict[str, list[dict[str, object]]] = {}
    for o in outcomes:
        cat = classify(o, timeline, kills)
        categories[cat] = categories.get(cat, 0) + 1
        per = by_kind.setdefault(o.kind, {"total": 0, "ok": 0})
        per["total"] += 1
        per["ok"] += cat == "ok"
        if cat != "ok" and len(examples.setdefault(cat, [])) < 5:
            examples[cat].append({"kind": o.kind, "start": round(o.start, 3), "end": round(o.end, 3),
                                  "status": o.status, "error": o.error[:200], "request_id": o.request_id})
    usage, usage_problems = usage_check(outcomes, recorded)
    res, res_problems = resources_check(
        resources, profile.concurrency * profile.gateway_workers * (profile.instances + 1))
    violations = [f"{categories[c]} request(s) {c.replace('_', ' ')}"
                  for c in VIOLATIONS if categories.get(c)]
    violations += [f"{f.kind} at {f.at:.1f}s: not recovered within {profile.recover_timeout_s:.0f}s"
                   for f in faults if f.recovery_s is None]
    violations += usage_problems + res_problems + list(job_problems)
    if not any(c == "ok" for c in categories):
        violations.append("no request succeeded")
    ok = categories.get("ok", 0)
    return {
        "profile": profile.name,
        "duration_s": round(duration_s, 1),
        "requests": {"total": len(outcomes), "ok": ok, "failed": len(outcomes) - ok,
                     "categories": dict(sorted(categories.items())), "by_kind": by_kind},
        "failed_while_ready": categories.get("failed_while_ready", 0),
        "cut_midstream": {"with_error_event": categories.get("cut_with_error_event", 0),
                          "without_error_event": categories.get("cut_without_event", 0),
                          "hung": categories.get("hung", 0)},
        "rejected_503": {"with_retry_after": categories.get("rejected_503", 0),
                         "without_retry_after": categories.get("rejected_503_without_retry_after", 0)},
        "lost_with_gateway_worker": categories.get("lost_with_gateway_worker", 0),
        "usage": usage,
        "jobs": jobs,
        "resources": res,
        "faults": [{"kind": f.kind, "at_s": round(f.at, 2),
                    "recovery_s": None if f.recovery_s is None else round(f.recovery_s, 2),
                    "client_recovery_s": client_recovery(outcomes, f, faults, timeline, kills),
                    "detail": f.detail} for f in faults],
        "examples": examples,
        "violations": violations,
    }


def client_recovery(outcomes: Sequence[Outcome], fault: Fault, faults: Sequence[Fault],
                    timeline: Sequence[tuple[float, int]], kills: Sequence[float]) -> float:
    """Seconds from the fault until the end of the last request that did not succeed, among
    those that ended between this fault and the next; 0 when every one of them succeeded."""
    later = [f.at for f in faults if f.at > fault.at]
    until = min(later) if later else float("inf")
    worst = 0.0
    for o in outcomes:
        if fault.at <= o.end < until and classify(o, timeline, kills) != "ok":
            worst = max(worst, o.end - fault.at)
    return round(worst, 2)


def progress_line(elapsed: float, phase: str, outcomes: Sequence[Outcome]) -> str:
    done = [o for o in outcomes if o.end]
    ok = sum(1 for o in done if o.status == 200 and o.complete and not o.error_event)
    return f"{elapsed:7.1f}s  {phase:<28} requests {len(done):6d}  ok {ok:6d}  not ok {len(done) - ok:5d}"


def format_table(report: dict[str, object]) -> str:
    """The human summary: the request categories, each fault's recovery, usage, resources."""
    req = report["requests"]
    assert isinstance(req, dict)
    lines = [f"chaos ({report['profile']}, {report['duration_s']} s): {req['total']} requests, "
             f"{req['ok']} ok, {req['failed']} not ok", "", f"{'outcome':<36}{'requests':>10}"]
    lines += [f"{cat:<36}{n:>10}" for cat, n in req["categories"].items()]
    lines += ["", f"{'fault':<31}{'at s':>8}{'recovered s':>13}{'clients ok again s':>20}  detail"]
    for f in report["faults"]:  # type: ignore[attr-defined]
        rec = "NOT" if f["recovery_s"] is None else f"{f['recovery_s']:.1f}"
        lines.append(f"{f['kind']:<31}{f['at_s']:>8.1f}{rec:>13}{f['client_recovery_s']:>20.1f}  "
                     f"{f['detail']}")
    lines += ["", f"{'tenant':<16}{'received tokens':>17}{'in PostgreSQL':>15}{'lost':>7}"]
    for tenant, u in report["usage"].items():  # type: ignore[attr-defined]
        lines.append(f"{tenant:<16}{u['received_prompt'] + u['received_completion']:>17}"
                     f"{u['recorded_prompt'] + u['recorded_completion']:>15}{u['lost']:>7}")
    res = report["resources"]
    assert isinstance(res, dict)
    lines += ["", f"gateway RSS MiB first {res['rss_mib']['first']:.0f} max {res['rss_mib']['max']:.0f} "
              f"last {res['rss_mib']['last']:.0f}; descriptors idle before {res['fds']['idle_before']} "
              f"after {res['fds']['idle_after']} (max {res['fds']['max']})"]
    lines.append(f"jobs: {report['jobs']}")
    violations = report["violations"]
    assert isinstance(violations, list)
    lines += ["", "invariants: all hold" if not violations else "VIOLATIONS:"]
    lines += [f"  - {v}" for v in violations]
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("chaos", help="the whole stack under mixed load while faults are injected; checks "
                       "that nothing is lost")
    p.add_argument("--quick", action="store_true", help="one pass of the faults, small load (about a minute)")
    p.add_argument("--duration", type=float, help="repeat the fault schedule for this many seconds "
                   "(default: 300, or one pass with --quick)")
    p.add_argument("--faults", default=",".join(FAULT_KINDS),
                   help=f"comma-separated, in order (default all: {','.join(FAULT_KINDS)})")
    p.add_argument("--concurrency", type=int,
                   help="client requests in flight (default 12, or 6 with --quick)")
    p.add_argument("--result-file", help="JSON results path (default: <results_dir>/chaos-<time>.json)")
    p.add_argument("--keep-logs", action="store_true",
                   help="keep the daemons' logs next to the JSON (RESULT.logs) even when all invariants hold")
