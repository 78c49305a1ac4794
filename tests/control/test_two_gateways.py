"""Horizontal scaling, proven locally: two gateway deployments behind nginx share one state.

Two ``hpcgate gateway`` processes (each with two workers, so four table and key copies) run in
dynamic mode against one Redis and one PostgreSQL, with the real control API and Endpoint
Worker, behind Debian's nginx balancing them round robin on loopback. What a site relies on
when it adds replicas: every worker of both deployments routes on the table version Redis
holds, a revoked key is refused by all of them within a second, a newly registered endpoint
is served by all of them, and a load split across them through nginx loses nothing: every
request completes and the usage rows the gateways flush to PostgreSQL add up to what the
clients were told.

A gateway with several workers answers each fresh connection on whichever worker the kernel
picks (SO_REUSEPORT), so a check "on a gateway" asks it over several fresh connections and
needs every answer to agree.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass

import orjson
import pytest

from bench.driver import RunSettings, run_benchmark
from bench.procs import Child, start_dynamic_gateway, start_nginx, stop
from bench.workload import Workload
from tests.control.conftest import Stack
from tests.control.daemons import Daemon, chat, http, start_health
from tests.support.procs import wait_until
from tests.support.sim import sim_process

MODEL = "scale/model"
BEARER = "scale-secret"
PROBES = 8  # fresh connections per gateway: all of them on one worker has probability 2**-7
LOAD_N, LOAD_CONCURRENCY = 200, 20


@dataclass
class Deployment:
    """Two gateway deployments and the nginx in front of them, on one control plane."""

    stack: Stack
    gateways: list[Child]
    nginx: Child
    key: str
    key_id: int
    exits: AsyncExitStack


async def new_key(stack: Stack, tenant: str) -> tuple[str, int]:
    assert (await stack.admin("POST", "/admin/tenants", {"name": tenant}))[0] == 201
    status, created = await stack.admin("POST", f"/admin/tenants/{tenant}/keys", {})
    assert status == 201, created
    return created["key"], created["api_key"]["key_id"]


async def serve_model(stack: Stack, exits: AsyncExitStack, model: str) -> None:
    """A model with one registered job whose simulator serves it (what a Slurm job does)."""
    job_id, token = await stack.add_job(await stack.add_model(model))
    status, reg = await stack.register(job_id, token, model, bearer=BEARER)
    assert status == 200, reg
    await exits.enter_async_context(sim_process(
        "--port", str(reg["port"]), "--model", model, "--api-key", BEARER, "--profile", "fast"))


@pytest.fixture(scope="module")
async def deployment(stack: Stack, api: Daemon) -> AsyncIterator[Deployment]:
    async with AsyncExitStack() as exits:
        health = await start_health(stack.env, stack.tmp)
        exits.push_async_callback(health.stop)
        await serve_model(stack, exits, MODEL)
        key, key_id = await new_key(stack, "scale")
        env = {**stack.env, "HPCGATE_LOG_LEVEL": "warning", "HPCGATE_GATEWAY_USAGE_FLUSH_S": "0.2",
               "HPCGATE_GATEWAY_SCRAPE_INTERVAL_S": "0.2"}
        gateways = []
        for _ in range(2):
            gateway = await start_dynamic_gateway(env, workers=2)
            exits.push_async_callback(stop, gateway)
            gateways.append(gateway)
        nginx = await start_nginx([f"{g.host}:{g.port}" for g in gateways])
        exits.push_async_callback(stop, nginx)
        yield Deployment(stack, gateways, nginx, key, key_id, exits)


async def answers(gateway: Child, probe: str, **kw: str) -> list[object]:
    """The answers of ``PROBES`` fresh connections: the ``/ready`` table version, or the status
    of a chat completion with ``kw['key']`` for ``kw['model']``."""
    seen: list[object] = []
    for _ in range(PROBES):
        if probe == "ready":
            status, body = await http("GET", f"{gateway.url}/ready", timeout=2)
            seen.append(body["table_version"] if status == 200 else None)
        else:
            seen.append(await chat(gateway.port, kw["key"], kw["model"]))
    return seen


async def all_on_published_version(d: Deployment) -> int:
    """Wait until every answer of both gateways reports the version Redis holds; return it."""
    published: list[int] = []

    async def agree() -> bool:
        table = await d.stack.endpoint_table()
        if table is None:
            return False
        published[:] = [table.version]
        for gateway in d.gateways:
            if await answers(gateway, "ready") != [table.version] * PROBES:
                return False
        return True

    await wait_until(agree, 10, "both gateways to route on the published table version")
    return published[0]


async def test_both_gateways_route_on_the_published_table_version(deployment: Deployment) -> None:
    version = await all_on_published_version(deployment)
    for gateway in deployment.gateways:
        assert await answers(gateway, "chat", key=deployment.key, model=MODEL) == [200] * PROBES
    # A republish may have come meanwhile (the Endpoint Worker republishes every few seconds):
    # both gateways follow the published version, whichever it is now.
    assert await all_on_published_version(deployment) >= version


async def test_a_new_endpoint_appears_in_both(deployment: Deployment) -> None:
    before = await all_on_published_version(deployment)
    await serve_model(deployment.stack, deployment.exits, "scale/second")

    async def served_by_both() -> bool:
        for gateway in deployment.gateways:
            if await answers(gateway, "chat", key=deployment.key, model="scale/second") != [200] * PROBES:
                return False
        return True

    await wait_until(served_by_both, 15, "both gateways to serve the new endpoint")
    assert await all_on_published_version(deployment) > before


async def test_a_load_split_across_both_loses_nothing(deployment: Deployment) -> None:
    """200 requests at concurrency 20 through nginx: every one completes, both gateways served
    a share, and PostgreSQL's usage rows equal what the responses told the clients."""
    key, _ = await new_key(deployment.stack, "load")

    probes_served = 0  # the probes' usage is accounted with the load's (2 tokens each)

    async def key_known_to_both() -> bool:  # a new key reaches the gateways through Redis
        nonlocal probes_served
        statuses = [s for g in deployment.gateways for s in await answers(g, "chat", key=key, model=MODEL)]
        probes_served += statuses.count(200)
        return statuses == [200] * len(statuses)

    await wait_until(key_known_to_both, 5, "both gateways to accept the new key")
    workload = Workload(name="fixed", source="small prompts and outputs",
                        prompt_lens=[8 + i % 24 for i in range(LOAD_N)],
                        output_lens=[1 + i % 16 for i in range(LOAD_N)])
    settings = RunSettings(base_url=deployment.nginx.url, model=MODEL, endpoint="chat", num_prompts=LOAD_N,
                           max_concurrency=LOAD_CONCURRENCY, ignore_eos=True, api_key=key, timeout_s=30,
                           label="two-gateways")
    doc = await run_benchmark(settings, workload, progress=False)
    records = doc["requests"]
    assert isinstance(records, list)
    assert doc["errors"] == {} and all(r["success"] for r in records), doc["errors"]
    told = [r["output_tokens"] for r in records]
    assert told == workload.output_lens  # ignore_eos: each response's usage says max_tokens
    # the driver's untimed warm-up request (request 0's prompt and length) is accounted too
    expected = (LOAD_N + 1 + probes_served, sum(told) + told[0] + 2 * probes_served)

    async def usage() -> tuple[int, int]:
        rows = await deployment.stack.sql(
            """SELECT coalesce(sum(u.requests), 0) AS requests, coalesce(sum(u.errors), 0) AS errors,
                      coalesce(sum(u.completion_tokens), 0) AS tokens
               FROM usage_records u JOIN identity_tenants t USING (tenant_id) WHERE t.name = 'load'""")
        assert rows[0]["errors"] == 0
        return int(rows[0]["requests"]), int(rows[0]["tokens"])

    async def accounted() -> bool:
        got[:] = await usage()
        return tuple(got) == expected

    got: list[int] = []
    try:
        await wait_until(accounted, 10, f"usage rows to sum to {expected}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; PostgreSQL has {tuple(got)}") from None

    def shares() -> list[int]:
        return [sum(1 for line in g.stderr_text().splitlines()
                    if '"event":"access"' in line and orjson.loads(line).get("tenant") == "load")
                for g in deployment.gateways]

    # access logs are flushed once a second; nginx alternates the two upstreams per request
    await wait_until(lambda: sum(shares()) == expected[0], 5, "every request in a gateway's access log")
    assert min(shares()) >= LOAD_N // 4, shares()


async def test_a_revoked_key_is_refused_by_both_within_a_second(deployment: Deployment) -> None:
    for gateway in deployment.gateways:
        assert await answers(gateway, "chat", key=deployment.key, model=MODEL) == [200] * PROBES
    status, _ = await deployment.stack.admin("POST", f"/admin/keys/{deployment.key_id}/revoke")
    assert status == 200
    revoked_at = time.monotonic()

    async def refused_by_both() -> bool:
        for gateway in deployment.gateways:
            if await answers(gateway, "chat", key=deployment.key, model=MODEL) != [401] * PROBES:
                return False
        return True

    await wait_until(refused_by_both, 1.0, "both gateways to refuse the revoked key")
    assert time.monotonic() - revoked_at < 1.0
