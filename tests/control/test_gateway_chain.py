"""The whole chain: admin API -> PostgreSQL -> Endpoint Worker -> Redis -> a real gateway.

A model's job registers and serves (the simulator), a key is created through the admin API and
works through the gateway; revoking it through the admin API makes the gateway refuse it
within one second, and a job that dies disappears from the gateway's routing.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
import msgspec
import pytest

from gateway.http_server import bind_socket
from gateway.settings import GatewaySettings
from gateway.worker import Worker
from tests.control.conftest import Stack
from tests.control.daemons import KEY_SECRET, Daemon, chat, start_api, start_health
from tests.support.metric_names import exported_names, used_names
from tests.support.procs import wait_until
from tests.support.services import REDIS_URL
from tests.support.sim import sim_process

MODEL = "chain/model"


@pytest.fixture(scope="module")
async def daemons(stack: Stack) -> AsyncIterator[list[Daemon]]:
    api = await start_api(stack.env, stack.tmp)
    stack.api_url = f"http://127.0.0.1:{api.port}"
    health = await start_health(stack.env, stack.tmp)
    yield [api, health]
    for daemon in (health, api):
        await daemon.stop()


@pytest.fixture
async def gateway(stack: Stack, daemons: list[Daemon]) -> AsyncIterator[Worker]:
    settings = msgspec.convert(
        {
            "port": 0,
            "access_log": False,
            "redis_url": REDIS_URL,
            "redis_prefix": stack.prefix,
            "database_url": stack.dsn,
            "key_hash_secret": KEY_SECRET,
            "scrape_interval_s": 0.2,
        },
        GatewaySettings,
    )
    worker = Worker(settings)
    await worker.start(bind_socket("127.0.0.1", 0, reuse_port=False))
    try:
        yield worker
    finally:
        await worker.stop()


async def test_key_and_endpoint_changes_reach_the_gateway(stack: Stack, gateway: Worker) -> None:
    model_id = await stack.add_model(MODEL)
    job_id, token = await stack.add_job(model_id)
    status, reg = await stack.register(job_id, token, MODEL, bearer="chain-secret")
    assert status == 200, reg
    assert (await stack.admin("POST", "/admin/tenants", {"name": "chain"}))[0] == 201
    status, created = await stack.admin("POST", "/admin/tenants/chain/keys", {"description": "chain"})
    assert status == 201
    key = created["key"]

    async with sim_process("--port", str(reg["port"]), "--model", MODEL, "--api-key", "chain-secret") as sim:

        async def served() -> bool:
            return await chat(gateway.port, key, MODEL) == 200

        await wait_until(served, 20, "a request through the gateway to succeed")

        status, _ = await stack.admin("POST", f"/admin/keys/{created['api_key']['key_id']}/revoke")
        assert status == 200
        revoked_at = time.monotonic()

        async def refused() -> bool:
            return await chat(gateway.port, key, MODEL) == 401

        await wait_until(refused, 1.0, "the revoked key to be refused by the gateway")
        assert time.monotonic() - revoked_at < 1.0

        # the job dies: the gateway stops routing to it (503: the model has no ready instance)
        status, second = await stack.admin("POST", "/admin/tenants/chain/keys", {})
        assert status == 201
        await wait_until(lambda: served_with(gateway.port, second["key"], 200), 10, "the new key to work")
        sim.proc.kill()
        await sim.proc.wait()
        await wait_until(
            lambda: served_with(gateway.port, second["key"], 503), 20, "the dead job to be dropped"
        )


async def served_with(port: int, key: str, status: int) -> bool:
    return await chat(port, key, MODEL) == status


async def test_every_metric_a_rule_or_dashboard_uses_is_exported(stack: Stack, gateway: Worker) -> None:
    """Scrape a running gateway (after it served a request), the control API and a simulator:
    a rule or dashboard panel on a name nothing exports would silently never fire or draw."""
    model = "chain/metrics"
    model_id = await stack.add_model(model)
    job_id, token = await stack.add_job(model_id)
    status, reg = await stack.register(job_id, token, model, bearer="chain-secret")
    assert status == 200, reg
    assert (await stack.admin("POST", "/admin/tenants", {"name": "metrics"}))[0] == 201
    status, created = await stack.admin("POST", "/admin/tenants/metrics/keys", {})
    assert status == 201
    async with sim_process("--port", str(reg["port"]), "--model", model, "--api-key", "chain-secret") as sim:
        async def served() -> bool:
            return await chat(gateway.port, created["key"], model) == 200

        await wait_until(served, 20, "a request through the gateway to succeed")

        async def usage_written() -> bool:  # the gateway flushes usage every usage_flush_s
            return "hpcgate_control_usage_newest_bucket_age_seconds " in (await http_text(
                f"{stack.api_url}/metrics", None))[1]

        await wait_until(usage_written, 15, "the request's usage row to reach PostgreSQL")
        exported: set[str] = set()
        for url, token_ in ((f"http://127.0.0.1:{gateway.port}/metrics", None),
                            (f"{stack.api_url}/metrics", None),
                            (f"{sim.url}/metrics", "chain-secret")):
            status, text = await http_text(url, token_)
            assert status == 200, (url, text[:200])
            exported |= exported_names(text)
    missing = {name: sorted(where) for name, where in used_names().items() if name not in exported}
    assert not missing, f"used but exported by nothing: {missing}"


async def http_text(url: str, token: str | None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(url, headers=headers)
    return response.status_code, response.text
