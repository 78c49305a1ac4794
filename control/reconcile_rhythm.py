"""When a control daemon's next reconcile pass runs, and how its outages are told.

The Job Worker and the autoscaler run one pass after another. A pass that succeeds is followed
by the next one after ``interval_s``; while passes fail (PostgreSQL away) the next is tried
after a capped, jittered backoff (:class:`hpcgate.backoff.Backoff`), so a restarting database
is not hammered. An outage is logged once, as ``<name>_degraded`` with the first error, and its
end once, as ``<name>_recovered`` naming what had failed: an operator sees two lines per
outage, never one per pass.
"""

from __future__ import annotations

from hpcgate.backoff import Backoff
from hpcgate.logs import EventLogger


class ReconcileRhythm:
    """Per-daemon state: call :meth:`after_success` or :meth:`after_failure` after each pass;
    each returns how long to wait before the next one."""

    __slots__ = ("_backoff", "_failing", "_interval_s", "_log", "_name")

    def __init__(self, name: str, logger: EventLogger, interval_s: float, backoff_cap_s: float) -> None:
        self._name = name
        self._log = logger
        self._interval_s = interval_s
        self._backoff = Backoff(base_s=0.5, cap_s=backoff_cap_s)
        self._failing: str | None = None  # the error type of the outage in progress, if any

    @property
    def failing(self) -> str | None:
        return self._failing

    def after_success(self) -> float:
        if self._failing is not None:
            self._log.info(f"{self._name}_recovered", was=self._failing)
            self._failing = None
        self._backoff.reset()
        return self._interval_s

    def after_failure(self, exc: BaseException) -> float:
        kind = type(exc).__name__
        if self._failing is None:
            self._log.warning(f"{self._name}_degraded", error=str(exc)[:500], error_type=kind)
        self._failing = kind
        return self._backoff.next_delay()
