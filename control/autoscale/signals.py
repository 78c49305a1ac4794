"""From scraped engine figures and gateway demand to one :class:`Signals` per model. Pure.

vLLM's queue-time histogram is cumulative per engine, so the mean queue time over a window is
(Δ sum) / (Δ count) between the newest sample and the oldest one still inside the window,
summed over the model's ready instances (:class:`QueueTimeWindow`, one per endpoint). A
counter that went down (the engine restarted) starts its window again. vLLM records queue time
only when a request is scheduled: when requests wait but none was scheduled within the window,
``stalled_s`` is the window's length, which the policy counts as queue time.

Invariants: a ready instance whose page could not be read makes the model's load unknown
(``known = False``), never zero; gateways' demand older than ``demand_max_age_s`` is ignored.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

import msgspec

from control.autoscale.policy import Signals
from hpcgate.metrics_text import EngineLoad
from hpcgate.schemas import ModelDemand


class QueueTimeWindow:
    """Samples of one engine's cumulative (sum, count), kept for ``window_s``."""

    __slots__ = ("_samples", "_window_s")

    def __init__(self, window_s: float) -> None:
        self._window_s = window_s
        self._samples: deque[tuple[float, float, float]] = deque()

    def observe(self, now: float, total: float, count: float) -> None:
        if self._samples and count < self._samples[-1][2]:
            self._samples.clear()  # the engine restarted: its counters began again
        self._samples.append((now, total, count))
        while len(self._samples) > 1 and self._samples[1][0] <= now - self._window_s:
            self._samples.popleft()

    def delta(self) -> tuple[float, float, float]:
        """(Δ sum, Δ count, span in seconds) across the window; zeros with one sample."""
        if len(self._samples) < 2:
            return 0.0, 0.0, 0.0
        t0, s0, c0 = self._samples[0]
        t1, s1, c1 = self._samples[-1]
        return s1 - s0, c1 - c0, t1 - t0


class Endpoint(msgspec.Struct, frozen=True):
    endpoint_id: int
    node: str
    port: int
    bearer_token: str | None = None


class ModelObservation(msgspec.Struct, frozen=True, kw_only=True):
    """What the database says about one model's instances."""

    ready: tuple[Endpoint, ...]
    pending: int
    oldest_pending_s: float | None
    expected_start_s: float | None = None  # median job row to ready of the model's last 10 jobs


def total_demand(
    model: str, aliases: Iterable[str], docs: Iterable[ModelDemand], now_unix: float, max_age_s: float
) -> tuple[int, float | None]:
    """Requests held for ``model`` (or an alias) across gateways, and the oldest one's age."""
    names = {model, *aliases}
    held, oldest = 0, None
    for doc in docs:
        if now_unix - doc.at > max_age_s:
            continue
        for name, h in doc.models.items():
            if name in names and h.held > 0:
                held += h.held
                oldest = h.oldest_s if oldest is None else max(oldest, h.oldest_s)
    return held, oldest


def build_signals(
    now: float,
    obs: ModelObservation,
    loads: Mapping[int, EngineLoad | None],
    windows: Mapping[int, QueueTimeWindow],
    *,
    held: int,
    oldest_held_s: float | None,
    min_window_s: float,
) -> Signals:
    """One model's :class:`Signals`; ``loads`` maps each ready endpoint to its page (None: failed)
    and ``windows`` to its queue-time window, already fed with this scrape."""
    known = True
    waiting = running = kv = None
    d_sum = d_count = 0.0
    span = 0.0
    for ep in obs.ready:
        load = loads.get(ep.endpoint_id)
        if load is None or load.waiting is None:
            known = False
            continue
        waiting = (waiting or 0.0) + load.waiting
        running = (running or 0.0) + (load.running or 0.0)
        if load.kv_usage is not None:
            kv = load.kv_usage if kv is None else max(kv, load.kv_usage)
        window = windows.get(ep.endpoint_id)
        if window is not None:
            ds, dc, sp = window.delta()
            d_sum, d_count, span = d_sum + ds, d_count + dc, max(span, sp)
    queue_time = d_sum / d_count if d_count > 0 else None
    stalled = span if (d_count == 0 and (waiting or 0) > 0 and span >= min_window_s) else None
    return Signals(
        now=now,
        ready=len(obs.ready),
        pending=obs.pending,
        oldest_pending_s=obs.oldest_pending_s,
        known=known,
        queue_time_s=queue_time,
        stalled_s=stalled,
        waiting=waiting,
        running=running,
        kv_usage=kv,
        held=held,
        oldest_held_s=oldest_held_s,
        expected_start_s=obs.expected_start_s,
    )
