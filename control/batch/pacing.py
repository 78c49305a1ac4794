"""How many requests of one model the batch runner keeps in flight (pure; fed by the caller).

Backfill: batch work uses only capacity the engines leave idle. Each control step the runner
feeds :meth:`Pacer.step` how many more requests wait in the model's engines than their own
rhythm explains (scraped ``vllm:num_requests_waiting`` minus a tolerance, summed; None when
no engine could be scraped) and whether any batch request was pushed back since the last step
(the gateway's 503/429). Slow start, then additive increase, multiplicative decrease: double
per step while nothing has waited yet, then one more per step while nothing waits; hold while
requests wait, half when they have waited ``patience`` steps in a row (a request arriving
between two engine steps waits until the next one, so one look at a queue is noise; measured:
backing off on it kept a batch at a fifth of the engine's capacity) or at once when a request
was pushed back; always within [minimum, maximum].
"""

from __future__ import annotations


class Pacer:
    __slots__ = ("limit", "maximum", "minimum", "over", "patience", "slow_start")

    def __init__(self, minimum: int, maximum: int, patience: int = 3) -> None:
        self.minimum = minimum
        self.maximum = max(minimum, maximum)
        self.limit = minimum
        self.patience = patience  # steps in a row with a queue before backing off
        self.over = 0
        self.slow_start = True  # double per step until the first sign of contention (as TCP)

    def step(self, waiting: float | None, pushed_back: bool, inflight: int) -> int:
        queued = waiting is not None and waiting > 0
        self.over = self.over + 1 if queued else 0
        if pushed_back or self.over >= self.patience:
            self.limit = max(self.minimum, self.limit // 2)
            self.slow_start = False
            self.over = 0
        elif queued:
            pass  # a queue seen, not yet for long enough: hold
        elif inflight >= self.limit:  # only grow a limit that is actually used
            grown = self.limit * 2 if self.slow_start else self.limit + 1
            self.limit = min(self.maximum, grown)
        return self.limit
