"""How many requests of one model the batch runner keeps in flight (pure; fed by the caller).

Backfill: batch work uses only capacity the engines leave idle. Each control step the runner
feeds :meth:`Pacer.step` the number of requests waiting in the model's engines (scraped
``vllm:num_requests_waiting``, summed; None when no engine could be scraped) and whether any
batch request was pushed back since the last step (the gateway's 503/429). Additive increase,
multiplicative decrease: one more while nothing waits, half as soon as anything waits or a
request was pushed back, always within [minimum, maximum].
"""

from __future__ import annotations


class Pacer:
    __slots__ = ("limit", "maximum", "minimum")

    def __init__(self, minimum: int, maximum: int) -> None:
        self.minimum = minimum
        self.maximum = max(minimum, maximum)
        self.limit = minimum

    def step(self, waiting: float | None, pushed_back: bool, inflight: int) -> int:
        if pushed_back or (waiting is not None and waiting > 0):
            self.limit = max(self.minimum, self.limit // 2)
        elif inflight >= self.limit:  # only grow a limit that is actually used
            self.limit = min(self.maximum, self.limit + 1)
        return self.limit
