"""A fresh PostgreSQL database per benchmark run: created and migrated at the start, dropped at
the end (``WITH (FORCE)``: whatever still holds a connection). Names carry the benchmark's label
and a random suffix, so runs side by side never share one."""

from __future__ import annotations

import uuid

import asyncpg

from control.db.migrate import migrate

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


async def create_database(admin_dsn: str, label: str) -> tuple[str, str]:
    """A new migrated database on ``admin_dsn``'s server: (name, dsn)."""
    name = f"hpcgate_bench_{label}_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn = f"{admin_dsn.rpartition('/')[0]}/{name}"
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return name, dsn


async def drop_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
