"""``hpcgate control batches``: run the batch runner until SIGTERM or SIGINT.

Several may run at once (on several hosts); on SIGTERM a runner stops claiming, lets the lines
in flight finish (up to ``cancel_grace_s``) and exits. Killed, its claimed lines are taken over
by another runner once their lease runs out (``lease_s``).
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from control.batch.runner import serve
from control.settings import BatchRunnerSettings, require
from hpcgate.logs import setup_logging
from hpcgate.settings import load_settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpcgate control batches", description="Run batch (bulk) inference as backfill until SIGTERM."
    )
    parser.add_argument("--gateway-url", help="where batch requests are sent (default http://127.0.0.1:8000)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    settings = load_settings(
        BatchRunnerSettings,
        "batches",
        overrides={"gateway_url": args.gateway_url, "log_level": args.log_level},
    )
    require(settings.internal_token, "internal_token")
    setup_logging(settings.log_level)
    asyncio.run(_run(settings))
    return 0


async def _run(settings: BatchRunnerSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(settings, stop)
