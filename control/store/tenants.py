"""Tenants and their API keys (admin API).

Invariants: a key is stored only as ``hash_api_key(key_hash_secret, key)`` and its visible
prefix; the plaintext leaves this module once, in :class:`KeyCreated`. Changes here fire the
``hpcgate_key_table`` NOTIFY (migration 0500), so the Endpoint Worker republishes the key
table right after the commit.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec
from msgspec import UNSET

from control.store.db import ConflictError, Database, InvalidError, NotFoundError, found, restated
from control.wire import (
    ApiKey,
    KeyCreate,
    KeyCreated,
    KeyQuery,
    KeyUpdate,
    ModelLimitSpec,
    Tenant,
    TenantCreate,
    TenantUpdate,
)
from hpcgate.schemas import hash_api_key, key_prefix, new_api_key

_TENANT_SELECT = """
SELECT t.tenant_id, t.name, t.enabled, t.allowed_models, t.max_concurrent_requests, t.tokens_per_minute,
       t.model_limits::text AS model_limits, t.monthly_token_quota, t.created_at, t.updated_at,
       (SELECT count(*) FROM identity_tenant_authentications k
         WHERE k.tenant_id = t.tenant_id AND k.revoked_at IS NULL
           AND (k.expires_at IS NULL OR k.expires_at > now()))::int AS active_keys
  FROM identity_tenants t
"""

_KEY_SELECT = """
SELECT k.authentication_id AS key_id, t.name AS tenant, k.key_prefix AS prefix, k.description,
       k.created_at, k.expires_at, k.revoked_at,
       (k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now())) AS active
  FROM identity_tenant_authentications k JOIN identity_tenants t USING (tenant_id)
