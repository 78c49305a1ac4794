"""Session-wide real services: a fresh PostgreSQL database and Redis prefix per test session."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from tests.support.services import REDIS_URL, create_migrated_database, drop_database, unique_name


@pytest.fixture(scope="session")
async def pg_dsn() -> AsyncIterator[str]:
    """DSN of a migrated database that lives for the whole test session."""
    name, dsn = await create_migrated_database("hpcgate_test")
    yield dsn
    await drop_database(name)


@pytest.fixture(scope="session")
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture(scope="session")
async def redis_prefix() -> AsyncIterator[str]:
    """A key prefix of this session's own; its keys are deleted at the end."""
    prefix = f"{unique_name('hpcgate-test')}:"
    yield prefix
    client = aioredis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
