"""Publishing the endpoint and key tables to Redis, versioned from PostgreSQL.

Protocol (shared with the gateway, see hpcgate/schemas/tables.py): the snapshot is
``msgspec.json.encode(table)`` stored with SET under ``RedisNames.endpoint_table`` (resp.
``key_table``), then the version is PUBLISHed as ASCII digits on the matching channel, both in
one server-side script (atomic: a reader never sees one without the other).

Invariant: a higher version never carries older data. Reading the rows, drawing the version
(``nextval('published_table_version')``) and writing Redis all happen while holding a
transaction-level advisory lock per table, so two publishers (a second worker started by
mistake, or one that was restarted) serialize, and the one that publishes later has read
later. Unchanged content is not republished unless ``force`` is given (the periodic safety
net), so a trigger-driven wake-up without a real change costs one read.

Invariant: one deployment per Redis prefix. Each write also claims the prefix
(``RedisNames.owner``, with an expiry renewed by every write) for this database's deployment id
(migration 1200), in the same server-side script that writes the table: a publisher of another
database finds the claim and raises :class:`PrefixTakenError` without writing, so two stacks
given the same prefix by mistake never mix their tables. A deployment that stops publishing
releases the prefix after ``claim_ttl_s``.
"""

from __future__ import annotations

import time

import asyncpg
import msgspec
import redis.asyncio as aioredis

from control.publish.tables import (
    EndpointRow,
    KeyRow,
    ModelRow,
    TenantRow,
    TribunalRow,
    build_endpoint_table,
    build_key_table,
)
from control.store.db import Conn
from hpcgate.schemas import DEPLOYMENT_CLAIM_SQL, EndpointTable, KeyTable, RedisNames, decode_model_limits

# KEYS: owner claim, table; ARGV: our claim, its expiry (ms), snapshot, channel, version.
# Returns the other deployment's claim (and writes nothing), or nil once written.
_CLAIM_AND_WRITE = """
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then return owner end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return false
"""
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"

_ENDPOINT_LOCK = 0x6870_6770_0001  # advisory lock keys: any constants shared by all publishers
_KEY_LOCK = 0x6870_6770_0002

_MODELS_SQL = """
SELECT m.name, m.state, m.state_reason, m.desired_instances, m.max_model_len, m.min_instances,
       m.max_instances,
       coalesce((SELECT array_agg(a.alias ORDER BY a.alias) FROM ai_model_aliases a
                  WHERE a.model_id = m.model_id), '{}') AS aliases,
       s.policy ->> 'hold_s' AS hold_s,
       coalesce(s.observed_at > now() - interval '60 seconds', false) AS autoscaled
  FROM ai_model_configurations m LEFT JOIN ai_model_autoscaling s USING (model_id)
"""

_ENDPOINTS_SQL = """
SELECT e.endpoint_id, e.endpoint_job_id, m.name AS model, e.node, e.port, j.launcher_job_id,
       e.bearer_token, e.consecutive_failures, e.capabilities,
       (e.draining OR j.state IN ('draining', 'cancelling') OR m.state = 'draining') AS draining
  FROM ai_model_endpoints e
  JOIN ai_model_endpoint_jobs j USING (endpoint_job_id)
  JOIN ai_model_configurations m ON m.model_id = e.model_id
 WHERE e.ready_at IS NOT NULL AND j.state NOT IN ('ended', 'failed')
"""

_TRIBUNALS_SQL = "SELECT name, config FROM gateway_tribunals ORDER BY name"

_TENANTS_SQL = """
SELECT tenant_id, name, allowed_models, max_concurrent_requests, tokens_per_minute,
       model_limits::text AS model_limits, monthly_token_quota
  FROM identity_tenants WHERE enabled
"""

_KEYS_SQL = """
SELECT k.key_hash, k.key_prefix AS prefix, k.tenant_id, k.expires_at
  FROM identity_tenant_authentications k JOIN identity_tenants t USING (tenant_id)
 WHERE t.enabled AND k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now())
"""


async def read_endpoint_table(conn: Conn, unroutable_after: int) -> EndpointTable:
    """The current table with version 0 (content only)."""
    models = [
        ModelRow(
            name=r["name"],
            aliases=tuple(r["aliases"]),
            state=r["state"],
            state_reason=r["state_reason"],
            desired_instances=r["desired_instances"],
            max_model_len=r["max_model_len"],
            min_instances=r["min_instances"],
            max_instances=r["max_instances"],
            hold_s=None if r["hold_s"] is None else float(r["hold_s"]),
            autoscaled=r["autoscaled"],
        )
        for r in await conn.fetch(_MODELS_SQL)
    ]
    endpoints = [EndpointRow(**{**dict(r), "capabilities": tuple(r["capabilities"])})
                 for r in await conn.fetch(_ENDPOINTS_SQL)]
    tribunals = [TribunalRow(r["name"], r["config"]) for r in await conn.fetch(_TRIBUNALS_SQL)]
    return build_endpoint_table(models, endpoints, unroutable_after=unroutable_after, tribunals=tribunals)


