"""Capped exponential backoff with jitter: the one retry-delay helper of the gateway and daemons.

Every retry loop (reconnecting to PostgreSQL or Redis, the Job Worker's outage loop, a job's
registration call) and every persisted failure delay uses this module, so the growth rule is
written once: the ceiling after ``n`` failures is ``base * 2**n``, capped at ``cap``.

:class:`Backoff` draws each delay uniformly between half and all of the current ceiling: the
jitter keeps processes that lost the same server from reconnecting in lockstep, the lower
half-bound keeps a retry storm from starting right away. :func:`ceiling` is the same rule
without jitter, for delays that are stored rather than slept (a model's ``retry_not_before``).
"""

from __future__ import annotations

import random

_MAX_DOUBLINGS = 60  # 2**60 is far past any cap; bounding it keeps the float finite


def ceiling(base_s: float, cap_s: float, failures: int) -> float:
    """The undithered delay after ``failures`` consecutive failures (0: ``base_s``)."""
    return float(min(cap_s, base_s * 2 ** min(max(failures, 0), _MAX_DOUBLINGS)))


class Backoff:
    """Per-loop state: call :meth:`next_delay` after a failure, :meth:`reset` after a success."""

    __slots__ = ("_attempt", "_base", "_cap", "_rand")

    def __init__(self, base_s: float = 0.1, cap_s: float = 10.0, rand: random.Random | None = None) -> None:
        self._base = base_s
        self._cap = cap_s
        self._attempt = 0
        self._rand = rand or random.Random()

    def next_delay(self) -> float:
        top = ceiling(self._base, self._cap, self._attempt)
        self._attempt += 1
        return self._rand.uniform(top / 2, top)

    def reset(self) -> None:
        self._attempt = 0
