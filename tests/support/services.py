"""Real PostgreSQL, Redis and Slurm for tests: per-session databases and key prefixes.

Invariants: every test session gets its own database (``hpcgate_test_<random>``) and Redis
key prefix (``hpcgate-test-<random>:``), both removed at the end, so concurrent runs on one
machine never see each other's state. The services themselves are started by ``dev.sh test``
when absent; a test never skips for want of one.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parents[2]
ADMIN_DSN = os.environ.get("HPCGATE_TEST_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("HPCGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def dsn_for(database: str) -> str:
    base, _, _ = ADMIN_DSN.rpartition("/")
    return f"{base}/{database}"


def unique_name(stem: str) -> str:
    return f"{stem}_{uuid.uuid4().hex[:12]}"


async def create_database(name: str) -> str:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return dsn_for(name)


async def create_migrated_database(stem: str) -> tuple[str, str]:
    """A fresh database with the schema applied; returns (name, dsn)."""
    from control.db.migrate import migrate

    name = unique_name(stem)
    dsn = await create_database(name)
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return name, dsn


async def drop_database(name: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def start_slurm(directory: Path | None = None, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """Start (or reuse) the project's local Slurm cluster; returns the variables to use it."""
    env = {**os.environ, **(extra_env or {})}
    args = [str(ROOT / "slurm/local/start-cluster.sh")]
    if directory is not None:
        args.append(str(directory))
    out = subprocess.run(args, env=env, check=True, capture_output=True, text=True, timeout=300).stdout
    exports: dict[str, str] = {}
    for line in out.splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            exports[key] = value
    return exports


def stop_slurm(directory: Path | None = None) -> None:
    args = [str(ROOT / "slurm/local/stop-cluster.sh")]
    if directory is not None:
        args.append(str(directory))
    subprocess.run(args, check=True, capture_output=True, timeout=120)
