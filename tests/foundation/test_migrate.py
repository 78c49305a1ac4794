"""``hpcgate db migrate`` on an empty database creates the schema; a second run changes nothing."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator

import asyncpg
import pytest

from control.db.migrate import available_migrations
from tests.support.procs import child_env, hpcgate_cmd
from tests.support.services import create_database, drop_database, unique_name

SCHEMA_QUERY = """
SELECT table_name, column_name, data_type, is_nullable, coalesce(column_default, '')
FROM information_schema.columns WHERE table_schema = 'public'
UNION ALL
SELECT conrelid::regclass::text, conname, contype::text, pg_get_constraintdef(oid), ''
FROM pg_constraint WHERE connamespace = 'public'::regnamespace
ORDER BY 1, 2
"""


@pytest.fixture
async def empty_db() -> AsyncIterator[str]:
    name = unique_name("hpcgate_migrate")
    dsn = await create_database(name)
    yield dsn
    await drop_database(name)


def run_migrate(dsn: str) -> str:
    proc = subprocess.run(
        hpcgate_cmd("db", "migrate"), env=child_env(HPCGATE_DATABASE_URL=dsn),
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


async def test_migrate_creates_schema_then_is_a_no_op(empty_db: str) -> None:
    latest = available_migrations()[-1].version
    out = run_migrate(empty_db)
    assert f"schema at version {latest} ({len(available_migrations())} applied)" in out

    conn = await asyncpg.connect(empty_db)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        tables = {r["tablename"] for r in rows}
        assert {
            "identity_tenants", "identity_tenant_authentications", "ai_model_configurations",
            "ai_model_endpoint_jobs", "ai_model_endpoints", "usage_records", "schema_version",
        } <= tables
        before = await conn.fetch(SCHEMA_QUERY)
        versions = await conn.fetch("SELECT version, applied_at FROM schema_version ORDER BY version")

        out = run_migrate(empty_db)
        assert "(0 applied)" in out
        assert await conn.fetch(SCHEMA_QUERY) == before
        assert await conn.fetch("SELECT version, applied_at FROM schema_version ORDER BY version") == versions
    finally:
        await conn.close()


async def test_constraints_forbid_duplicate_ports_per_node(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        async with conn.transaction():
            model_id = await conn.fetchval(
                "INSERT INTO ai_model_configurations (name) VALUES ($1) RETURNING model_id", unique_name("m")
            )
            job_ids = [
                await conn.fetchval(
                    """INSERT INTO ai_model_endpoint_jobs
                       (model_id, generation, launcher, registration_token_hash, registration_expires_at)
                       VALUES ($1, 1, 'local', $2, now() + interval '1 hour') RETURNING endpoint_job_id""",
                    model_id, bytes(32),
                )
                for _ in range(2)
            ]
            insert = """INSERT INTO ai_model_endpoints (endpoint_job_id, model_id, node, port, bearer_token)
                        VALUES ($1, $2, 'node1', 9000, 't')"""
            await conn.execute(insert, job_ids[0], model_id)
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.execute(insert, job_ids[1], model_id)
            raise asyncpg.exceptions.TransactionRollbackError("roll back the test rows")
    except asyncpg.exceptions.TransactionRollbackError:
        pass
    finally:
        await conn.close()


def test_bad_database_url_is_a_clear_error() -> None:
    proc = subprocess.run(
        hpcgate_cmd("db", "migrate"),
        env=child_env(HPCGATE_DATABASE_URL="postgresql://postgres@127.0.0.1:1/none"),
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert "cannot connect to the database" in proc.stderr
