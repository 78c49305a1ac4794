"""A gateway worker's background tasks (table sync, leases, demand, reloads) heal their own
outages; one that ends with an error it could not handle must not leave the worker serving on
with tables that no longer update: the worker is marked failed (``run_worker`` then stops it and
its process exits 1, so its parent starts another)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.gateway.conftest import running_gateway


async def test_a_failed_background_task_marks_the_worker_failed_and_says_which(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="hpcgate.gateway")

    async def breaks() -> None:
        await asyncio.sleep(0)
        raise ValueError("a snapshot the code cannot handle")

    async def ends_cleanly() -> None:
        await asyncio.sleep(0)

    async with running_gateway(static_endpoints=("m=http://127.0.0.1:9",), no_auth=True) as worker:
        worker.background(ends_cleanly(), "returns")
        await asyncio.sleep(0.05)
        assert not worker.failed.is_set()  # a task that returns is not a failure
        worker.background(breaks(), "table_sync_test")
        await asyncio.wait_for(worker.failed.wait(), 5)
    said = [r for r in caplog.records if r.getMessage() == "background_task_failed"]
    assert len(said) == 1
    fields = said[0].fields  # type: ignore[attr-defined]
    assert fields["task"] == "table_sync_test" and "a snapshot the code cannot handle" in fields["error"]
