"""``hpcgate control autoscaler``: scales model instances from their engines' queues.

Runs :meth:`Autoscaler.reconcile_once` every ``interval_s``. A failed pass (PostgreSQL away) is
retried with capped, jittered backoff; the outage is logged once (``autoscaler_degraded``) and
the recovery once (both by :class:`control.reconcile_rhythm.ReconcileRhythm`).
One replica acts at a time: :class:`control.singleton.SingletonLock` runs the
loop only while this process holds the ``control-autoscaler`` advisory lock; a second replica
stands by and takes over within ``standby_poll_s`` when the first dies.

Prints ``{"event": "autoscaler_started", ...}`` on stderr once it is active.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import signal

import asyncpg
import redis.asyncio as aioredis

from control.autoscale.daemon import Autoscaler, make_http
from control.autoscale.settings import AutoscalerSettings
from control.reconcile_rhythm import ReconcileRhythm
from control.singleton import SingletonLock
from hpcgate.logs import get_logger, setup_logging
from hpcgate.settings import load_settings

log = get_logger("hpcgate.control.autoscaler")
_TEMPORARY = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


async def run(settings: AutoscalerSettings, stop: asyncio.Event) -> None:
    rhythm = ReconcileRhythm("autoscaler", log, settings.interval_s, settings.outage_backoff_max_s)
    pool: asyncpg.Pool | None = None
    http = make_http(settings)
    redis = aioredis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    scaler: Autoscaler | None = None
    clock = {}
    if settings.schedule_clock_start is not None:  # a simulated schedule clock is said once, at start
        clock = {
            "schedule_clock_start": settings.schedule_clock_start.isoformat(),
            "schedule_clock_speed": settings.schedule_clock_speed,
        }
    log.info("autoscaler_started", interval_s=settings.interval_s, mode=settings.mode, **clock)
    try:
        while not stop.is_set():
            try:
                if pool is None or scaler is None:
                    pool = await asyncpg.create_pool(
                        settings.database_url, min_size=1, max_size=2, command_timeout=10
                    )
                    scaler = Autoscaler(settings, pool, http, redis)
                await scaler.reconcile_once()
                delay = rhythm.after_success()
            except _TEMPORARY as exc:
                delay = rhythm.after_failure(exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
    finally:
        if pool is not None:
            await pool.close()
        await http.aclose()
        await redis.aclose()
        log.info("autoscaler_stopped")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpcgate control autoscaler",
        description="The autoscaler: moves each model's desired instances between its min and max "
        "from its engines' queue time, waiting requests and the gateways' held requests.",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=None,
        dest="interval_s",
        metavar="SECONDS",
        help="one reconcile pass per interval (default 5, setting autoscaler.interval_s)",
    )
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    settings = load_settings(AutoscalerSettings, "autoscaler", overrides={"interval_s": args.interval_s})
    setup_logging(settings.log_level)
    # one line per scrape (every engine, every pass) would drown the decisions
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        lock = SingletonLock(settings.database_url, "control-autoscaler", poll_s=settings.standby_poll_s)
        await lock.run(functools.partial(run, settings), stop)

    asyncio.run(_main())
    return 0
