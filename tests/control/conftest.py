"""Fixtures of the control-plane tests: a private database and Redis prefix per stack.

A :class:`Stack` is one deployment's worth of state: its own migrated database (so the
Endpoint Worker of one test module never probes another module's endpoints), its own Redis
prefix, the environment its daemons run with, and helpers that play the Job Worker's part
(creating job rows with a registration token) and read what was published.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis

from control.store.tokens import hash_registration_token, new_registration_token
from hpcgate.schemas import EndpointTable, KeyTable, RedisNames
from tests.control.daemons import ADMIN_TOKEN, KEY_SECRET, Daemon, http, start_api
from tests.support.services import REDIS_URL, create_migrated_database, drop_database, unique_name


@dataclass
class Stack:
    dsn: str
    prefix: str
    tmp: Path
    env: dict[str, str]
    redis: aioredis.Redis
    api_url: str = ""
    names: RedisNames = field(init=False)

    def __post_init__(self) -> None:
        self.names = RedisNames(self.prefix)

    async def sql(self, query: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.dsn)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    async def add_model(
        self, name: str, *, desired: int = 1, startup_timeout_s: int = 1800, aliases: tuple[str, ...] = ()
    ) -> int:
        rows = await self.sql(
            """INSERT INTO ai_model_configurations (name, max_instances, desired_instances, startup_timeout_s)
               VALUES ($1, greatest($2, 1), $2, $3) RETURNING model_id""",
            name,
            desired,
            startup_timeout_s,
        )
        model_id: int = rows[0]["model_id"]
        for alias in aliases:
            await self.sql("INSERT INTO ai_model_aliases (alias, model_id) VALUES ($1, $2)", alias, model_id)
        return model_id

    async def add_job(
        self, model_id: int, *, expires_in_s: int = 3600, state: str = "submitted"
    ) -> tuple[int, str]:
        """What the Job Worker does before submitting: a job row with a one-time token."""
        token = new_registration_token()
        rows = await self.sql(
            """INSERT INTO ai_model_endpoint_jobs (model_id, generation, launcher, state,
                                                   registration_token_hash, registration_expires_at)
               VALUES ($1, 1, 'local', $2, $3, now() + make_interval(secs => $4))
               RETURNING endpoint_job_id""",
            model_id,
            state,
            hash_registration_token(token),
            float(expires_in_s),
        )
        return rows[0]["endpoint_job_id"], token

    async def register(
        self,
        job_id: int,
        token: str,
        model: str,
        *,
        node: str = "127.0.0.1",
        launcher_job_id: str | None = None,
        bearer: str = "bearer-x",
    ) -> tuple[int, Any]:
        return await http(
            "POST",
            f"{self.api_url}/v1/register",
            {
                "endpoint_job_id": job_id,
                "registration_token": token,
                "launcher_job_id": launcher_job_id or f"local-{job_id}",
                "node": node,
                "model": model,
                "capabilities": ["chat"],
                "bearer_token": bearer,
            },
        )

    async def admin(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        return await http(method, f"{self.api_url}{path}", body, token=ADMIN_TOKEN)

    async def endpoint_table(self) -> EndpointTable | None:
        raw = await self.redis.get(self.names.endpoint_table)
        return None if raw is None else msgspec.json.decode(raw, type=EndpointTable)

    async def key_table(self) -> KeyTable | None:
        raw = await self.redis.get(self.names.key_table)
        return None if raw is None else msgspec.json.decode(raw, type=KeyTable)


def stack_env(dsn: str, prefix: str, **extra: str) -> dict[str, str]:
    base = random.randrange(21000, 29000, 100)  # a port block of its own: other runs share this host
    env = {
        "HPCGATE_DATABASE_URL": dsn,
        "HPCGATE_REDIS_URL": REDIS_URL,
        "HPCGATE_REDIS_PREFIX": prefix,
        "HPCGATE_ADMIN_TOKEN": ADMIN_TOKEN,
        "HPCGATE_KEY_HASH_SECRET": KEY_SECRET,
        "HPCGATE_LOG_LEVEL": "info",
        "HPCGATE_API_PORT_RANGE_START": str(base),
        "HPCGATE_API_PORT_RANGE_END": str(base + 99),
        "HPCGATE_HEALTH_PROBE_INTERVAL_S": "0.2",
        "HPCGATE_HEALTH_PROBE_TIMEOUT_S": "1",
        "HPCGATE_HEALTH_PUBLISH_INTERVAL_S": "2",
        "HPCGATE_HEALTH_UNROUTABLE_AFTER": "1",
        "HPCGATE_HEALTH_DEAD_AFTER": "3",
        "HPCGATE_HEALTH_BACKOFF_MAX_S": "0.5",
    }
    env.update(extra)
    return env


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """A fresh deployment state (database, Redis prefix) for one test module."""
    db_name, dsn = await create_migrated_database("hpcgate_ctl")
    prefix = f"{unique_name('hpcgate-ctl')}:"
    client = aioredis.from_url(REDIS_URL)
    s = Stack(dsn, prefix, tmp_path_factory.mktemp("ctl"), stack_env(dsn, prefix), client)
    try:
        yield s
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
        await drop_database(db_name)


@pytest.fixture(scope="module")
async def api(stack: Stack) -> AsyncIterator[Daemon]:
    """A control API on the module's stack (a module needing other settings defines its own)."""
    daemon = await start_api(stack.env, stack.tmp)
    stack.api_url = f"http://127.0.0.1:{daemon.port}"
    yield daemon
    await daemon.stop()
