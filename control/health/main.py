"""``hpcgate control health``: run the Endpoint Worker until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import signal

from control.health.worker import EndpointWorker
from control.settings import HealthSettings
from hpcgate.logs import setup_logging
from hpcgate.settings import load_settings


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hpcgate control health", description=__doc__)
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    settings = load_settings(HealthSettings, "health", overrides={"log_level": args.log_level})
    setup_logging(settings.log_level)
    asyncio.run(_run(settings))
    return 0


async def _run(settings: HealthSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await EndpointWorker(settings).run(stop)
