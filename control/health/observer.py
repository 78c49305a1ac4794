"""The seam through which the Endpoint Worker asks a launcher whether jobs still exist.

The Endpoint Worker works without one: the Job Worker already ends job rows whose launcher
job vanished, and the worker removes endpoints of ended jobs and of endpoints that stop
answering. An observer only makes removal faster when a job dies under a live Job Worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from control.launchers.base import Launcher


@dataclass(frozen=True, slots=True)
class LiveJob:
    endpoint_job_id: int
    launcher: str  # ai_model_endpoint_jobs.launcher
    launcher_job_id: str | None


class JobObserver(Protocol):
    async def gone(self, jobs: Sequence[LiveJob]) -> frozenset[int]:
        """The endpoint job ids among ``jobs`` whose launcher job no longer runs.

        Raise on any doubt (scheduler unreachable): an exception means "no information",
        never "everything is gone".
        """
        ...


class LauncherObserver:
    """Adapts a :class:`Launcher` (observe by name prefix) to :class:`JobObserver`."""

    def __init__(self, launcher: Launcher, name_prefix: str) -> None:
        self._launcher = launcher
        self._prefix = name_prefix

    async def gone(self, jobs: Sequence[LiveJob]) -> frozenset[int]:
        mine = [j for j in jobs if j.launcher == self._launcher.kind and j.launcher_job_id]
        if not mine:
            return frozenset()
        alive = {o.launcher_job_id for o in await self._launcher.observe(self._prefix) if o.alive}
        return frozenset(j.endpoint_job_id for j in mine if j.launcher_job_id not in alive)
