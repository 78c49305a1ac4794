"""The autoscaler's policy: signals in, one desired instance count out. Pure; no I/O, no clock.

Every call of :func:`decide` gets the model's limits and thresholds (:class:`PolicyConfig`),
its memory (:class:`PolicyState`, owned by the caller, one per model), one observation
(:class:`Signals`, with the time it was taken) and the current desired count, and returns an
:class:`Outcome`: the new count and the rule that chose it, or the reason it held.

Rules, in order (the first that applies wins):

1. **limits**: a desired count outside ``[min, max]`` is clamped at once.
2. **zero to one**: a model at zero with demand (requests held in a gateway or waiting in an
   engine) goes to one at once: no sustain window, no cooldown.
3. **unknown**: when the load of the ready instances cannot be read, nothing changes (missing
   data is never taken for zero load) and the timers keep their state.
4. **queue time** (the paper's rule, ``mode = "queue_time"``): the effective queue time
   stays above ``scale_up_queue_time_s`` for ``scale_up_sustain_s`` → +1. The effective queue
   time is the largest of the engines' mean queue time over their window, the length of that
   window when requests waited but none was scheduled in it (vLLM records queue time only when
   a request is scheduled, so a stalled queue shows none), and the age of the oldest request a
   gateway holds for the model. After a scale-up the sustain window starts again. With
   ``early_scale_up`` and a known ``expected_start_s`` (the model's jobs' typical submit-to-ready
   time), the rule judges the queue time extrapolated on its trend over the sustain window to
   the moment a new instance could serve, so capacity is ordered before the queue is long.
5. **target tracking** (``mode = "target"``, after Knative's KPA): desired = ceil(demand /
   ``target_waiting_per_instance``) over a stable window, or over the short panic window when
   that asks for at least ``panic_threshold`` x the ready instances (no scale-down in panic);
   fewer wanted for ``scale_down_stabilise_s`` → -1 (rule 8's pacing, on the windows' demand).
6. **capacity on the way**: instances submitted but not ready (pending in Slurm, loading) count
   as capacity: while ``max_pending`` of them exist no scale-up is made.
7. **cooldown**: no change within ``cooldown_s`` of the last one (rules 1-2 excepted).
8. **idle**: no request waiting or held, and running requests that ``desired - 1`` instances
   hold at ``scale_down_running_per_instance`` each, sustained for ``scale_down_stabilise_s``
   → -1, never below min (to zero only when min is 0). The window starts again after each step.

Invariants: a change is at most one instance per call except rules 1 and 5; the result is
always within ``[min, max]``; a call with unknown load never lowers the count.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Literal

import msgspec

Mode = Literal["queue_time", "target"]
Reason = Literal[
    "below_min",
    "above_max",
    "zero_to_one",
    "queue_time_sustained",
    "queue_time_predicted",
    "target_tracking",
    "panic",
    "idle_stabilised",
    "webhook_firing",
    "webhook_resolved",
    "schedule",
    "operator",
]
Hold = Literal[
    "steady",
    "unknown",
    "pending_capacity",
    "cooldown",
    "at_max",
    "at_min",
    "sustaining",
    "stabilising",
    "inactive",
]


class PolicyConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Per-model limits and thresholds (defaults from settings, overridable per model)."""

    min_instances: int = 0
    max_instances: int = 1
    mode: Mode = "queue_time"
    scale_up_queue_time_s: float = 5.0
    scale_up_sustain_s: float = 30.0
    scale_down_stabilise_s: float = 300.0
    scale_down_running_per_instance: float = 1.0
    cooldown_s: float = 60.0
    max_pending: int = 1  # instances on the way that hold further scale-up
    pending_report_s: float = 900.0  # an instance not ready after this is reported
    target_waiting_per_instance: float = 4.0
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0
    # Scale up early: judge the queue time expected once a new instance could serve (now + the
    # model's expected start: Slurm queue wait plus load time, learned from its jobs), on the
    # trend of the last scale_up_sustain_s, rather than the queue time now.
    early_scale_up: bool = False


