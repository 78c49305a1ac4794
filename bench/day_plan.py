"""The compressed day's pure parts: load shape, arrivals, accounting, the summary table. No I/O.

``hpcgate bench day`` (``bench/day.py``) plays a 24-hour load pattern in ``day_s`` seconds of
wall time against a live stack; everything here is fed data and unit-tested:

- :data:`LOAD_SHAPE` is the day's request rate by local hour as a fraction of the peak (a
  university's working day: near zero at night, a morning and an afternoon peak, a lunch dip);
  :func:`rate_at` interpolates it linearly; :func:`arrivals` draws a non-homogeneous Poisson
  process from it by thinning (seeded: two configurations see the same requests);
- :func:`gpu_seconds` integrates the instances that held a GPU (from the job's start,
  ``registered_at``, to its end) over the day, so a job that started before the day or ends
  after it counts only inside it;
- :class:`HistogramSum` adds up the engines' cumulative Prometheus histograms (a restarted
  engine's counters begin again) and :func:`histogram_quantile` reads a quantile from buckets
  the way PromQL's ``histogram_quantile`` does (linear inside the bucket);
- :func:`summary_table` is the Markdown table the command prints and the docs record.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence

import msgspec

# Requests per second by local hour of day, as a fraction of the peak (hour 24 = hour 0).
# fmt: off
LOAD_SHAPE: tuple[float, ...] = (
    0.04, 0.02, 0.01, 0.01, 0.01, 0.02, 0.05, 0.20, 0.50, 0.80, 1.00, 0.95,
    0.70, 0.75, 0.95, 1.00, 0.85, 0.60, 0.40, 0.25, 0.15, 0.10, 0.07, 0.05,
)
# fmt: on
DAY_S = 86_400.0


def rate_at(day_hour: float, peak_rps: float, shape: Sequence[float] = LOAD_SHAPE) -> float:
    """Requests per second at ``day_hour`` (0 <= h < 24, fractional), linear between hours."""
    h = day_hour % 24.0
    i = int(h)
    a, b = shape[i], shape[(i + 1) % 24]
    return peak_rps * (a + (b - a) * (h - i))


def arrivals(peak_rps: float, day_s: float, seed: int, shape: Sequence[float] = LOAD_SHAPE) -> list[float]:
    """Arrival offsets in wall seconds (0 <= t < ``day_s``) of a day played in ``day_s`` seconds.

    The day's hour at wall offset t is ``24 t / day_s``: the pattern's hours are compressed, its
    requests are not (the engines run in wall time), so ``peak_rps`` is requests per wall second
    at the peak.
    """
    rng = random.Random(seed)
    top = peak_rps * max(shape)
    out: list[float] = []
    t = 0.0
    if top <= 0:
        return out
    while True:
        t += rng.expovariate(top)
        if t >= day_s:
            return out
        if rng.random() * top <= rate_at(24.0 * t / day_s, peak_rps, shape):
            out.append(t)


class JobSpan(msgspec.Struct, frozen=True):
    """One job's GPU holding: from its start (registered) to its end (None: still running)."""

    started: float | None
    ended: float | None


def gpu_seconds(jobs: Iterable[JobSpan], t0: float, t1: float) -> float:
    """Seconds of GPU held by ``jobs`` inside [t0, t1] (wall seconds)."""
    total = 0.0
    for job in jobs:
        if job.started is None:
            continue
        a, b = max(job.started, t0), min(job.ended if job.ended is not None else t1, t1)
        total += max(0.0, b - a)
    return total


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """PromQL's ``histogram_quantile``: ``buckets`` are (upper bound, cumulative count), sorted,
    the last one +Inf. None with no observations; the highest finite bound when the quantile
    falls in the +Inf bucket."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


class HistogramSum:
    """The sum of several engines' cumulative histograms of one metric, across their restarts."""

    def __init__(self) -> None:
        self._last: dict[str, dict[float, float]] = {}  # engine -> its last cumulative buckets
        self._total: dict[float, float] = {}
        self.count = 0.0
        self.sum = 0.0
        self._last_sum: dict[str, tuple[float, float]] = {}

    def observe(self, engine: str, buckets: Mapping[float, float], total: float, count: float) -> None:
        """Add what ``engine``'s histogram gained since its last observation."""
        last = self._last.get(engine, {})
        last_sum, last_count = self._last_sum.get(engine, (0.0, 0.0))
        if count < last_count:  # restarted: its counters began again
            last, last_sum, last_count = {}, 0.0, 0.0
        for bound, value in buckets.items():
            self._total[bound] = self._total.get(bound, 0.0) + value - last.get(bound, 0.0)
        self.sum += total - last_sum
        self.count += count - last_count
        self._last[engine] = dict(buckets)
        self._last_sum[engine] = (total, count)

    def quantile(self, q: float) -> float | None:
        return histogram_quantile(q, sorted(self._total.items()))

    def mean(self) -> float | None:
        return self.sum / self.count if self.count > 0 else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of ``values`` by the nearest-rank method; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class ConfigResult(msgspec.Struct, frozen=True, kw_only=True):
    """One configuration's day, as the table and the docs show it."""

    config: str
    description: str
    requests: int
    failed: int
    gpu_hours: float  # in day hours: wall GPU-seconds x the compression, / 3600
    queue_p95_s: float | None  # engines' vllm:request_queue_time_seconds, PromQL-style
    queue_mean_s: float | None
    ttft_p95_s: float | None  # the client's, requests that succeeded (includes gateway hold)
    decisions: int
    decisions_by_reason: dict[str, int]


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def summary_table(results: Sequence[ConfigResult]) -> str:
    """The Markdown table: one row per configuration, GPU-hours also as a share of the first."""
    base = results[0].gpu_hours if results and results[0].gpu_hours > 0 else None
    lines = [
        "| configuration | GPU-hours | vs "
        + (results[0].config if results else "-")
        + " | requests | failed | p95 queue time | mean queue time | p95 TTFT | scaling decisions |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        share = f"{r.gpu_hours / base:.2f}x" if base else "-"
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(r.decisions_by_reason.items()))
        lines.append(
            f"| {r.config} | {r.gpu_hours:.1f} | {share} | {r.requests} | {r.failed} "
            f"| {_num(r.queue_p95_s, '.2f')} s | {_num(r.queue_mean_s, '.2f')} s "
            f"| {_num(r.ttft_p95_s, '.2f')} s | {r.decisions}" + (f" ({reasons})" if reasons else "") + " |"
        )
    return "\n".join(lines)
