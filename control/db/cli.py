"""``hpcgate db migrate|version``: database maintenance from the command line."""

from __future__ import annotations

import argparse
import asyncio
import sys

import asyncpg
import msgspec

from control.db.migrate import current_version, migrate
from hpcgate.logs import get_logger, setup_logging
from hpcgate.settings import LogLevel, PostgresUrl, load_settings

log = get_logger("hpcgate.db")


class DbSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    database_url: PostgresUrl = "postgresql://postgres@127.0.0.1:5432/hpcgate"
    log_level: LogLevel = "info"


async def _run(command: str, dsn: str) -> int:
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"hpcgate db: error: cannot connect to the database: {exc}", file=sys.stderr)
        return 1
    try:
        if command == "migrate":
            applied = await migrate(conn)
            for m in applied:
                log.info("migration_applied", version=m.version, name=m.name)
            print(f"schema at version {await current_version(conn)} ({len(applied)} applied)")
        else:
            print(await current_version(conn))
    finally:
        await conn.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpcgate db", description="Database maintenance.")
    url_help = "overrides HPCGATE_DATABASE_URL"
    parser.add_argument("--database-url", help=url_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_ in (("migrate", "apply the pending schema migrations (creates the schema on first use)"),
                        ("version", "print the schema version the database is at")):
        # SUPPRESS: given before COMMAND, the option is not reset by the subcommand's default
        sub.add_parser(name, help=help_, description=help_).add_argument(
            "--database-url", default=argparse.SUPPRESS, help=url_help)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    settings = load_settings(DbSettings, "db", overrides={"database_url": args.database_url})
    setup_logging(settings.log_level)
    return asyncio.run(_run(args.command, settings.database_url))
