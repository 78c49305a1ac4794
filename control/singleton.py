"""One active replica per singleton daemon, elected with a PostgreSQL session advisory lock.

The Job Worker (``hpcgate control jobs``), the Endpoint Worker (``hpcgate control health``) and
any later singleton (the autoscaler) wrap their body in :meth:`SingletonLock.run`, so a second
replica (a rolling update, a mistaken ``replicas: 2``, ``hpcgate up`` started twice) stands by
instead of submitting Slurm jobs or publishing tables a second time.

Protocol, per daemon name:

- **standby**: a dedicated connection (never a pooled one: the lock belongs to its session)
  polls ``pg_try_advisory_lock(NAMESPACE, key(name))`` every ``poll_s``.
- **active**: that session holds the lock and the body runs. Every ``poll_s`` the session is
  checked (``SELECT 1``, bounded by ``check_timeout_s``). A failed check means the lock may be
  gone: the body is *cancelled* at once (not asked to finish its pass: a daemon's work is
  idempotent and safe to interrupt anywhere, the same as a ``kill -9``), the connection is
  dropped, and the process goes back to standby.
- **kill -9 of the active replica**: the kernel closes its socket, PostgreSQL ends the session
  and releases the lock; a standby takes over within ``poll_s`` (plus its own start-up).
- **a partitioned active replica**: it stops acting within ``poll_s + check_timeout_s``; the
  server releases the lock only when TCP keepalive gives up on the session
  (``tcp_keepalives_idle`` + ``count`` x ``interval`` = 11 s, set on the session here), so the
  old holder has stopped before a standby can start, as long as ``poll_s + check_timeout_s``
  stays under 5 s (enforced by the constructor).

Invariants: the body runs only while this process's session holds the lock, up to one check
interval after a silent loss; each state change is logged once as ``singleton_state`` with
``old``, ``new`` and a ``reason``. Advisory locks are per database, so two installations on one
PostgreSQL server with separate databases do not exclude each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import zlib
from collections.abc import Callable, Coroutine
from typing import Literal

import asyncpg

from hpcgate.backoff import Backoff
from hpcgate.logs import get_logger

log = get_logger("hpcgate.control.singleton")

NAMESPACE = 0x68706762  # "hpgb": the first key of every hpcgate advisory lock
KEEPALIVE = {"tcp_keepalives_idle": "5", "tcp_keepalives_interval": "2", "tcp_keepalives_count": "3"}
_SERVER_RELEASE_MIN_S = 5.0  # tcp_keepalives_idle: the earliest a silent session is dropped
_ERRORS: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
)

# Who holds the lock, for the standby's log line (the two int4 keys are stored as oids).
_HOLDER_SQL = """
SELECT a.application_name || ' pid ' || l.pid || ' from ' || COALESCE(host(a.client_addr), 'local')
  FROM pg_locks l JOIN pg_stat_activity a USING (pid)
 WHERE l.locktype = 'advisory' AND l.classid = $1::oid AND l.objid = $2::oid AND l.granted
"""

State = Literal["starting", "standby", "active", "stopped"]
Body = Callable[[asyncio.Event], Coroutine[object, object, None]]


def lock_key(name: str) -> int:
    """The second lock key of daemon ``name``: a stable signed 32-bit hash."""
    value = zlib.crc32(name.encode())
    return value - (1 << 32) if value >= 1 << 31 else value


class SingletonLock:
    """Runs a body only while this process holds the advisory lock of ``name``."""

    def __init__(self, dsn: str, name: str, *, poll_s: float = 1.0, check_timeout_s: float = 2.0) -> None:
        if poll_s + check_timeout_s >= _SERVER_RELEASE_MIN_S:
            raise ValueError("poll_s + check_timeout_s must stay under the server's keepalive release (5 s)")
        self._dsn = dsn
        self.name = name
        self.key = lock_key(name)
        self._poll_s = poll_s
        self._check_timeout_s = check_timeout_s
        self.state: State = "starting"

    def _move(self, new: State, reason: str, **fields: object) -> None:
        if new != self.state:
            log.info("singleton_state", singleton=self.name, old=self.state, new=new, reason=reason,
                     pid=os.getpid(), **fields)
            self.state = new

    async def run(self, body: Body, stop: asyncio.Event) -> None:
        """Stand by and run ``body(body_stop)`` whenever the lock is ours, until ``stop``.

        ``body_stop`` is set when ``stop`` is; on a lost lock the body is cancelled instead.
        """
        backoff = Backoff(base_s=self._poll_s, cap_s=max(self._poll_s, 5.0))
        try:
            while not stop.is_set():
                conn: asyncpg.Connection | None = None
                try:
                    conn = await asyncpg.connect(
                        self._dsn, timeout=self._check_timeout_s,
                        server_settings={**KEEPALIVE, "application_name": f"hpcgate-{self.name}"})
                    if await self._acquire(conn, stop):
                        backoff.reset()
                        await self._run_active(conn, body, stop)
                except _ERRORS as exc:
                    self._move("standby", "database unavailable", error=repr(exc)[:300])
                finally:
                    if conn is not None:
                        conn.terminate()  # releases the lock if the session still held it
                if not stop.is_set():
                    await _wait(stop, backoff.next_delay())
        finally:
            self._move("stopped", "stop requested")

    async def _acquire(self, conn: asyncpg.Connection, stop: asyncio.Event) -> bool:
        """Poll until the lock is ours (True) or ``stop`` is set (False)."""
        while not stop.is_set():
            if await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", NAMESPACE, self.key,
                                   timeout=self._check_timeout_s):
                return True
            if self.state != "standby":
                holder = await conn.fetchval(_HOLDER_SQL, NAMESPACE, self.key & 0xFFFFFFFF,
                                             timeout=self._check_timeout_s)
                self._move("standby", "lock held by another replica", holder=holder)
            await _wait(stop, self._poll_s)
        return False

    async def _run_active(self, conn: asyncpg.Connection, body: Body, stop: asyncio.Event) -> None:
        self._move("active", "lock acquired")
        body_stop = asyncio.Event()
        task = asyncio.create_task(body(body_stop), name=f"singleton-{self.name}")
        try:
            while not task.done():
                if stop.is_set():
                    body_stop.set()
                    await asyncio.wait({task})
                    break
                await asyncio.wait({task}, timeout=self._poll_s)
                if not task.done():
                    await conn.fetchval("SELECT 1", timeout=self._check_timeout_s)
        except _ERRORS as exc:
            # The session may be gone and a standby may take over: stop acting now.
            self._move("standby", "lock connection lost", error=repr(exc)[:300])
            raise
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        task.result()  # a failed body fails the daemon (its supervisor restarts it)
        stop.set()  # a body that returned has ended the daemon


async def _wait(event: asyncio.Event, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)
