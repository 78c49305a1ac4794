"""The PostgreSQL pool of a control daemon, and what its errors mean to a caller.

Invariants: a query never waits longer than ``timeout_s``; a lost server surfaces as
:class:`StoreUnavailableError` (the API answers 503, daemons back off), logged once when the outage
starts and once when it ends; constraint and data errors surface as :class:`ConflictError` or
:class:`InvalidError` (the API answers 409 or 422), never as an internal error. The pool
reconnects by itself: asyncpg replaces a closed connection on the next acquire.

The message of a mapped error is plain and ours (:data:`CONSTRAINT_MESSAGES`, or a generic one
per kind): PostgreSQL's own text quotes the failing row, a key's hash included, so none of it
reaches an answer or a log. ``constraint`` keeps the name, so a store function can restate the
error with the values it knows (``tenant 'physics' already exists``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from hpcgate.logs import EventLogger, get_logger

log = get_logger("hpcgate.control.store")

# A connection as the store functions see it: plain, or lent by a pool.
Conn: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"

# Errors that mean "the database is not reachable right now", not "the request is wrong".
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.InterfaceError,
    asyncpg.ConnectionDoesNotExistError,
)


class StoreUnavailableError(Exception):
    """PostgreSQL cannot be reached; retry later."""


class ConflictError(Exception):
    """A uniqueness or reference constraint rejected the change (HTTP 409)."""

    def __init__(self, message: str, constraint: str | None = None) -> None:
        super().__init__(message)
        self.constraint = constraint


class InvalidError(Exception):
    """The database rejected a value (check constraint, range, encoding) (HTTP 422)."""

    def __init__(self, message: str, constraint: str | None = None) -> None:
        super().__init__(message)
        self.constraint = constraint


# What each constraint of the schema means to the person whose change it refused. The store
# checks most of these before writing; the constraints are the backstop for races and bugs.
CONSTRAINT_MESSAGES: dict[str, str] = {
    "identity_tenants_name_key": "a tenant with this name already exists",
    "identity_tenants_name_check": "a tenant name is lower-case letters, digits, '_', '.', '-' (max 63)",
    "identity_tenants_max_concurrent_requests_check": "max_concurrent_requests must be at least 1",
    "identity_tenants_tokens_per_minute_check": "tokens_per_minute must be at least 1",
    "identity_tenants_monthly_token_quota_check": "monthly_token_quota must be at least 1",
    "identity_tenants_model_limits_check": "model_limits must be an object",
    "identity_tenant_authentications_check": "a key's expiry must be after its creation",
    "identity_tenant_authentications_key_hash_key": "key collision; create the key again",
    "identity_tenant_authentications_tenant_id_fkey": "the tenant no longer exists",
    "ai_model_configurations_name_key": "a model with this name already exists",
    "ai_model_configurations_name_check":
        "a model name is letters, digits, '_', '.', '/', ':', '-' (max 128)",
    "ai_model_configurations_check": "max_instances must be >= min_instances",
    "ai_model_configurations_check1": "desired_instances must be between min_instances and max_instances",
    "ai_model_configurations_min_instances_check": "min_instances must be >= 0",
    "ai_model_configurations_startup_timeout_s_check": "startup_timeout_s must be at least 1",
    "ai_model_configurations_max_model_len_check": "max_model_len must be at least 1",
    "ai_model_aliases_pkey": "an alias is already used by another model",
    "ai_model_aliases_alias_check": "an alias is letters, digits, '_', '.', '/', ':', '-' (max 128)",
    "ai_model_aliases_model_id_fkey": "the model no longer exists",
    "ai_model_endpoint_jobs_model_id_fkey": "the model has jobs",
    "ai_model_endpoints_model_id_fkey": "the model has endpoints",
    "ai_model_endpoints_node_port_key": "the port is taken on that node",
    "ai_model_endpoints_endpoint_job_id_key": "the job has already registered an endpoint",
    "ai_model_endpoint_jobs_launcher_launcher_job_id_key": "another job has that launcher job id",
    "usage_records_tenant_id_fkey": "the tenant no longer exists",
}
_GENERIC = {
    asyncpg.UniqueViolationError: "conflicts with an existing entry",
    asyncpg.ForeignKeyViolationError: "refers to something that does not exist, or is still referred to",
    asyncpg.ExclusionViolationError: "conflicts with an existing entry",
    asyncpg.CheckViolationError: "a value is out of its allowed range",
    asyncpg.NotNullViolationError: "a required value is missing",
}


class NotFoundError(Exception):
    """The named object does not exist (HTTP 404)."""


def restated(exc: ConflictError | InvalidError, constraint: str,
             message: str) -> ConflictError | InvalidError:
    """``exc`` in the caller's words (naming the values) when ``constraint`` refused the change."""
    if exc.constraint != constraint:
        return exc
    return type(exc)(message, constraint)


