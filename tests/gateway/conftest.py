"""Fixtures for gateway tests: an in-process gateway worker, simulators, tenants and keys."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec
import pytest

from gateway.http_server import bind_socket
from gateway.settings import GatewaySettings
from gateway.worker import Worker
from hpcgate.schemas import hash_api_key, key_prefix, new_api_key
from tests.support.sim import SimProcess, sim_process

SECRET = "gateway-test-secret"


@contextlib.asynccontextmanager
async def running_gateway(**fields: Any) -> AsyncIterator[Worker]:
    """A gateway worker on this test's event loop, on 127.0.0.1 port 0; stopped on exit."""
    fields.setdefault("port", 0)
    fields.setdefault("access_log", False)
    settings = msgspec.convert(fields, GatewaySettings)
    worker = Worker(settings)
    await worker.start(bind_socket("127.0.0.1", 0, reuse_port=False))
    try:
        yield worker
    finally:
        await worker.stop()


class Reply(msgspec.Struct):
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return msgspec.json.decode(self.body)


async def raw_exchange(port: int, data: bytes, timeout: float = 10.0) -> Reply:
    """Send raw bytes, read one response (content-length, chunked or until close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(read_response(reader), timeout)
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> Reply:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    else:
        body = await reader.read()
    return Reply(status, headers, body)


def post(path: str, body: bytes, key: str | None = None, ctype: str = "application/json") -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (f"POST {path} HTTP/1.1\r\nHost: t\r\n{auth}Content-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def handler_tasks(worker: Worker) -> int:
    """Requests whose handler task is still alive (must be 0 once every response was read)."""
    return sum(1 for c in worker.server.connections if c.busy)


@pytest.fixture(scope="module")
async def sim_a() -> AsyncIterator[SimProcess]:
    async with sim_process("--model", "m1") as sim:
        yield sim


@pytest.fixture(scope="module")
async def sim_b() -> AsyncIterator[SimProcess]:
    async with sim_process("--model", "m1") as sim:
        yield sim


async def add_tenant(dsn: str, name: str, *, allowed: list[str] | None = None,
                     max_concurrent: int | None = None, tpm: int | None = None) -> tuple[int, str]:
    """Insert a tenant and one key; returns (tenant_id, key)."""
    key = new_api_key()
    conn = await asyncpg.connect(dsn)
    try:
        tenant_id = await conn.fetchval(
            "INSERT INTO identity_tenants (name, allowed_models, max_concurrent_requests, tokens_per_minute)"
            " VALUES ($1, $2, $3, $4) RETURNING tenant_id", name, allowed, max_concurrent, tpm)
        await conn.execute(
            "INSERT INTO identity_tenant_authentications (tenant_id, key_prefix, key_hash)"
            " VALUES ($1, $2, $3)",
            tenant_id, key_prefix(key), hash_api_key(SECRET.encode(), key))
    finally:
        await conn.close()
    return int(tenant_id), key
