"""``hpcgate control api``: serve the control API with granian until SIGTERM or SIGINT.

Granian's embedded server runs the ASGI app on this process's event loop, so the app shares
the asyncpg pool created here (one process; the control API is not a hot path).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from granian.constants import Interfaces
from granian.server.embed import Server

from control.api.app import build_app
from control.settings import ApiSettings, require
from control.store.db import Database
from hpcgate.lifecycle import exit_at_once, install_stop_signals
from hpcgate.logs import get_logger, setup_logging
from hpcgate.net import port_is_free
from hpcgate.settings import load_settings

log = get_logger("hpcgate.control.api")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpcgate control api",
                                     description="Serve the control API until SIGTERM or SIGINT.")
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8081)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    settings = load_settings(
        ApiSettings, "api", overrides={"host": args.host, "port": args.port, "log_level": args.log_level}
    )
    require(settings.admin_token, "admin_token")
    require(settings.key_hash_secret, "key_hash_secret")
    setup_logging(settings.log_level)
    if not port_is_free(settings.host, settings.port):
        log.error("api_port_in_use", host=settings.host, port=settings.port)
        print(f"hpcgate control api: error: {settings.host}:{settings.port} is in use", file=sys.stderr)
        return 1
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

    def stop() -> None:
        # Granian lets requests in progress finish, with no deadline of its own: a client that
        # stalls mid-request would hold the stop forever.
        server.stop()  # type: ignore[no-untyped-call]
        loop.call_later(settings.shutdown_timeout_s, _past_deadline)

    install_stop_signals(loop, stop)
    serving = asyncio.create_task(server.serve())
    try:
        await _announce_when_accepting(settings, serving)
        await serving
    finally:
        await db.close()
        log.info("api_stopped")


def _past_deadline() -> None:
    log.warning("api_stop_deadline", reason="requests still in progress at shutdown_timeout_s; exiting")
    exit_at_once(0)  # a stop that was asked for, only cut short


async def _announce_when_accepting(settings: ApiSettings, serving: asyncio.Task[None]) -> None:
    """Log ``api_listening`` (a readiness signal for supervisors) once the port accepts connections."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "") else settings.host
    host = "::1" if host == "::" else host
    for _ in range(500):
        if serving.done():
            return
        try:
            _, writer = await asyncio.open_connection(host, settings.port)
        except OSError:
            await asyncio.sleep(0.01)  # granian's worker binds on its next loop turns
            continue
        writer.close()
        log.info("api_listening", host=settings.host, port=settings.port)
        return
    log.warning("api_not_accepting", host=settings.host, port=settings.port)
