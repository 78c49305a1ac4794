"""The launcher seam: submit a rendered job script, observe jobs by name, cancel them.

Invariants every implementation keeps:

- A job is identified by the launcher's own id (``launcher_job_id``, a string) and carries the
  name the Job Worker gave it (``JobSpec.name``, e.g. ``hpcgate-llama-g3-e42``). Names are
  unique per endpoint job, so ``observe()`` filtered by name is how a restarted worker finds a
  job it submitted but did not record: it never submits twice and never orphans a job.
- ``observe()`` reports every job whose name starts with the prefix, including recently ended
  ones (with their terminal state); a job it does not report is gone (never existed, or ended
  long ago and was purged by the scheduler).
- ``cancel()`` is idempotent: cancelling an ended or unknown job is not an error.
- ``secret_env`` (the one-time registration token) reaches the job's environment only: it is
  never put on a command line, in the script text or in a log record.
- Errors are :class:`LauncherError` (temporary: the scheduler is unreachable, a command timed
  out) or :class:`SubmitRejectedError` (permanent for this spec: bad partition, bad account...).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import msgspec


class JobState(enum.StrEnum):
    PENDING = "pending"  # queued, not started
    RUNNING = "running"  # started (includes Slurm's CONFIGURING)
    ENDING = "ending"  # being torn down (COMPLETING, or a cancel in progress)
    ENDED = "ended"  # terminal; see ObservedJob.outcome


class Outcome(enum.StrEnum):
    """How an ended job ended (None while it runs)."""

    COMPLETED = "completed"  # exit code 0
    FAILED = "failed"  # non-zero exit, node failure, launch failure
    CANCELLED = "cancelled"  # cancelled by us or by someone else (scancel)
    TIMEOUT = "timeout"  # hit its time limit
    UNKNOWN = "unknown"


class JobSpec(msgspec.Struct, frozen=True, kw_only=True):
    name: str  # unique per endpoint job; see module docstring
    script: str  # the rendered job script (bash, with #SBATCH lines for Slurm)
    output_path: str  # where the job's stdout+stderr go (read back on failure)
    workdir: str  # the job's working directory
    time_limit_s: int | None = None  # the walltime; None: the partition's default
    secret_env: Mapping[str, str] = msgspec.field(default_factory=dict)


class ObservedJob(msgspec.Struct, frozen=True, kw_only=True):
    launcher_job_id: str
    name: str
    state: JobState
    outcome: Outcome | None = None  # set when state is ENDED
    reason: str | None = None  # the scheduler's reason (e.g. "NonZeroExitCode", "JobHeldUser")
    exit_code: int | None = None
    node: str | None = None
    start_time: float | None = None  # unix time the job started running
    time_limit_s: int | None = None  # None: unlimited / unknown
    output_path: str | None = None

    @property
    def alive(self) -> bool:
        return self.state is not JobState.ENDED


class LauncherError(Exception):
    """A temporary failure talking to the scheduler; the caller retries later."""


class SubmitRejectedError(LauncherError):
    """The scheduler refused this job spec (bad partition, account, resources); not retried as is."""


@runtime_checkable
class Launcher(Protocol):
    kind: str  # "slurm" | "slurmrest" | "local": the value of ai_model_endpoint_jobs.launcher

    async def submit(self, spec: JobSpec) -> str:
        """Submit and return the launcher job id. Raises SubmitRejectedError or LauncherError."""
        ...

    async def observe(self, name_prefix: str) -> list[ObservedJob]:
        """Every known job (live or recently ended) whose name starts with ``name_prefix``."""
        ...

    async def cancel(self, launcher_job_id: str) -> None:
        """Ask the job to stop (SIGTERM, then the scheduler's kill). Idempotent."""
        ...

    async def read_output(self, job: ObservedJob, max_bytes: int = 4096) -> str | None:
        """The tail of the job's output file, or None when it cannot be read."""
        ...

    async def close(self) -> None:
        """Release connections and child processes' bookkeeping (not the jobs themselves)."""
        ...