def found(row: asyncpg.Record | None, what: str) -> asyncpg.Record:
    """``row``, or NotFoundError naming ``what``."""
    if row is None:
        raise NotFoundError(f"no {what}")
    return row


class OutageLog:
    """Logs "down" once per outage and "recovered" once when it ends (on ``logger``, default
    this module's: a daemon passes its own, so its outages are found under its name)."""

    __slots__ = ("_down", "_log", "_what")

    def __init__(self, what: str, logger: EventLogger | None = None) -> None:
        self._what = what
        self._down = False
        self._log = logger or log

    def failed(self, exc: BaseException) -> None:
        if not self._down:
            self._down = True
            self._log.warning("dependency_unavailable", dependency=self._what, error=repr(exc)[:300])

    def ok(self) -> None:
        if self._down:
            self._down = False
            self._log.info("dependency_recovered", dependency=self._what)

    @property
    def down(self) -> bool:
        return self._down


def classify(exc: BaseException) -> Exception | None:
    """The store exception an asyncpg error stands for, or None if it is a bug."""
    constraint = getattr(exc, "constraint_name", None)
    if isinstance(
        exc, (asyncpg.UniqueViolationError, asyncpg.ForeignKeyViolationError, asyncpg.ExclusionViolationError)
    ):
        return ConflictError(plain_message(exc), constraint)
    if isinstance(exc, (asyncpg.CheckViolationError, asyncpg.NotNullViolationError, asyncpg.DataError)):
        return InvalidError(plain_message(exc), constraint)
    if isinstance(exc, OUTAGE_ERRORS):
        return StoreUnavailableError(f"database unavailable: {type(exc).__name__}")
    return None


def plain_message(exc: BaseException) -> str:
    """Our words for a constraint or data error; never PostgreSQL's text (it quotes rows)."""
    constraint = getattr(exc, "constraint_name", None)
    if constraint in CONSTRAINT_MESSAGES:
        return CONSTRAINT_MESSAGES[constraint]
    for kind, message in _GENERIC.items():
        if isinstance(exc, kind):
            return message
    return "a value cannot be stored (out of range or malformed)"


class Database:
    """An asyncpg pool with a per-query timeout and error classification."""

    def __init__(self, dsn: str, *, max_size: int = 8, timeout_s: float = 5.0) -> None:
        self._dsn = dsn
        self._max_size = max_size
        self.timeout_s = timeout_s
        self._pool: asyncpg.Pool | None = None
        self._outage = OutageLog("postgresql")

    async def open(self) -> None:
        # min_size=0: opening succeeds while PostgreSQL is down; connections come on demand.
        self._pool = await asyncpg.create_pool(
            self._dsn,
            min_size=0,
            max_size=self._max_size,
            command_timeout=self.timeout_s,
            timeout=self.timeout_s,
            max_inactive_connection_lifetime=60.0,
        )

    async def close(self) -> None:
        if self._pool is not None:
            await asyncio.wait_for(self._pool.close(), timeout=self.timeout_s)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        """A connection inside a transaction; asyncpg errors come out classified."""
        if self._pool is None:
            raise RuntimeError("Database.open() was not called")
        try:
            async with self._pool.acquire(timeout=self.timeout_s) as conn, conn.transaction():
                yield conn
        except (ConflictError, InvalidError, NotFoundError):
            self._outage.ok()
            raise
        except Exception as exc:
            mapped = classify(exc)
            if mapped is None:
                raise
            if isinstance(mapped, StoreUnavailableError):
                self._outage.failed(exc)
                raise mapped from exc
            self._outage.ok()
            raise mapped from None  # PostgreSQL's text quotes the row: keep it out of every log
        else:
            self._outage.ok()
