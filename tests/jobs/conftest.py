"""Fixtures of the Job Worker tests: a database of this module's own and the control plane.

The Job Worker reconciles every model in its database, so its tests use a fresh database per
module rather than the session's shared one (where other tests leave models behind).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.jobs.stack import ControlPlane
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
