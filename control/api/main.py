"""``hpcgate control api``: serve the control API with granian until SIGTERM or SIGINT.

Granian's embedded server runs the ASGI app on this process's event loop, so the app shares
the asyncpg pool created here (one process; the control API is not a hot path).
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from granian.constants import Interfaces
from granian.server.embed import Server

from control.api.app import build_app
from control.settings import ApiSettings, require
from control.store.db import Database
from hpcgate.logs import get_logger, setup_logging
from hpcgate.settings import load_settings

log = get_logger("hpcgate.control.api")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hpcgate control api", description=__doc__.splitlines()[0])
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8081)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    settings = load_settings(
        ApiSettings, "api", overrides={"host": args.host, "port": args.port, "log_level": args.log_level}
    )
    require(settings.admin_token, "admin_token")
    require(settings.key_hash_secret, "key_hash_secret")
    setup_logging(settings.log_level)
    asyncio.run(serve(settings))
    return 0


async def serve(settings: ApiSettings) -> None:
    db = Database(settings.database_url, max_size=settings.db_pool_size, timeout_s=settings.db_timeout_s)
    await db.open()
    server = Server(
        build_app(db, settings),
        address=settings.host,
        port=settings.port,
        interface=Interfaces.ASGINL,
        log_enabled=False,
        websockets=False,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop)
    loop.call_soon(lambda: log.info("api_listening", host=settings.host, port=settings.port))
    try:
        await server.serve()
    finally:
        await db.close()
        log.info("api_stopped")
