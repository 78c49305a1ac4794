"""Fixtures of the Job Worker tests: a database of this module's own and the control plane.

The Job Worker reconciles every model in its database, so its tests use a fresh database per
module rather than the session's shared one (where other tests leave models behind).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from control.jobs.naming import name_prefix
from control.launchers.local import LocalLauncher
from tests.jobs.stack import ControlPlane, poll
from tests.support.services import create_migrated_database, drop_database, unique_name


@pytest.fixture(scope="module")
async def jobs_dsn() -> AsyncIterator[str]:
    name, dsn = await create_migrated_database("hpcgate_jobs_test")
    yield dsn
    await drop_database(name)


@pytest.fixture(scope="module")
async def plane(jobs_dsn: str, redis_url: str, redis_prefix: str) -> AsyncIterator[ControlPlane]:
    cp = ControlPlane(jobs_dsn, redis_url, f"{redis_prefix}{unique_name('jobs')}:")
    try:
        await cp.start()
        yield cp
    finally:
        await cp.stop()


@pytest.fixture
async def prefix(tmp_path: Path) -> AsyncIterator[str]:
    """A test's job name prefix; its local jobs are stopped at the end, pass or fail."""
    value = "t" + uuid.uuid4().hex[:10]
    yield value
    launcher = LocalLauncher(tmp_path / "jobs" / "local-state", kill_wait_s=0)
    for job in await launcher.observe(name_prefix(value)):
        if job.alive:
            await launcher.cancel(job.launcher_job_id)

    async def stopped() -> bool:
        return not any(job.alive for job in await launcher.observe(name_prefix(value)))

    await poll(stopped, 15, "the test's local jobs stopped")
