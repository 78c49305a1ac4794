"""One deployment per Redis prefix: two databases given the same ``HPCGATE_REDIS_PREFIX`` by
mistake never mix their tables. The publisher of the second is refused without writing (its
Endpoint Worker says so once and waits), its gateways never install the other's tables,
``hpcgate up`` refuses to start on it, and a prefix
whose deployment stopped publishing is free again once its claim expires (at once when the
stack stops on purpose, as ``hpcgate up`` does)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from control.publish.publisher import PrefixTakenError, TablePublisher, deployment_claim, release_claim
from gateway.worker import Worker
from hpcgate.schemas import RedisNames
from hpcgate.up_preflight import UpError, check_redis_prefix
from tests.control.conftest import stack_env
from tests.control.daemons import start_health
from tests.gateway.conftest import running_gateway
from tests.support.procs import wait_until
from tests.support.services import REDIS_URL, create_migrated_database, drop_database, unique_name

MIGRATION_1200 = Path(__file__).resolve().parents[2] / "control/db/migrations/1200_deployment_identity.sql"


@pytest.fixture
async def two_databases() -> AsyncIterator[tuple[str, str]]:
    made = [await create_migrated_database("hpcgate_claim") for _ in range(2)]
    yield made[0][1], made[1][1]
    for name, _ in made:
        await drop_database(name)


@pytest.fixture
async def redis() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(REDIS_URL)
    yield client
    await client.aclose()


async def test_a_second_database_cannot_publish_under_a_claimed_prefix(
        two_databases: tuple[str, str], redis: aioredis.Redis, tmp_path: Path) -> None:
    names = RedisNames(f"{unique_name('hpcgate-claim')}:")
    async with AsyncExitStack() as exits:
        pool_a, pool_b = [await exits.enter_async_context(asyncpg.create_pool(dsn, min_size=1, max_size=2))
                          for dsn in two_databases]
        exits.push_async_callback(redis.delete, names.owner, names.endpoint_table, names.key_table)
        a = TablePublisher(pool_a, redis, names, unroutable_after=1, claim_ttl_s=1.0)
        b = TablePublisher(pool_b, redis, names, unroutable_after=1, claim_ttl_s=30.0)
        async with pool_a.acquire() as conn:
            claim_a = await deployment_claim(conn)
        async with pool_b.acquire() as conn:
            claim_b = await deployment_claim(conn)
        assert claim_a != claim_b and claim_a.endswith(two_databases[0].rsplit("/", 1)[1])

        version_a = await a.publish_endpoints(force=True)
        assert (await redis.get(names.owner)).decode() == claim_a
        assert 0 < await redis.pttl(names.owner) <= 1000
        with pytest.raises(PrefixTakenError, match=r"in use by another deployment \(database 'hpcgate_claim"):
            await b.publish_endpoints(force=True)
        with pytest.raises(PrefixTakenError):
            await b.publish_keys(force=True)
        raw = await redis.get(names.endpoint_table)
        assert raw is not None and f'"version":{version_a},'.encode() in raw  # still A's table
        assert await redis.get(names.key_table) is None  # B wrote nothing

        # hpcgate up on B's database refuses the prefix, naming A's database
        async with pool_b.acquire() as conn:
            with pytest.raises(UpError, match=r"Redis prefix .* is in use by another deployment"):
                await check_redis_prefix(REDIS_URL, names.prefix, conn)
        async with pool_a.acquire() as conn:
            await check_redis_prefix(REDIS_URL, names.prefix, conn)  # its own: fine

        # A stops publishing: once its claim expires, B takes the prefix
        async def b_published() -> bool:
            try:
                return await b.publish_endpoints(force=True) is not None
            except PrefixTakenError:
                return False

        await wait_until(b_published, 10, "A's claim to expire")
        assert (await redis.get(names.owner)).decode() == claim_b
        with pytest.raises(PrefixTakenError):
            await a.publish_endpoints(force=True)

        # a stack stopping on purpose gives its own claim up at once, never another's
        assert not await release_claim(redis, names, claim_a)
        assert await release_claim(redis, names, claim_b)
        assert await redis.get(names.owner) is None
        assert await a.publish_endpoints(force=True) is not None


async def test_the_endpoint_worker_of_a_second_database_says_so_once_and_publishes_nothing(
        two_databases: tuple[str, str], redis: aioredis.Redis, tmp_path: Path) -> None:
    prefix = f"{unique_name('hpcgate-claim')}:"
    names = RedisNames(prefix)
    async with AsyncExitStack() as exits:
        exits.push_async_callback(redis.delete, names.owner, names.endpoint_table, names.key_table)
        first = await start_health(stack_env(two_databases[0], prefix), tmp_path)
        exits.push_async_callback(first.stop)
        await wait_until(lambda: first.events("table_published"), 10, "the first worker to publish")
        second = await start_health(stack_env(two_databases[1], prefix), tmp_path)
        exits.push_async_callback(second.stop)
        await wait_until(lambda: second.events("redis_prefix_taken"), 10, "the second worker to refuse")
        said = second.events("redis_prefix_taken")[0]
        assert said["owner"].endswith(two_databases[0].rsplit("/", 1)[1]) and said["redis_prefix"] == prefix
        await wait_until(lambda: len(first.events("table_published")) >= 4, 10, "forced republishes")
        assert len(second.events("redis_prefix_taken")) == 1 and not second.events("table_published")


async def test_a_schema_older_than_the_code_stops_the_endpoint_worker_with_the_reason_until_migrated(
        two_databases: tuple[str, str], tmp_path: Path) -> None:
    migration = MIGRATION_1200.read_text()
    conn = await asyncpg.connect(two_databases[1])
    try:
        await conn.execute("DROP TABLE deployment_identity")  # as before migration 1200
        worker = await start_health(stack_env(two_databases[1], f"{unique_name('hpcgate-claim')}:"), tmp_path)
        try:
            # its publish loop cannot heal this: the worker stops with the reason, and is started
            # again after a backoff, rather than probing on without ever publishing
            await wait_until(lambda: worker.events("health_loop_failed"), 10, "the publish loop's failure")
            failed = worker.events("health_loop_failed")[0]
            assert failed["loop"] == "_publish_loop" and "run hpcgate db migrate" in failed["hint"]
            assert not worker.events("table_published")
            await conn.execute(migration)
            await wait_until(lambda: worker.events("table_published"), 15, "publishing once migrated")
        finally:
            await worker.stop()
    finally:
        await conn.close()


async def test_a_gateway_never_installs_tables_another_deployment_published_under_its_prefix(
        two_databases: tuple[str, str], redis: aioredis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hpcgate.gateway.tables")
    names = RedisNames(f"{unique_name('hpcgate-claim')}:")
    async with AsyncExitStack() as exits:
        exits.push_async_callback(redis.delete, names.owner, names.endpoint_table, names.key_table)
        pool = await exits.enter_async_context(asyncpg.create_pool(two_databases[0], min_size=1, max_size=2))
        publisher = TablePublisher(pool, redis, names, unroutable_after=1)
        await publisher.publish_endpoints(force=True)
        await publisher.publish_keys(force=True)

        async def gateway_of(dsn: str) -> Worker:
            worker = await exits.enter_async_context(running_gateway(
                redis_url=REDIS_URL, redis_prefix=names.prefix, database_url=dsn, key_hash_secret="s" * 32))
            assert worker.sync is not None
            await asyncio.wait_for(worker.sync.connected.wait(), 10)  # the tables have been read
            return worker

        theirs = await gateway_of(two_databases[1])
        assert not theirs.gateway.has_table  # A's endpoint table: refused
        refused = [r for r in caplog.records if r.getMessage() == "tables_of_another_deployment"]
        assert len(refused) == 1  # said once, not per table or per read
        assert refused[0].fields["owner"].endswith(two_databases[0].rsplit("/", 1)[1])  # type: ignore[attr-defined]
        ours = await gateway_of(two_databases[0])
        assert ours.gateway.has_table and ours.deployment_claim is not None


async def test_a_gateway_on_a_schema_before_the_claim_still_loads_its_keys_and_tables(
        two_databases: tuple[str, str], redis: aioredis.Redis) -> None:
    names = RedisNames(f"{unique_name('hpcgate-claim')}:")
    conn = await asyncpg.connect(two_databases[1])
    try:
        await conn.execute("DROP TABLE deployment_identity")  # a rolling upgrade: new gateway, old schema
    finally:
        await conn.close()
    async with AsyncExitStack() as exits:
        exits.push_async_callback(redis.delete, names.owner, names.endpoint_table, names.key_table)
        pool = await exits.enter_async_context(asyncpg.create_pool(two_databases[0], min_size=1, max_size=2))
        await TablePublisher(pool, redis, names, unroutable_after=1).publish_endpoints(force=True)
        worker = await exits.enter_async_context(running_gateway(
            redis_url=REDIS_URL, redis_prefix=names.prefix, database_url=two_databases[1],
            key_hash_secret="s" * 32))
        assert worker.sync is not None
        await asyncio.wait_for(worker.sync.connected.wait(), 10)
        assert worker.key_load_failures == 0 and worker.deployment_claim is None
        assert worker.gateway.has_table  # no claim of its own to check against: taken, as before
