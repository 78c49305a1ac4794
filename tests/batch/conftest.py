"""Fixtures of the batch tests: the control API (a subprocess), a simulator, an in-process
gateway relaying /v1/files and /v1/batches to it, and batch runners (in-process or subprocess).

Everything is real and on loopback: PostgreSQL, the control API, the gateway, the simulator and
the ``openai`` SDK. Each test makes its own tenants, so tests do not see each other's files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from control.batch.runner import BatchRunner
from control.settings import BatchRunnerSettings
from gateway.worker import Worker
from tests.control.daemons import ADMIN_TOKEN, Daemon, start_api, start_daemon
from tests.gateway.conftest import SECRET, add_tenant, running_gateway
from tests.support.sim import SimProcess, sim_process

TOKEN = "batch-test-internal-token"
MODEL = "bm1"
MAX_FILE = 256 * 1024
QUOTA = 4 * MAX_FILE  # a tenant's stored bytes


@dataclass
class BatchStack:
    dsn: str
    batch_dir: Path
    tmp: Path
    api: Daemon
    gateway: Worker
    sim: SimProcess

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.port}/v1"

    def runner_settings(self, **fields: Any) -> BatchRunnerSettings:
        base: dict[str, Any] = dict(
            database_url=self.dsn, internal_token=TOKEN, batch_dir=str(self.batch_dir),
            gateway_url=f"http://127.0.0.1:{self.gateway.port}", poll_s=0.1, lease_s=2.0,
            min_concurrency=4, max_concurrency=4, control_step_s=0.2, cancel_grace_s=5.0)
        base.update(fields)
        return BatchRunnerSettings(**base)

    def runner_env(self, **fields: str) -> dict[str, str]:
        env = {"HPCGATE_DATABASE_URL": self.dsn, "HPCGATE_INTERNAL_TOKEN": TOKEN,
               "HPCGATE_BATCH_DIR": str(self.batch_dir),
               "HPCGATE_BATCHES_GATEWAY_URL": f"http://127.0.0.1:{self.gateway.port}",
               "HPCGATE_BATCHES_POLL_S": "0.1", "HPCGATE_BATCHES_LEASE_S": "1.5",
               "HPCGATE_BATCHES_MIN_CONCURRENCY": "2", "HPCGATE_BATCHES_MAX_CONCURRENCY": "2"}
        env.update({f"HPCGATE_BATCHES_{k.upper()}": v for k, v in fields.items()})
        return env

    async def tenant(self, name: str) -> str:
        _, key = await add_tenant(self.dsn, name)
        assert await self.gateway._load_keys_once()  # the gateway knows the new key now
        return key

    async def sql(self, query: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.dsn)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    async def start_runner_process(self, **fields: str) -> Daemon:
        return await start_daemon(["control", "batches"], self.runner_env(**fields), self.tmp)


@contextlib.asynccontextmanager
async def runner(stack: BatchStack, **fields: Any) -> AsyncIterator[BatchRunner]:
    """An in-process runner on this test's loop; stopped (lines in flight finished) on exit."""
    settings = stack.runner_settings(**fields)
    pool = await asyncpg.create_pool(stack.dsn, min_size=1, max_size=4)
    stop = asyncio.Event()
    async with httpx.AsyncClient() as client:
        r = BatchRunner(settings, pool, client)
        task = asyncio.create_task(r.run(stop))
        try:
            yield r
        finally:
            stop.set()
            await task
            await pool.close()


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


def chat_line(custom_id: str, content: str = "hi", max_tokens: int = 4, model: str = MODEL) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "max_tokens": max_tokens,
                     "messages": [{"role": "user", "content": content}]}}


@pytest.fixture(scope="module")
async def batch_stack(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[BatchStack]:
    tmp = tmp_path_factory.mktemp("batch")
    batch_dir = tmp / "files"
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("INSERT INTO ai_model_configurations (name, max_instances, desired_instances) "
                           "VALUES ($1, 1, 0) ON CONFLICT DO NOTHING", MODEL)
    finally:
        await conn.close()
    env = {"HPCGATE_DATABASE_URL": pg_dsn, "HPCGATE_ADMIN_TOKEN": ADMIN_TOKEN,
           "HPCGATE_KEY_HASH_SECRET": SECRET, "HPCGATE_INTERNAL_TOKEN": TOKEN,
           "HPCGATE_BATCH_DIR": str(batch_dir), "HPCGATE_API_FILES_MAX_BYTES": str(MAX_FILE),
           "HPCGATE_API_TENANT_MAX_ACTIVE_BATCHES": "3", "HPCGATE_API_TENANT_MAX_STORED_BYTES": str(QUOTA)}
    api = await start_api(env, tmp)
    try:
        async with sim_process("--model", MODEL, "--profile", "paced") as sim, running_gateway(
                static_endpoints=(f"{MODEL}={sim.url}",), database_url=pg_dsn, key_hash_secret=SECRET,
                batch_api_url=f"http://127.0.0.1:{api.port}", internal_token=TOKEN,
                files_max_bytes=MAX_FILE) as gw:
            yield BatchStack(pg_dsn, batch_dir, tmp, api, gw, sim)
    finally:
        await api.stop()
