"""The compressed day's pure parts (bench/day_plan.py), fed data."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.day_plan import (
    LOAD_SHAPE,
    ConfigResult,
    HistogramSum,
    JobSpan,
    arrivals,
    gpu_seconds,
    histogram_quantile,
    percentile,
    rate_at,
    summary_table,
)


def test_the_rate_follows_the_shape_and_interpolates_between_hours() -> None:
    assert rate_at(10.0, 12.0) == pytest.approx(12.0 * LOAD_SHAPE[10])
    assert rate_at(9.5, 10.0) == pytest.approx(10.0 * (LOAD_SHAPE[9] + LOAD_SHAPE[10]) / 2)
    assert rate_at(23.5, 1.0) == pytest.approx((LOAD_SHAPE[23] + LOAD_SHAPE[0]) / 2)  # wraps to midnight
    assert rate_at(24.0, 1.0) == pytest.approx(LOAD_SHAPE[0])


def test_arrivals_are_seeded_and_follow_the_daily_pattern() -> None:
    day_s = 720.0
    a, b = arrivals(12.0, day_s, seed=3), arrivals(12.0, day_s, seed=3)
    assert a == b and a != arrivals(12.0, day_s, seed=4)
    assert all(0 <= t < day_s for t in a) and a == sorted(a)
    # expected count: the pattern's integral (linear pieces: mean of neighbouring hours)
    expected = sum(12.0 * (LOAD_SHAPE[h] + LOAD_SHAPE[(h + 1) % 24]) / 2 * day_s / 24 for h in range(24))
    assert abs(len(a) - expected) < 4 * math.sqrt(expected)
    hour = lambda t: int(24 * t / day_s)  # noqa: E731
    night = sum(1 for t in a if hour(t) in (2, 3, 4))
    peak = sum(1 for t in a if hour(t) in (10, 14, 15))
    assert peak > 20 * max(1, night)


def test_gpu_seconds_count_only_inside_the_day() -> None:
    jobs = [
        JobSpan(started=-50.0, ended=None),  # ran before the day and all through it
        JobSpan(started=10.0, ended=30.0),
        JobSpan(started=90.0, ended=150.0),  # ends after the day
        JobSpan(started=None, ended=40.0),  # never started (pending, then cancelled)
        JobSpan(started=200.0, ended=210.0),  # after the day
    ]
    assert gpu_seconds(jobs, 0.0, 100.0) == pytest.approx(100 + 20 + 10)


def test_histogram_quantile_matches_promql() -> None:
    buckets = [(0.5, 10.0), (1.0, 30.0), (5.0, 40.0), (math.inf, 40.0)]
    # rank 0.5 x 40 = 20 falls in (0.5, 1.0]: 0.5 + 0.5 x (20 - 10) / 20
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.75)
    assert histogram_quantile(0.95, buckets) == pytest.approx(1.0 + 4.0 * (38 - 30) / 10)
    assert histogram_quantile(0.1, buckets) == pytest.approx(0.2)  # first bucket: from zero
    assert histogram_quantile(0.99, [(1.0, 1.0), (math.inf, 10.0)]) == 1.0  # in +Inf: the top bound
    assert histogram_quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]) is None


def test_histogram_sum_adds_engines_and_survives_a_restart() -> None:
    h = HistogramSum()
    h.observe("a", {1.0: 2, math.inf: 4}, total=6.0, count=4)
    h.observe("b", {1.0: 1, math.inf: 1}, total=0.5, count=1)
    h.observe("a", {1.0: 3, math.inf: 6}, total=9.0, count=6)  # +1 under 1 s, +1 over
    h.observe("a", {1.0: 1, math.inf: 1}, total=0.2, count=1)  # restarted: counters began again
    assert h.count == 8
    assert h.sum == pytest.approx(9.0 + 0.5 + 0.2)
    assert h.mean() == pytest.approx(9.7 / 8)
    # 5 of 8 at or under 1 s: the median (rank 4) is 4/5 of the way into the first bucket
    assert h.quantile(0.5) == pytest.approx(0.8)
    assert HistogramSum().quantile(0.5) is None and HistogramSum().mean() is None


@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=200), st.floats(0, 1))
def test_percentile_is_an_element_and_ranks_right(values: list[float], q: float) -> None:
    p = percentile(values, q)
    assert p in values
    assert sum(1 for v in values if v <= p) >= q * len(values)


def test_the_summary_table_compares_with_the_first_configuration() -> None:
    common = dict(requests=100, failed=0, queue_mean_s=0.1, ttft_p95_s=0.05, decisions_by_reason={})
    rows = [
        ConfigResult(config="static", description="", gpu_hours=96.0, queue_p95_s=0.2, decisions=0, **common),
        ConfigResult(
            config="scheduled", description="", gpu_hours=40.0, queue_p95_s=None, decisions=3,
            **{**common, "decisions_by_reason": {"schedule": 2, "zero_to_one": 1}},
        ),
    ]
    table = summary_table(rows).splitlines()
    assert table[0].startswith("| configuration | GPU-hours | vs static |")
    assert "| static | 96.0 | 1.00x | 100 | 0 | 0.20 s |" in table[2]
    assert "| scheduled | 40.0 | 0.42x |" in table[3] and "| - s |" in table[3]
    assert table[3].endswith("| 3 (schedule 2, zero_to_one 1) |")
