"""The one backoff helper (``hpcgate.backoff``): growth, jitter bounds, cap, reset."""

from __future__ import annotations

import random

from hpcgate.backoff import Backoff, ceiling


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    b = Backoff(base_s=0.1, cap_s=1.0, rand=random.Random(1))
    delays = [b.next_delay() for _ in range(10)]
    assert 0.05 <= delays[0] <= 0.1 and all(0.5 <= d <= 1.0 for d in delays[5:])
    b.reset()
    assert b.next_delay() <= 0.1


def test_ceiling_is_the_same_rule_without_jitter() -> None:
    assert [ceiling(10.0, 600.0, n) for n in range(8)] == [10, 20, 40, 80, 160, 320, 600, 600]
    assert ceiling(10.0, 600.0, -1) == 10.0  # "no failure yet" never shrinks below the base
    assert ceiling(0.1, 5.0, 10**6) == 5.0  # huge counts stay finite
