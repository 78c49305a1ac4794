"""Least-queue choice among a route's backends: O(candidates), no allocation, random ties.

Score of a backend = the engine's queue (running + waiting) at its last fresh scrape plus the
requests this worker sent it since that scrape. Without a fresh scrape the load is unknown: the
score is this worker's own in-flight count plus a half, so an idle backend with known metrics
wins over one we know nothing about, but an unknown one is still used. A backend whose last
scrapes failed outright (refused, timed out, 5xx) is likely down: it scores behind every
backend that answers, so it does not draw every other request until outlier ejection catches
up, yet it is still chosen when nothing better is left. Ejected backends are
skipped unless every candidate is ejected (then ejection is ignored rather than failing all).
A backend is saturated at ``max_inflight`` requests of this worker (0: no cap); when all are,
:func:`choose` returns None and the caller queues the request.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection

from gateway.backend import Backend

_UNKNOWN_PENALTY = 0.5
_UNREACHABLE_PENALTY = 1e6


def choose(
    backends: tuple[Backend, ...],
    now: float,
    *,
    stale_after: float,
    max_inflight: int = 0,
    exclude: Collection[Backend] = (),
    rand: Callable[[], float] = random.random,
    ignore_ejection: bool = False,
) -> Backend | None:
    best: Backend | None = None
    best_score = 0.0
    ties = 0
    any_ejected = False
    for b in backends:
        if exclude and b in exclude:
            continue
        if max_inflight and b.inflight >= max_inflight:
            continue
        if b.ejected_until > now and not ignore_ejection:
            any_ejected = True
            continue
        score = load_score(b, now, stale_after)
        if best is None or score < best_score:
            best, best_score, ties = b, score, 1
        elif score == best_score:
            ties += 1
            if rand() * ties < 1.0:  # reservoir sampling: each tied backend equally likely
                best = b
    if best is None and any_ejected:
        return choose(backends, now, stale_after=stale_after, max_inflight=max_inflight, exclude=exclude,
                      rand=rand, ignore_ejection=True)
    return best


def load_score(b: Backend, now: float, stale_after: float) -> float:
    """The backend's queue as this worker estimates it (requests)."""
    if b.queue is not None and now - b.scraped_at <= stale_after:
        return b.queue + b.since_scrape
    if b.scrape_failures:
        return b.inflight + _UNREACHABLE_PENALTY
    return b.inflight + _UNKNOWN_PENALTY