"""


_decode_limits = msgspec.json.Decoder(dict[str, ModelLimitSpec]).decode
_encode = msgspec.json.Encoder().encode


def _tenant(row: asyncpg.Record) -> Tenant:
    fields = dict(row)
    fields["model_limits"] = _decode_limits(fields["model_limits"])
    return Tenant(**fields)


def _key(row: asyncpg.Record) -> ApiKey:
    return ApiKey(**dict(row))


async def create_tenant(db: Database, req: TenantCreate) -> Tenant:
    try:
        async with db.transaction() as conn:
            tenant_id = await conn.fetchval(
                """INSERT INTO identity_tenants (name, enabled, allowed_models, max_concurrent_requests,
                                                 tokens_per_minute, model_limits, monthly_token_quota)
                   VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7) RETURNING tenant_id""",
                req.name,
                req.enabled,
                req.allowed_models,
                req.max_concurrent_requests,
                req.tokens_per_minute,
                _encode(req.model_limits).decode(),
                req.monthly_token_quota,
            )
            row = await conn.fetchrow(_TENANT_SELECT + " WHERE t.tenant_id = $1", tenant_id)
    except ConflictError as exc:
        raise restated(exc, "identity_tenants_name_key", f"tenant {req.name!r} already exists") from None
    return _tenant(found(row, "row"))


async def list_tenants(db: Database) -> list[Tenant]:
    async with db.transaction() as conn:
        return [_tenant(r) for r in await conn.fetch(_TENANT_SELECT + " ORDER BY t.name")]


async def get_tenant(db: Database, name: str) -> Tenant:
    async with db.transaction() as conn:
        row = await conn.fetchrow(_TENANT_SELECT + " WHERE t.name = $1", name)
    if row is None:
        raise NotFoundError(f"no tenant {name!r}")
    return _tenant(row)


async def update_tenant(db: Database, name: str, req: TenantUpdate) -> Tenant:
    changes = {
        field: value
        for field in ("enabled", "allowed_models", "max_concurrent_requests", "tokens_per_minute",
                      "monthly_token_quota")
        if (value := getattr(req, field)) is not UNSET
    }
    if req.model_limits is not UNSET:
        changes["model_limits"] = _encode(req.model_limits).decode()
    async with db.transaction() as conn:
        if changes:
            sets = ", ".join(f"{field} = ${i}{'::jsonb' if field == 'model_limits' else ''}"
                             for i, field in enumerate(changes, start=2))
            done = await conn.fetchval(
                f"UPDATE identity_tenants SET {sets}, updated_at = now() WHERE name = $1 RETURNING tenant_id",
                name,
                *changes.values(),
            )
            if done is None:
                raise NotFoundError(f"no tenant {name!r}")
        row = await conn.fetchrow(_TENANT_SELECT + " WHERE t.name = $1", name)
    if row is None:
        raise NotFoundError(f"no tenant {name!r}")
    return _tenant(row)


async def delete_tenant(db: Database, name: str) -> Tenant:
    """Delete a tenant without active keys, with its revoked and expired keys and its usage records.

    A tenant with an active key is refused (409): deleting it would cut off its users silently,
    so the keys are revoked (or the tenant disabled) first, deliberately."""
    async with db.transaction() as conn:
        row = await conn.fetchrow(_TENANT_SELECT + " WHERE t.name = $1 FOR UPDATE OF t", name)
        tenant = _tenant(found(row, f"tenant {name!r}"))
        if tenant.active_keys:
            raise ConflictError(f"tenant {name!r} still has {tenant.active_keys} active key(s); revoke them "
                                "first (hpcgate admin key list --tenant NAME)")
        await conn.execute("DELETE FROM identity_tenants WHERE tenant_id = $1", tenant.tenant_id)
    return tenant


def _check_future(expires_at: datetime) -> None:
    if expires_at <= datetime.now(UTC):
        raise InvalidError(f"expiry must be in the future, not {expires_at.isoformat()} "
                           "(to stop a key now, revoke it)")


async def create_key(db: Database, secret: bytes, tenant: str, req: KeyCreate) -> KeyCreated:
    if req.expires_at is not None and req.expires_in_s is not None:
        raise InvalidError("give expires_at or expires_in_s, not both")
    expires_at = req.expires_at
    if req.expires_in_s is not None:
        expires_at = datetime.now(UTC) + timedelta(seconds=req.expires_in_s)
    if expires_at is not None:
        _check_future(expires_at)
    key = new_api_key()
    async with db.transaction() as conn:
        tenant_id = await conn.fetchval("SELECT tenant_id FROM identity_tenants WHERE name = $1", tenant)
        if tenant_id is None:
            raise NotFoundError(f"no tenant {tenant!r}")
        key_id = await conn.fetchval(
            """INSERT INTO identity_tenant_authentications (tenant_id, key_prefix, key_hash, description,
                                                            expires_at)
               VALUES ($1, $2, $3, $4, $5) RETURNING authentication_id""",
            tenant_id,
            key_prefix(key),
            hash_api_key(secret, key),
            req.description,
            expires_at,
        )
        row = await conn.fetchrow(_KEY_SELECT + " WHERE k.authentication_id = $1", key_id)
    return KeyCreated(key=key, api_key=_key(found(row, "row")))


async def list_keys(db: Database, query: KeyQuery) -> list[ApiKey]:
    async with db.transaction() as conn:
        rows = await conn.fetch(
            _KEY_SELECT
            + """ WHERE ($1::text IS NULL
                         OR k.key_prefix LIKE replace(replace($1, '_', '\\_'), '%', '\\%') || '%')
                    AND ($2::text IS NULL OR t.name = $2)
                    AND ($3 OR (k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now())))
                  ORDER BY k.authentication_id""",
            query.prefix,
            query.tenant,
            query.all,
        )
    return [_key(r) for r in rows]


async def revoke_key(db: Database, key_id: int) -> ApiKey:
    """Idempotent: revoking a revoked key keeps its first revocation time."""
    async with db.transaction() as conn:
        done = await conn.fetchval(
            """UPDATE identity_tenant_authentications SET revoked_at = coalesce(revoked_at, now())
                WHERE authentication_id = $1 RETURNING authentication_id""",
            key_id,
        )
        if done is None:
            raise NotFoundError(f"no API key {key_id}")
        row = await conn.fetchrow(_KEY_SELECT + " WHERE k.authentication_id = $1", key_id)
    return _key(found(row, "row"))


async def update_key(db: Database, key_id: int, req: KeyUpdate) -> ApiKey:
    async with db.transaction() as conn:
        row = await conn.fetchrow(
            """SELECT description, expires_at FROM identity_tenant_authentications
                WHERE authentication_id = $1""",
            key_id,
        )
        if row is None:
            raise NotFoundError(f"no API key {key_id}")
        description = row["description"] if req.description is UNSET else req.description
        expires_at = row["expires_at"] if req.expires_at is UNSET else req.expires_at
        if req.expires_at is not UNSET and req.expires_at is not None:
            _check_future(req.expires_at)
        await conn.execute(
            "UPDATE identity_tenant_authentications SET description = $2, expires_at = $3"
            " WHERE authentication_id = $1",
            key_id,
            description,
            expires_at,
        )
        row = await conn.fetchrow(_KEY_SELECT + " WHERE k.authentication_id = $1", key_id)
    return _key(found(row, "row"))