async def read_key_table(conn: Conn) -> KeyTable:
    tenants = [
        TenantRow(
            tenant_id=r["tenant_id"],
            name=r["name"],
            allowed_models=tuple(r["allowed_models"]) if r["allowed_models"] is not None else None,
            max_concurrent_requests=r["max_concurrent_requests"],
            tokens_per_minute=r["tokens_per_minute"],
            model_limits=decode_model_limits(r["model_limits"]),
            monthly_token_quota=r["monthly_token_quota"],
        )
        for r in await conn.fetch(_TENANTS_SQL)
    ]
    keys = [
        KeyRow(
            key_hash=bytes(r["key_hash"]),
            prefix=r["prefix"],
            tenant_id=r["tenant_id"],
            expires_at=r["expires_at"],
        )
        for r in await conn.fetch(_KEYS_SQL)
    ]
    return build_key_table(tenants, keys)


class PrefixTakenError(Exception):
    """Another deployment (another database) publishes under this Redis prefix."""

    def __init__(self, prefix: str, owner: str, ours: str) -> None:
        self.prefix, self.owner, self.ours = prefix, owner, ours
        other_id, _, other_db = owner.partition(" ")
        super().__init__(f"Redis prefix {prefix!r} is in use by another deployment (database {other_db!r}, "
                         f"deployment {other_id}); give each deployment its own HPCGATE_REDIS_PREFIX")


async def deployment_claim(conn: Conn) -> str:
    """This database's claim on a Redis prefix: ``"<deployment id> <database name>"``."""
    return str(await conn.fetchval(DEPLOYMENT_CLAIM_SQL))


async def release_claim(redis: aioredis.Redis, names: RedisNames, claim: str) -> bool:
    """Give the prefix up at once if ``claim`` still holds it (a whole stack stopping on purpose,
    as ``hpcgate up`` does); True if it did. A daemon that merely restarts keeps its claim."""
    return bool(await redis.eval(_RELEASE, 1, names.owner, claim))


class TablePublisher:
    """Publishes both tables; remembers the last content it sent to skip no-op publishes."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: aioredis.Redis,
        names: RedisNames,
        *,
        unroutable_after: int,
        timeout_s: float = 5.0,
        claim_ttl_s: float = 60.0,
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._names = names
        self._unroutable_after = unroutable_after
        self._timeout_s = timeout_s
        self._claim_ttl_ms = max(1, int(claim_ttl_s * 1000))
        self._claim: str | None = None  # read from the database on the first publish
        self._claim_and_write = redis.register_script(_CLAIM_AND_WRITE)
        self._last_endpoints: EndpointTable | None = None
        self._last_keys: KeyTable | None = None

    def forget(self) -> None:
        """After an outage: publish the next tables even if they look unchanged."""
        self._last_endpoints = None
        self._last_keys = None

    async def publish_endpoints(self, *, force: bool = False) -> int | None:
        """Publish the endpoint table if it changed (or ``force``); returns the version or None."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _ENDPOINT_LOCK)
            table = await read_endpoint_table(conn, self._unroutable_after)
            if not force and table == self._last_endpoints:
                return None
            version = await conn.fetchval("SELECT nextval('published_table_version')")
            snapshot = msgspec.structs.replace(table, version=version, generated_at=time.time())
            await self._write(
                conn, self._names.endpoint_table, self._names.endpoint_table_channel, snapshot, version
            )
            self._last_endpoints = table
            return int(version)

    async def publish_keys(self, *, force: bool = False) -> int | None:
        async with self._pool.acquire(timeout=self._timeout_s) as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _KEY_LOCK)
            table = await read_key_table(conn)
            if not force and table == self._last_keys:
                return None
            version = await conn.fetchval("SELECT nextval('published_table_version')")
            snapshot = msgspec.structs.replace(table, version=version, generated_at=time.time())
            await self._write(conn, self._names.key_table, self._names.key_table_channel, snapshot, version)
            self._last_keys = table
            return int(version)

    async def _write(self, conn: Conn, key: str, channel: str, snapshot: EndpointTable | KeyTable,
                     version: int) -> None:
        if self._claim is None:
            self._claim = await deployment_claim(conn)
        other = await self._claim_and_write(
            keys=[self._names.owner, key],
            args=[self._claim, self._claim_ttl_ms, msgspec.json.encode(snapshot), channel, version],
        )
        if other is not None:
            raise PrefixTakenError(self._names.prefix, other.decode(errors="replace"), self._claim)
