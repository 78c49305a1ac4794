"""The autoscaling policy on synthetic series and a fake clock: no I/O, no sleeping."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from control.autoscale.policy import Outcome, PolicyConfig, PolicyState, Signals, decide

STEP = 5.0  # the reconcile period


def run(
    cfg: PolicyConfig,
    series: Iterable[Callable[[float, int], Signals]],
    desired: int,
    state: PolicyState | None = None,
    start: float = 0.0,
) -> tuple[int, list[tuple[float, Outcome]]]:
    """Feed one observation per STEP; returns the final desired count and the changes."""
    state = state or PolicyState()
    changes: list[tuple[float, Outcome]] = []
    t = start
    for make in series:
        out = decide(cfg, state, make(t, desired), desired)
        if out.changed:
            changes.append((t, out))
        desired = out.desired
        t += STEP
    return desired, changes


def loaded(
    queue_time: float, *, waiting: float = 10.0, running: float = 8.0, pending: int = 0
) -> Callable[[float, int], Signals]:
    def make(t: float, desired: int) -> Signals:
        return Signals(
            now=t,
            ready=desired - pending,
            pending=pending,
            queue_time_s=queue_time,
            waiting=waiting,
            running=running,
        )

    return make


def idle(t: float, desired: int) -> Signals:
    return Signals(now=t, ready=desired, pending=0, queue_time_s=None, waiting=0.0, running=0.0)


PAPER = PolicyConfig(min_instances=1, max_instances=3, cooldown_s=60.0, scale_down_stabilise_s=120.0)


def test_the_30_s_rule_fires_after_exactly_its_window() -> None:
    # above 5 s from t=0: observations at 0, 5, ..., 25 hold; t=30 adds one
    desired, changes = run(PAPER, [loaded(7.0)] * 7, desired=1)
    assert desired == 2
    assert [(t, o.reason) for t, o in changes] == [(30.0, "queue_time_sustained")]
    assert "7.0 s > 5 s for 30 s" in changes[0][1].detail
    # one observation short of the window: nothing
    desired, changes = run(PAPER, [loaded(7.0)] * 6, desired=1)
    assert (desired, changes) == (1, [])


def test_a_shorter_spike_does_not_fire_and_restarts_the_window() -> None:
    spike = [loaded(9.0)] * 5 + [loaded(1.0)] + [loaded(9.0)] * 6  # 20 s, dip, 25 s
    desired, changes = run(PAPER, spike, desired=1)
    assert (desired, changes) == (1, [])
    # at exactly the threshold is not above it
    assert run(PAPER, [loaded(5.0)] * 20, desired=1) == (1, [])


def test_a_stalled_queue_and_held_requests_count_as_queue_time() -> None:
    def stalled(t: float, desired: int) -> Signals:  # nothing scheduled: no queue time at all
        return Signals(
            now=t, ready=desired, pending=0, queue_time_s=None, stalled_s=15.0, waiting=4.0, running=8.0
        )

    def held(t: float, desired: int) -> Signals:
        return Signals(
            now=t,
            ready=desired,
            pending=0,
            queue_time_s=0.5,
            waiting=0.0,
            running=8.0,
            held=3,
            oldest_held_s=12.0,
        )

    assert run(PAPER, [stalled] * 7, desired=1)[0] == 2
    assert run(PAPER, [held] * 7, desired=1)[0] == 2


def test_pending_instances_hold_further_scale_up_up_to_the_cap() -> None:
    # desired 2, one ready, one pending in Slurm for the whole run: no third instance
    desired, changes = run(PAPER, [loaded(8.0, pending=1)] * 40, desired=2)
    assert (desired, changes) == (2, [])
    s = Signals(now=40.0, ready=1, pending=1, queue_time_s=8.0, waiting=5.0, running=8.0)
    state = PolicyState()
    state.above_since = 0.0
    assert decide(PAPER, state, s, 2).hold == "pending_capacity"
    # a cap of two pending allows one more while one is on the way
    two = PolicyConfig(min_instances=1, max_instances=3, max_pending=2)
    assert decide(two, state, s, 2).desired == 3
    # the Job Worker lagging (desired 2, one ready, none pending yet) is also capacity on the way
    lag = Signals(now=40.0, ready=1, pending=0, queue_time_s=8.0, waiting=5.0, running=8.0)
    state.above_since = 0.0
    assert decide(PAPER, state, lag, 2).hold == "pending_capacity"


def test_a_pending_instance_past_its_limit_is_reported() -> None:
    cfg = PolicyConfig(min_instances=1, max_instances=3, pending_report_s=600.0)
    s = Signals(now=0.0, ready=1, pending=1, oldest_pending_s=601.0, waiting=0.0, running=0.0)
    assert decide(cfg, PolicyState(), s, 2).pending_overdue
    s = Signals(now=0.0, ready=1, pending=1, oldest_pending_s=10.0, waiting=0.0, running=0.0)
    assert not decide(cfg, PolicyState(), s, 2).pending_overdue


def test_cooldown_after_a_change_and_max_is_respected() -> None:
    desired, changes = run(PAPER, [loaded(9.0)] * 60, desired=1)
    assert desired == 3  # never above max
    times = [t for t, _ in changes]
    assert times[0] == 30.0
    assert times[1] - times[0] >= PAPER.cooldown_s  # the second waits out the cooldown


def test_stabilised_scale_down_one_at_a_time_never_below_min() -> None:
    desired, changes = run(PAPER, [idle] * 200, desired=3)
    assert desired == 1
    assert [o.reason for _, o in changes] == ["idle_stabilised", "idle_stabilised"]
    assert changes[0][0] == PAPER.scale_down_stabilise_s
    assert changes[1][0] - changes[0][0] >= PAPER.scale_down_stabilise_s

    # running requests that desired-1 instances cannot hold at 1 each keep the instances
    def busy(t: float, desired: int) -> Signals:
        return Signals(now=t, ready=desired, pending=0, waiting=0.0, running=3.0)

    assert run(PAPER, [busy] * 200, desired=3) == (3, [])


def test_unknown_load_never_scales_down() -> None:
    def unknown(t: float, desired: int) -> Signals:
        return Signals(now=t, ready=desired, pending=0, known=False, waiting=0.0, running=0.0)

    def missing(t: float, desired: int) -> Signals:
        return Signals(now=t, ready=desired, pending=0)

    assert run(PAPER, [unknown] * 200, desired=3) == (3, [])
    assert run(PAPER, [missing] * 200, desired=3) == (3, [])
    # and unknown does not restart the idle window
    state = PolicyState()
    run(PAPER, [idle] * 20, desired=3, state=state)
    idle_since = state.idle_since
    run(PAPER, [unknown] * 3, desired=3, state=state, start=100.0)
    assert state.idle_since == idle_since


def test_no_flapping_under_an_oscillating_load() -> None:
    # load swings between overloaded and idle every 40 s for an hour
    period = 8
    series = [loaded(9.0) if (i // period) % 2 == 0 else idle for i in range(720)]
    desired, changes = run(PAPER, series, desired=1)
    # it adds capacity (the overloaded phases last past the sustain window) but never removes
    # any: no idle phase lasts the stabilisation window
    assert all(o.reason == "queue_time_sustained" for _, o in changes)
    assert len(changes) <= 2 and desired == 3


def test_zero_to_one_is_immediate_and_scale_to_zero_waits_for_idleness() -> None:
    cfg = PolicyConfig(min_instances=0, max_instances=2, cooldown_s=60.0, scale_down_stabilise_s=120.0)
    s = Signals(now=0.0, ready=0, pending=0, held=1, oldest_held_s=0.1)
    state = PolicyState()
    out = decide(cfg, state, s, 0)
    assert (out.desired, out.reason) == (1, "zero_to_one")
    desired, changes = run(cfg, [idle] * 40, desired=1, state=state, start=1.0)
    assert desired == 0 and [o.reason for _, o in changes] == ["idle_stabilised"]
    assert changes[0][0] >= 121.0
    # min 1 never goes to zero
    assert run(PAPER, [idle] * 200, desired=1) == (1, [])


def test_limits_are_clamped() -> None:
    s = Signals(now=0.0, ready=5, pending=0, waiting=0.0, running=0.0)
    assert decide(PAPER, PolicyState(), s, 5).desired == 3
    assert decide(PAPER, PolicyState(), s, 0).desired == 1


def test_target_tracking_with_stable_and_panic_windows() -> None:
    cfg = PolicyConfig(
        min_instances=1,
        max_instances=10,
        mode="target",
        target_waiting_per_instance=4.0,
        stable_window_s=60.0,
        panic_window_s=10.0,
        scale_down_stabilise_s=60.0,
        max_pending=10,
    )

    def demand(n: float) -> Callable[[float, int], Signals]:
        def make(t: float, desired: int) -> Signals:
            return Signals(now=t, ready=desired, pending=0, waiting=n, running=8.0)

        return make

    # steady demand of 12 waiting: three instances
    desired, changes = run(cfg, [demand(12.0)] * 30, desired=1)
    assert desired == 3
    # a burst to 40 waiting: the panic window reacts before the stable one catches up
    state = PolicyState()
    desired, changes = run(cfg, [demand(4.0)] * 12 + [demand(40.0)] * 2, desired=1, state=state)
    assert changes[-1][1].reason == "panic" and desired >= 4
    # demand gone: back down one at a time after the stabilisation window
    before = desired
    desired, changes = run(cfg, [demand(0.0)] * 200, desired=desired, state=state, start=100.0)
    assert desired == 1
    assert [o.desired for _, o in changes] == list(range(before - 1, 0, -1))
    assert all(o.reason == "idle_stabilised" for _, o in changes)
    assert changes[0][0] - 100.0 >= cfg.scale_down_stabilise_s


def test_early_scale_up_orders_capacity_by_the_trend_over_the_expected_start() -> None:
    def rising(
        start: float = 0.0, rate: float = 0.1, expected: float | None = 60.0
    ) -> Callable[[float, int], Signals]:
        def make(t: float, desired: int) -> Signals:
            return Signals(
                now=t,
                ready=desired,
                pending=0,
                queue_time_s=rate * (t - start),
                waiting=5.0,
                running=8.0,
                expected_start_s=expected,
            )

        return make

    early = PolicyConfig(min_instances=1, max_instances=3, early_scale_up=True)
    # queue time rising 0.1 s/s from 0; a new instance takes 60 s: 5 s will be passed by then
    _, changes = run(early, [rising()] * 40, desired=1)
    assert changes and changes[0][1].reason == "queue_time_predicted"
    first_early = changes[0][0]
    assert "rising 0.10 s/s over the expected start of 60 s" in changes[0][1].detail
    # the plain rule waits for the queue itself: above 5 s from t=55, sustained 30 s
    _, changes = run(PAPER, [rising()] * 40, desired=1)
    assert changes[0][1].reason == "queue_time_sustained" and changes[0][0] >= 85.0 > first_early
    # a steady queue below the threshold, or no known start time, adds nothing early
    steady = [rising(rate=0.0)] * 40
    assert run(early, steady, desired=1) == (1, [])
    unknown_start = [rising(expected=None)] * 10  # 0..45 s: below 5 s all along
    assert run(early, unknown_start, desired=1) == (1, [])