class Signals(msgspec.Struct, frozen=True, kw_only=True):
    """One observation of a model, taken at ``now`` (seconds, any monotonic origin).

    ``None`` means unknown. ``queue_time_s`` is ``None`` also when no request was scheduled in
    the window; ``stalled_s`` is then the window length if requests were waiting all along.
    """

    now: float
    ready: int  # ready, non-draining instances
    pending: int  # submitted or registered, not ready yet
    oldest_pending_s: float | None = None
    known: bool = True  # False: some ready instance could not be scraped
    queue_time_s: float | None = None
    stalled_s: float | None = None
    waiting: float | None = None
    running: float | None = None
    kv_usage: float | None = None
    held: int = 0  # requests held in gateways for this model
    oldest_held_s: float | None = None
    expected_start_s: float | None = None  # submit to ready, typical of the model's recent jobs


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    desired: int
    changed: bool
    reason: Reason | None = None  # set when changed
    hold: Hold | None = None  # set when not changed
    detail: str = ""  # the rule with its numbers, for the log line and the history
    pending_overdue: bool = False  # an instance is not ready after pending_report_s


class PolicyState:
    """What the policy remembers about one model between observations."""

    __slots__ = ("above_since", "idle_since", "last_change_at", "queue_times", "samples")

    def __init__(self) -> None:
        self.above_since: float | None = None
        self.idle_since: float | None = None
        self.last_change_at: float | None = None
        self.samples: deque[tuple[float, float]] = deque()  # (time, demand) for target mode
        self.queue_times: deque[tuple[float, float]] = deque()  # (time, queue time) for the trend

    def changed(self, now: float) -> None:
        self.last_change_at = now
        self.above_since = None
        self.idle_since = None


def effective_queue_time(s: Signals) -> float | None:
    """The largest of the known queue-time figures, or None if none is known."""
    figures = [v for v in (s.queue_time_s, s.stalled_s, s.oldest_held_s) if v is not None]
    return max(figures) if figures else None


def _demand(s: Signals) -> float:
    return (s.waiting or 0.0) + s.held


class _Pass:
    """One call of :func:`decide`: its inputs, so that the rules share them."""

    __slots__ = ("cfg", "desired", "in_cooldown", "on_the_way", "overdue", "s", "state")

    def __init__(self, cfg: PolicyConfig, state: PolicyState, s: Signals, desired: int) -> None:
        self.cfg, self.state, self.s, self.desired = cfg, state, s, desired
        self.overdue = s.oldest_pending_s is not None and s.oldest_pending_s >= cfg.pending_report_s
        self.on_the_way = max(s.pending, desired - s.ready)
        self.in_cooldown = state.last_change_at is not None and s.now - state.last_change_at < cfg.cooldown_s

    def change(self, to: int, reason: Reason, detail: str) -> Outcome:
        self.state.changed(self.s.now)
        return Outcome(desired=to, changed=True, reason=reason, detail=detail, pending_overdue=self.overdue)

    def hold(self, hold: Hold, detail: str) -> Outcome:
        return Outcome(
            desired=self.desired, changed=False, hold=hold, detail=detail, pending_overdue=self.overdue
        )

    def step_down(self, detail: str) -> Outcome:
        """One instance fewer once the stabilisation window has passed (``idle_since`` set)."""
        cfg, state = self.cfg, self.state
        assert state.idle_since is not None
        if self.desired <= cfg.min_instances:
            return self.hold("at_min", detail)
        if self.s.now - state.idle_since < cfg.scale_down_stabilise_s:
            return self.hold("stabilising", detail)
        if self.in_cooldown:
            return self.hold("cooldown", detail)
        return self.change(self.desired - 1, "idle_stabilised", detail)


def decide(cfg: PolicyConfig, state: PolicyState, s: Signals, desired: int) -> Outcome:
    """The desired count after observation ``s``; updates ``state``."""
    p = _Pass(cfg, state, s, desired)
    lo, hi = cfg.min_instances, cfg.max_instances
    if desired < lo:
        return p.change(lo, "below_min", f"desired {desired} < min {lo}")
    if desired > hi:
        return p.change(hi, "above_max", f"desired {desired} > max {hi}")
    if desired == 0 and hi >= 1 and (s.held > 0 or (s.waiting or 0) > 0):
        return p.change(
            1, "zero_to_one", f"{s.held} request(s) held, {s.waiting or 0:g} waiting at zero instances"
        )
    if not s.known or (s.ready > 0 and s.waiting is None):
        return p.hold("unknown", "load of a ready instance unknown")
    if cfg.mode == "target":
        return _target(p)
    up = _queue_time(p)
    if up is not None:
        return up
    return _scale_down(p)


