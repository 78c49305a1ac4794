"""The PostgreSQL pool of a control daemon, and what its errors mean to a caller.

Invariants: a query never waits longer than ``timeout_s``; a lost server surfaces as
:class:`StoreUnavailableError` (the API answers 503, daemons back off), logged once when the outage
starts and once when it ends; constraint and data errors surface as :class:`ConflictError` or
:class:`InvalidError` (the API answers 409 or 422), never as an internal error. The pool
reconnects by itself: asyncpg replaces a closed connection on the next acquire.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from hpcgate.logs import get_logger

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


class InvalidError(Exception):
    """The database rejected a value (check constraint, range, encoding) (HTTP 422)."""


class NotFoundError(Exception):
    """The named object does not exist (HTTP 404)."""


def found(row: asyncpg.Record | None, what: str) -> asyncpg.Record:
    """``row``, or NotFoundError naming ``what``."""
    if row is None:
        raise NotFoundError(f"no {what}")
    return row


class OutageLog:
    """Logs "down" once per outage and "recovered" once when it ends."""

    __slots__ = ("_down", "_what")

    def __init__(self, what: str) -> None:
        self._what = what
        self._down = False

    def failed(self, exc: BaseException) -> None:
        if not self._down:
            self._down = True
            log.warning("dependency_unavailable", dependency=self._what, error=repr(exc))

    def ok(self) -> None:
        if self._down:
            self._down = False
            log.info("dependency_recovered", dependency=self._what)

    @property
    def down(self) -> bool:
        return self._down


def classify(exc: BaseException) -> Exception | None:
    """The store exception an asyncpg error stands for, or None if it is a bug."""
    if isinstance(
        exc, (asyncpg.UniqueViolationError, asyncpg.ForeignKeyViolationError, asyncpg.ExclusionViolationError)
    ):
        return ConflictError(_detail(exc))
    if isinstance(exc, (asyncpg.CheckViolationError, asyncpg.NotNullViolationError, asyncpg.DataError)):
        return InvalidError(_detail(exc))
    if isinstance(exc, OUTAGE_ERRORS):
        return StoreUnavailableError(f"database unavailable: {type(exc).__name__}")
    return None


def _detail(exc: BaseException) -> str:
    detail = getattr(exc, "detail", None)
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{message}: {detail}" if detail else message


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
            else:
                self._outage.ok()
            raise mapped from exc
        else:
            self._outage.ok()
