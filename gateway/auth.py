"""API-key authentication against an in-memory key index (no database call per request).

The presented key is hashed with the deployment's secret (HMAC-SHA256) and looked up in a dict
of hashes, so no secret is ever compared in Python code. The index is an immutable snapshot
built off the hot path from a :class:`KeyTable` (published by the control plane, or loaded from
PostgreSQL) and swapped by replacing one reference. Keys are never logged.
"""

from __future__ import annotations

import time

from gateway.errors import ApiError
from hpcgate.schemas import KeyTable, ModelLimit, hash_api_key


class Principal:
    __slots__ = ("allowed", "expires_at", "limited", "max_concurrent", "model_limits", "monthly_quota",
                 "name", "tenant_id", "tpm")

    def __init__(self, tenant_id: int, name: str, allowed: frozenset[str] | None, *,
                 max_concurrent: int | None, tpm: int | None, expires_at: float | None,
                 model_limits: dict[str, ModelLimit] | None = None, monthly_quota: int | None = None) -> None:
        self.tenant_id = tenant_id  # 0: anonymous (--no-auth)
        self.name = name
        self.allowed = allowed  # None: every model
        self.max_concurrent = max_concurrent
        self.tpm = tpm
        self.expires_at = expires_at
        self.model_limits = model_limits or {}  # canonical model name -> limits on top of the tenant's
        self.monthly_quota = monthly_quota
        self.limited = (max_concurrent is not None or tpm is not None or bool(self.model_limits)
                        or monthly_quota is not None)

    def may_use(self, *names: str) -> bool:
        allowed = self.allowed
        return allowed is None or any(n in allowed for n in names)


ANONYMOUS = Principal(0, "anonymous", None, max_concurrent=None, tpm=None, expires_at=None)


class KeyIndex:
    __slots__ = ("_by_hash", "generated_at", "version")

    def __init__(self, version: int, generated_at: float, by_hash: dict[bytes, Principal]) -> None:
        self.version = version
        self.generated_at = generated_at
        self._by_hash = by_hash

    def get(self, key_hash: bytes) -> Principal | None:
        return self._by_hash.get(key_hash)

    def __len__(self) -> int:
        return len(self._by_hash)


EMPTY_KEYS = KeyIndex(-1, 0.0, {})


def index_from_key_table(table: KeyTable) -> KeyIndex:
    tenants = {t.tenant_id: t for t in table.tenants if t.enabled}
    by_hash: dict[bytes, Principal] = {}
    for key in table.keys:
        tenant = tenants.get(key.tenant_id)
        if tenant is None:
            continue
        try:
            digest = bytes.fromhex(key.key_hash)
        except ValueError:
            continue
        allowed = frozenset(tenant.allowed_models) if tenant.allowed_models is not None else None
        by_hash[digest] = Principal(tenant.tenant_id, tenant.name, allowed,
                                    max_concurrent=tenant.max_concurrent_requests,
                                    tpm=tenant.tokens_per_minute, expires_at=key.expires_at,
                                    model_limits=tenant.model_limits,
                                    monthly_quota=tenant.monthly_token_quota)
    return KeyIndex(table.version, table.generated_at, by_hash)


class Authenticator:
    __slots__ = ("enabled", "held_from_db", "index", "secret")

    def __init__(self, secret: bytes | None, enabled: bool) -> None:
        self.secret = secret or b""
        self.enabled = enabled
        self.index = EMPTY_KEYS
        self.held_from_db = False

    def offer(self, index: KeyIndex, from_db: bool) -> bool:
        """Install ``index`` if it is newer than the one held.

        A PostgreSQL load is as new as the sequence value it read, so it also replaces an equal
        version; a Redis snapshot of the same version replaces one read from PostgreSQL (it may
        carry a change committed after that read took the sequence value).
        """
        held = self.index.version
        if index.version > held or (index.version == held and (from_db or self.held_from_db)):
            self.index = index
            self.held_from_db = from_db
            return True
        return False

    def authenticate(self, header: bytes | None) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        if header is None:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", "missing_api_key")
        scheme, _, key = header.partition(b" ")
        key = key.strip()
        if scheme.lower() != b"bearer" or not key:
            raise ApiError(401, "malformed Authorization header: expected 'Bearer <key>'", "invalid_api_key")
        principal = self.index.get(hash_api_key(self.secret, key))
        if principal is None:
            raise ApiError(401, "invalid or revoked API key", "invalid_api_key")
        if principal.expires_at is not None and principal.expires_at <= time.time():
            raise ApiError(401, "API key expired", "expired_api_key")
        return principal