def trend(samples: deque[tuple[float, float]]) -> float:
    """Least-squares slope of (time, value) samples; 0 with fewer than two distinct times."""
    n = len(samples)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in samples) / n
    mv = sum(v for _, v in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    return sum((t - mt) * (v - mv) for t, v in samples) / var if var > 0 else 0.0


def _queue_time(p: _Pass) -> Outcome | None:
    cfg, state, s = p.cfg, p.state, p.s
    qt = effective_queue_time(s)
    reason: Reason = "queue_time_sustained"
    judged, ahead = qt, ""
    if cfg.early_scale_up and qt is not None and s.expected_start_s:
        history = state.queue_times
        history.append((s.now, qt))
        while history and history[0][0] < s.now - cfg.scale_up_sustain_s:
            history.popleft()
        slope = max(0.0, trend(history))
        if slope > 0:
            judged = qt + slope * s.expected_start_s
            ahead = (
                f" (now {qt:.1f} s, rising {slope:.2f} s/s over the expected start of "
                f"{s.expected_start_s:.0f} s)"
            )
            if qt <= cfg.scale_up_queue_time_s:
                reason = "queue_time_predicted"
    if judged is None or judged <= cfg.scale_up_queue_time_s:
        state.above_since = None
        return None
    state.idle_since = None
    if state.above_since is None:
        state.above_since = s.now
    sustained = s.now - state.above_since
    what = "expected queue time" if ahead else "queue time"
    detail = f"{what} {judged:.1f} s > {cfg.scale_up_queue_time_s:g} s for {sustained:.0f} s{ahead}"
    if sustained < cfg.scale_up_sustain_s:
        return p.hold("sustaining", detail)
    if p.desired >= cfg.max_instances:
        return p.hold("at_max", detail)
    if p.on_the_way >= cfg.max_pending:
        return p.hold("pending_capacity", f"{detail}; {p.on_the_way} instance(s) on the way")
    if p.in_cooldown:
        return p.hold("cooldown", detail)
    return p.change(p.desired + 1, reason, detail)


def _window_mean(samples: deque[tuple[float, float]], since: float) -> float:
    values = [v for t, v in samples if t >= since]
    return sum(values) / len(values) if values else 0.0


def _target(p: _Pass) -> Outcome:
    cfg, state, s, desired = p.cfg, p.state, p.s, p.desired
    samples = state.samples
    samples.append((s.now, (s.waiting or 0.0) + s.held))
    while samples and samples[0][0] < s.now - cfg.stable_window_s:
        samples.popleft()
    target = cfg.target_waiting_per_instance
    stable = _window_mean(samples, s.now - cfg.stable_window_s)
    panic = _window_mean(samples, s.now - cfg.panic_window_s)
    want_stable, want_panic = math.ceil(stable / target), math.ceil(panic / target)
    panicking = s.ready > 0 and want_panic >= cfg.panic_threshold * s.ready
    reason: Reason = "panic" if panicking and want_panic > want_stable else "target_tracking"
    want = min(want_panic if reason == "panic" else want_stable, cfg.max_instances)
    detail = (
        f"demand {stable:.1f} (stable {cfg.stable_window_s:g} s), {panic:.1f} (panic "
        f"{cfg.panic_window_s:g} s) / target {target:g} per instance -> {want}"
    )
    if want > desired:
        state.idle_since = None
        if p.on_the_way >= cfg.max_pending and reason != "panic":
            return p.hold("pending_capacity", f"{detail}; {p.on_the_way} instance(s) on the way")
        return p.change(want, reason, detail)
    if panicking or want >= desired:
        state.idle_since = None
        return p.hold("steady", detail + (" (panic: no scale-down)" if panicking else ""))
    if state.idle_since is None:  # fewer wanted: one at a time, after the stabilisation window
        state.idle_since = s.now
    return p.step_down(detail)


def _scale_down(p: _Pass) -> Outcome:
    cfg, state, s, desired = p.cfg, p.state, p.s, p.desired
    running = s.running or 0.0
    idle = (
        (s.waiting or 0.0) == 0
        and s.held == 0
        and running <= cfg.scale_down_running_per_instance * (desired - 1)
    )
    if not idle:
        state.idle_since = None
        return p.hold("steady", f"waiting {s.waiting or 0:g}, held {s.held}, running {running:g}")
    if state.idle_since is None:
        state.idle_since = s.now
    return p.step_down(
        f"idle for {s.now - state.idle_since:.0f} s (waiting 0, held 0, running {running:g} "
        f"<= {cfg.scale_down_running_per_instance:g} x {desired - 1})"
    )
