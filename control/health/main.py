"""``hpcgate control health``: run the Endpoint Worker until SIGTERM or SIGINT.

One replica acts at a time (the ``control-health`` advisory lock, :mod:`control.singleton`);
a second one stands by and takes over when the first dies.
"""

from __future__ import annotations

import argparse
import asyncio

from control.health.observer import LauncherObserver
from control.health.worker import EndpointWorker
from control.jobs.main import make_launcher
from control.jobs.naming import name_prefix
from control.jobs.settings import JobsSettings
from control.launchers.base import Launcher
from control.settings import HealthSettings
from control.singleton import SingletonLock
from hpcgate.lifecycle import install_stop_signals
from hpcgate.logs import setup_logging
from hpcgate.settings import load_settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpcgate control health",
        description="Run the Endpoint Worker (probes, readiness, expiry, endpoint tables) until SIGTERM or "
        "SIGINT. One replica acts at a time; a second one stands by and takes over when the first dies.")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    settings = load_settings(HealthSettings, "health", overrides={"log_level": args.log_level})
    setup_logging(settings.log_level)
    asyncio.run(_run(settings))
    return 0


async def _run(settings: HealthSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    install_stop_signals(loop, stop.set)
    launcher: Launcher | None = None
    observer = None
    if settings.observe_launcher:
        jobs = load_settings(JobsSettings, "jobs")
        launcher = make_launcher(jobs)
        observer = LauncherObserver(launcher, name_prefix(jobs.job_name_prefix), settings.observe_interval_s)
    lock = SingletonLock(settings.database_url, "control-health", poll_s=settings.standby_poll_s)
    try:
        # A fresh worker per activation: nothing of a lost term is carried over.
        await lock.run(lambda body_stop: EndpointWorker(settings, observer=observer).run(body_stop), stop)
    finally:
        if launcher is not None:
            await launcher.close()
