"""The singleton lock in one process against the real PostgreSQL: one body at a time, a standby
that takes over when the holder stops, and a holder whose session is killed server-side stops
acting (its body is cancelled) before it could overlap a new holder."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import pytest

from control.singleton import Body, SingletonLock, lock_key
from tests.support.procs import wait_until
from tests.support.services import unique_name


class Probe:
    """A body that records which replicas run it, and whether two ever ran at once."""

    def __init__(self) -> None:
        self.running: set[str] = set()
        self.overlap = False
        self.cancelled: list[str] = []

    def body(self, who: str) -> Body:
        async def run(stop: asyncio.Event) -> None:
            self.overlap |= bool(self.running)
            self.running.add(who)
            try:
                await stop.wait()
            except asyncio.CancelledError:
                self.cancelled.append(who)
                raise
            finally:
                self.running.discard(who)
        return run


@contextlib.asynccontextmanager
async def replica(lock: SingletonLock, probe: Probe, who: str) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(lock.run(probe.body(who), stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def test_lock_keys_are_stable_signed_int4() -> None:
    assert lock_key("control-jobs") == lock_key("control-jobs") != lock_key("control-health")
    for name in ("control-jobs", "control-health", "control-autoscaler", "x" * 100):
        assert -(1 << 31) <= lock_key(name) < 1 << 31
    with pytest.raises(ValueError):
        SingletonLock("postgresql://unused", "x", poll_s=2.5, check_timeout_s=2.5)


async def test_one_active_standby_takes_over_and_a_killed_session_stops_its_body(pg_dsn: str) -> None:
    name = unique_name("lock-test")
    probe = Probe()
    first, second = (SingletonLock(pg_dsn, name, poll_s=0.1, check_timeout_s=1.0) for _ in range(2))
    async with contextlib.AsyncExitStack() as replicas:
        stop_first = await replicas.enter_async_context(replica(first, probe, "first"))
        await wait_until(lambda: probe.running == {"first"}, 10, "first active")
        await replicas.enter_async_context(replica(second, probe, "second"))
        await wait_until(lambda: second.state == "standby", 10, "second standing by")

        # The holder's session is ended on the server (a failover, an admin's pg_terminate_backend):
        # its body is cancelled and one replica takes over; never both at once.
        conn = await asyncpg.connect(pg_dsn)
        try:
            killed = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
                f"hpcgate-{name}")
            assert killed == 2  # the holder's and the standby's sessions: both recover
        finally:
            await conn.close()
        await wait_until(lambda: len(probe.running) == 1 and "first" in probe.cancelled, 10, "a new holder")

        # A clean stop of the holder hands over too (the lock goes with its session).
        if probe.running == {"first"}:
            stop_first.set()
            await wait_until(lambda: probe.running == {"second"}, 10, "second active")
        assert not probe.overlap
    assert first.state == second.state == "stopped" and not probe.running
