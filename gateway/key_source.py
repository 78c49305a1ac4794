"""Loads the key table straight from PostgreSQL: at start and as the periodic full resync.

Read-only, in one REPEATABLE READ transaction: the tenants that are enabled and their keys that
are neither revoked nor expired, plus the current value of the version sequence. That version
lets a snapshot published to Redis afterwards (a higher version) supersede this one. If
PostgreSQL is unreachable the caller keeps the keys it has. The same read gives the
deployment's claim on its Redis prefix, against which the worker checks the tables it reads
from Redis.
"""

from __future__ import annotations

import time

import asyncpg

from hpcgate.schemas import DEPLOYMENT_CLAIM_SQL, ApiKeyEntry, KeyTable, TenantEntry, decode_model_limits

_HAS_CLAIM = "SELECT to_regclass('deployment_identity') IS NOT NULL"
_VERSION = "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM published_table_version"
_TENANTS = """
SELECT tenant_id, name, allowed_models, max_concurrent_requests, tokens_per_minute,
       model_limits::text AS model_limits, monthly_token_quota
FROM identity_tenants WHERE enabled
"""
_KEYS = """
SELECT a.key_hash, a.key_prefix, a.tenant_id, extract(epoch FROM a.expires_at)::float8 AS expires_at
FROM identity_tenant_authentications a JOIN identity_tenants t USING (tenant_id)
WHERE t.enabled AND a.revoked_at IS NULL AND (a.expires_at IS NULL OR a.expires_at > now())
"""


async def load_key_table(dsn: str, timeout: float = 5.0) -> tuple[KeyTable, str | None]:
    """The key table, and this deployment's claim on its Redis prefix (None on a schema before
    migration 1200): the tables a gateway installs from Redis must carry that claim."""
    conn = await asyncpg.connect(dsn, timeout=timeout)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            version = await conn.fetchval(_VERSION, timeout=timeout)
            tenants = await conn.fetch(_TENANTS, timeout=timeout)
            keys = await conn.fetch(_KEYS, timeout=timeout)
            claim = (await conn.fetchval(DEPLOYMENT_CLAIM_SQL, timeout=timeout)
                     if await conn.fetchval(_HAS_CLAIM, timeout=timeout) else None)
    finally:
        await conn.close(timeout=timeout)
    return KeyTable(
        version=int(version),
        generated_at=time.time(),
        tenants=tuple(
            TenantEntry(
                tenant_id=r["tenant_id"], name=r["name"], enabled=True,
                allowed_models=tuple(r["allowed_models"]) if r["allowed_models"] is not None else None,
                max_concurrent_requests=r["max_concurrent_requests"],
                tokens_per_minute=r["tokens_per_minute"],
                model_limits=decode_model_limits(r["model_limits"]),
                monthly_token_quota=r["monthly_token_quota"],
            )
            for r in tenants
        ),
        keys=tuple(
            ApiKeyEntry(key_hash=bytes(r["key_hash"]).hex(), prefix=r["key_prefix"], tenant_id=r["tenant_id"],
                        expires_at=r["expires_at"])
            for r in keys
        ),
    ), None if claim is None else str(claim)


# This calendar month's tokens (UTC) of every tenant that has a monthly quota.
_MONTH_USAGE = """
SELECT u.tenant_id, sum(u.prompt_tokens + u.completion_tokens)::bigint AS used
FROM usage_records u JOIN identity_tenants t USING (tenant_id)
WHERE t.monthly_token_quota IS NOT NULL
  AND u.bucket_start >= date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
GROUP BY u.tenant_id
"""


async def load_month_usage(dsn: str, timeout: float = 5.0) -> dict[int, int]:
    """Tokens used this month per tenant with a quota (what the gateways have flushed)."""
    conn = await asyncpg.connect(dsn, timeout=timeout)
    try:
        rows = await conn.fetch(_MONTH_USAGE, timeout=timeout)
    finally:
        await conn.close(timeout=timeout)
    return {int(r["tenant_id"]): int(r["used"]) for r in rows}
