"""``hpcgate up`` ends the model instances it started, with whichever launcher started them.

Used at the end of every run (after a short drain grace, whatever is still in flight) and at
the start of the next (jobs left by a run that was killed, or by a run with the other launcher:
the Job Worker only sees jobs of its own launcher, so a switch from local to Slurm would strand
the local ones). Every live job row of the stack's database is cancelled through its own
launcher, waited on (bounded: the launchers escalate to SIGKILL / the scheduler's kill), and its
row is ended with the reason. The Job Worker must not run meanwhile (it would replace them).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import msgspec

from control.jobs import store
from control.jobs.main import make_launcher
from control.jobs.naming import name_prefix
from control.jobs.settings import JobsSettings
from control.launchers.base import Launcher, LauncherError
from hpcgate.settings import load_settings


class LiveJob(msgspec.Struct, frozen=True):
    endpoint_job_id: int
    model: str
    launcher: str
    launcher_job_id: str | None
    job_name: str | None
    state: str


async def live_jobs(conn: asyncpg.Connection) -> list[LiveJob]:
    rows = await conn.fetch(
        """SELECT j.endpoint_job_id, m.name AS model, j.launcher, j.launcher_job_id, j.job_name, j.state
             FROM ai_model_endpoint_jobs j JOIN ai_model_configurations m USING (model_id)
            WHERE j.state NOT IN ('ended', 'failed') ORDER BY j.endpoint_job_id""")
    return [LiveJob(**dict(r)) for r in rows]


def describe(job: LiveJob) -> str:
    where = f"{job.launcher} {job.launcher_job_id or 'unsubmitted'}"
    return f"job {job.endpoint_job_id} of {job.model!r} ({where}, {job.state})"


async def _end_with(launcher: Launcher, jobs: list[LiveJob], prefix: str, wait_s: float,
                    say: Callable[[str], None]) -> None:
    # By launcher id; by name only for a job whose id was never recorded (its submitter died):
    # names repeat across deployments on one cluster, ids do not.
    ids = {j.launcher_job_id for j in jobs if j.launcher_job_id}
    names = {j.job_name for j in jobs if j.job_name and not j.launcher_job_id}

    async def ours() -> list[str]:
        return [o.launcher_job_id for o in await launcher.observe(prefix)
                if o.alive and (o.launcher_job_id in ids or o.name in names)]

    for job_id in await ours():
        await launcher.cancel(job_id)
    deadline = time.monotonic() + wait_s
    shown = ""
    while (left := await ours()) and time.monotonic() < deadline:
        text = f"  waiting for {launcher.kind} job(s) to end: {', '.join(sorted(left))}"
        if text != shown:
            say(text)
            shown = text
        for job_id in left:  # the local launcher escalates on observe; scancel is idempotent
            await launcher.cancel(job_id)
        await asyncio.sleep(0.25)
    if left:
        say(f"  still running after {wait_s:.0f}s: {launcher.kind} job(s) {', '.join(sorted(left))}")


async def end_jobs(dsn: str, settings: JobsSettings, reason: str, say: Callable[[str], None],
                   wait_s: float = 15.0) -> list[LiveJob]:
    """End every live job in the database (see module docstring); returns those it ended. The
    Slurm launcher needs ``SLURM_CONF`` (and the like) in this process's environment."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        jobs = await live_jobs(conn)
        if not jobs:
            return []
        by_kind: dict[str, list[LiveJob]] = {}
        for job in jobs:
            by_kind.setdefault(job.launcher, []).append(job)
        for kind, group in by_kind.items():
            say(f"  ending {len(group)} instance(s) of the {kind} launcher: "
                + "; ".join(describe(j) for j in group))
            launcher = make_launcher(msgspec.structs.replace(settings, launcher=kind))
            try:
                await _end_with(launcher, group, name_prefix(settings.job_name_prefix), wait_s, say)
            except LauncherError as exc:
                say(f"  cannot reach the {kind} launcher ({exc}); its jobs are marked ended")
            finally:
                await launcher.close()
        for job in jobs:
            await store.finish_job(conn, job.endpoint_job_id, "ended", reason, failure=False,
                                   policy=store.FailurePolicy())
        return jobs
    finally:
        await conn.close()


def jobs_settings(database_url: str, data_dir: Path, launcher: str) -> JobsSettings:
    """The Job Worker's settings as ``up`` gives them: its HPCGATE_JOBS_* pass through, the rest
    is up's."""
    env = {k: v for k, v in os.environ.items() if k.startswith("HPCGATE_JOBS_")}
    return load_settings(JobsSettings, "jobs", env=env, overrides={
        "database_url": database_url, "data_dir": str(data_dir), "launcher": launcher})
