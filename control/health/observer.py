"""The seam through which the Endpoint Worker asks a launcher whether jobs still exist.

The Endpoint Worker works without one: the Job Worker already ends job rows whose launcher
job vanished, and the worker removes endpoints of ended jobs and of endpoints that stop
answering. An observer only makes removal faster when a job dies under a live Job Worker.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from control.launchers.base import Launcher


@dataclass(frozen=True, slots=True)
class LiveJob:
    endpoint_job_id: int
    launcher: str  # ai_model_endpoint_jobs.launcher
    launcher_job_id: str | None
    registered_at: float  # unix time; a job is judged only by an observation started after it


class JobObserver(Protocol):
    async def gone(self, jobs: Sequence[LiveJob]) -> frozenset[int]:
        """The endpoint job ids among ``jobs`` whose launcher job no longer runs.

        Raise on any doubt (scheduler unreachable): an exception means "no information",
        never "everything is gone".
        """
        ...


class LauncherObserver:
    """Adapts a :class:`Launcher` (observe by name prefix) to :class:`JobObserver`.

    The scheduler is asked at most every ``min_interval_s`` (squeue is not free); in between
    the last answer is reused. A job is reported gone only by an observation that started
    well after it registered (``skew_s`` covers clock differences between the database and
    this host), so a job that registered after the last look is never judged by it.
    """

    def __init__(
        self,
        launcher: Launcher,
        name_prefix: str,
        min_interval_s: float = 10.0,
        clock: Callable[[], float] = time.time,
        skew_s: float = 5.0,
    ) -> None:
        self._launcher = launcher
        self._prefix = name_prefix
        self._min_interval = min_interval_s
        self._clock = clock
        self._skew = skew_s
        self._alive: frozenset[str] | None = None
        self._looked_at = 0.0

    async def gone(self, jobs: Sequence[LiveJob]) -> frozenset[int]:
        mine = [j for j in jobs if j.launcher == self._launcher.kind and j.launcher_job_id]
        if not mine:
            return frozenset()
        now = self._clock()
        if self._alive is None or now - self._looked_at >= self._min_interval:
            observed = await self._launcher.observe(self._prefix)
            self._alive = frozenset(o.launcher_job_id for o in observed if o.alive)
            self._looked_at = now
        alive = self._alive
        judged_since = self._looked_at - self._skew
        return frozenset(
            j.endpoint_job_id
            for j in mine
            if j.launcher_job_id not in alive and j.registered_at < judged_since
        )
