"""Fixtures of the autoscaler's integration tests: a database of this package's own (the
autoscaler acts on every model of its database) and rows as the Job Worker and the Endpoint
Worker would leave them."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.support.services import create_migrated_database, drop_database


@pytest.fixture(scope="package")
async def dsn() -> AsyncIterator[str]:
    name, dsn = await create_migrated_database("hpcgate_autoscale_test")
    yield dsn
    await drop_database(name)


async def add_model(conn: asyncpg.Connection, name: str, *, lo: int, hi: int, desired: int) -> int:
    model_id: int = await conn.fetchval(
        """INSERT INTO ai_model_configurations (name, min_instances, max_instances, desired_instances)
           VALUES ($1, $2, $3, $4) RETURNING model_id""",
        name,
        lo,
        hi,
        desired,
    )
    return model_id


async def add_ready_endpoint(conn: asyncpg.Connection, model_id: int, port: int) -> int:
    job_id = await conn.fetchval(
        """INSERT INTO ai_model_endpoint_jobs (model_id, generation, launcher, state, launcher_job_id,
               registration_token_hash, registration_expires_at, ready_at)
           VALUES ($1, 1, 'local', 'ready', $2, $3, now() + interval '1 hour', now())
           RETURNING endpoint_job_id""",
        model_id,
        f"t-{os.urandom(6).hex()}",
        os.urandom(32),
    )
    endpoint_id: int = await conn.fetchval(
        """INSERT INTO ai_model_endpoints (endpoint_job_id, model_id, node, port, bearer_token, ready_at)
           VALUES ($1, $2, '127.0.0.1', $3, 'tok', now()) RETURNING endpoint_id""",
        job_id,
        model_id,
        port,
    )
    return endpoint_id


async def clear_models(conn: asyncpg.Connection) -> None:
    await conn.execute("DELETE FROM ai_model_endpoint_jobs")
    await conn.execute("DELETE FROM ai_model_configurations")
