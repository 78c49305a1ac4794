"""How many requests of one model the batch runner keeps in flight (pure; fed by the caller).

Backfill: batch work uses only capacity the engines leave idle. Each control step the runner
feeds :meth:`Pacer.step` how many more requests wait in the model's engines than their own
rhythm explains (scraped ``vllm:num_requests_waiting`` minus a tolerance, summed; None when
no engine could be scraped) and whether any
batch request was pushed back since the last step (the gateway's 503/429). Slow start, then
additive increase, multiplicative decrease: double per step while nothing has waited yet, then
one more per step while nothing waits, half as soon as anything waits or a request was pushed
back, always within [minimum, maximum].
"""

from __future__ import annotations


class Pacer:
    __slots__ = ("limit", "maximum", "minimum", "slow_start")

    def __init__(self, minimum: int, maximum: int) -> None:
        self.minimum = minimum
        self.maximum = max(minimum, maximum)
        self.limit = minimum
        self.slow_start = True  # double per step until the first sign of contention (as TCP)

    def step(self, waiting: float | None, pushed_back: bool, inflight: int) -> int:
        if pushed_back or (waiting is not None and waiting > 0):
            self.limit = max(self.minimum, self.limit // 2)
            self.slow_start = False
        elif inflight >= self.limit:  # only grow a limit that is actually used
            grown = self.limit * 2 if self.slow_start else self.limit + 1
            self.limit = min(self.maximum, grown)
        return self.limit
