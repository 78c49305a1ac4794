"""Capped exponential backoff with jitter, for reconnecting to PostgreSQL and Redis.

Each delay is a uniform draw between half and all of the current ceiling (``base * 2**n``,
capped): the jitter keeps daemons that lost the same server from reconnecting in lockstep,
the lower half-bound keeps a retry storm from starting right away.
"""

from __future__ import annotations

import random


class Backoff:
    __slots__ = ("_attempt", "_base", "_cap", "_rand")

    def __init__(self, base_s: float = 0.1, cap_s: float = 10.0, rand: random.Random | None = None) -> None:
        self._base = base_s
        self._cap = cap_s
        self._attempt = 0
        self._rand = rand or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self._cap, self._base * (2 ** min(self._attempt, 30)))
        self._attempt += 1
        return self._rand.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self._attempt = 0
