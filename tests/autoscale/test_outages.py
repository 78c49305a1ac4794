"""PostgreSQL or Redis away: the autoscaler changes nothing, says so once, and catches up.

The real servers are reached through cuttable TCP proxies (never stopped); the autoscaler's loop
(``control.autoscale.main.run``) runs in this process. The model would be scaled down at once
(idle, no stabilisation window): that it is not while Redis is away shows that missing demand
is taken as unknown, not as zero.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import asyncpg
import msgspec
import pytest

from control.autoscale.main import run
from control.autoscale.settings import AutoscalerSettings
from tests.autoscale.conftest import add_model, add_ready_endpoint, clear_models
from tests.support.procs import wait_until
from tests.support.sim import sim_process
from tests.support.tcp_proxy import TcpProxy

LOGGER = "hpcgate.control.autoscaler"


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.getMessage() == name]


async def test_outages_change_nothing_are_logged_once_and_are_caught_up(
    dsn: str, redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    pg = urlsplit(dsn)
    conn = await asyncpg.connect(dsn)
    async with (
        TcpProxy(pg.hostname or "127.0.0.1", pg.port or 5432) as pg_proxy,
        TcpProxy("127.0.0.1", urlsplit(redis_url).port or 6379) as redis_proxy,
        sim_process("--model", "m-outage") as sim,
    ):
        try:
            await clear_models(conn)
            mid = await add_model(conn, "m-outage", lo=1, hi=3, desired=2)
            await add_ready_endpoint(conn, mid, sim.port)
            settings = msgspec.convert(
                {
                    "database_url": dsn.replace(f":{pg.port}/", f":{pg_proxy.port}/"),
                    "redis_url": f"redis://127.0.0.1:{redis_proxy.port}/0",
                    "redis_prefix": f"{redis_prefix}out:",
                    "interval_s": 0.2,
                    "outage_backoff_max_s": 0.5,
                    "scale_down_stabilise_s": 0.0,
                    "cooldown_s": 0.0,
                    "scrape_timeout_s": 1.0,
                },
                AutoscalerSettings,
            )

            async def passes() -> int:
                return int(
                    await conn.fetchval(
                        "SELECT extract(epoch FROM observed_at) * 1000 FROM ai_model_autoscaling "
                        "WHERE model_id = $1",
                        mid,
                    )
                    or 0
                )

            await redis_proxy.cut()
            stop = asyncio.Event()
            task = asyncio.ensure_future(run(settings, stop))
            try:
                # Redis away: several passes, the demand is unknown, nothing is scaled down
                first = await wait_until_value(passes, lambda v: v > 0)
                await wait_until_value(passes, lambda v: v > first + 600)
                assert await conn.fetchval("SELECT desired_instances FROM ai_model_configurations") == 2
                assert len(events(caplog, "dependency_unavailable")) == 1
                # PostgreSQL away as well: passes fail, logged once
                await pg_proxy.cut()
                await wait_until(lambda: events(caplog, "autoscaler_degraded"), 10, "the outage logged")
                await asyncio.sleep(1.5)  # several failed passes (backoff at most 0.5 s): still one line
                assert len(events(caplog, "autoscaler_degraded")) == 1
                # both back: recovery logged once each, and the pending scale-down happens
                await pg_proxy.restore()
                await redis_proxy.restore()
                await wait_until(lambda: events(caplog, "autoscaler_recovered"), 10, "the recovery logged")

                async def scaled_down() -> bool:
                    return await conn.fetchval("SELECT desired_instances FROM ai_model_configurations") == 1

                await wait_until(scaled_down, 10, "the scale-down caught up")
                assert len(events(caplog, "dependency_recovered")) == 1
                assert len(events(caplog, "autoscaler_recovered")) == 1
            finally:
                stop.set()
                await asyncio.wait_for(task, 10)
        finally:
            await conn.close()


async def wait_until_value(
    probe: Callable[[], Awaitable[int]], accept: Callable[[int], bool], timeout: float = 10.0
) -> int:
    box: list[int] = []

    async def ok() -> bool:
        box[:] = [await probe()]
        return bool(accept(box[0]))

    await wait_until(ok, timeout, "the autoscaler's passes")
    return box[0]
