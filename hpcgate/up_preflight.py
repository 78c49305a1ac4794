"""Checks ``hpcgate up`` makes before it starts anything: PostgreSQL (created and migrated) and
Redis reachable, with a hint by the kind of failure; one ``up`` per database (a session advisory
lock, released by the server however the holder dies); the Redis prefix not claimed by another
deployment (and, its counterpart on a clean stop, that claim given up); stale state of this data
dir cleared (:mod:`hpcgate.up_state`) and the ports free, or an :class:`UpError` saying what is
in the way.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import redis.asyncio as aioredis

from control.db.migrate import migrate
from control.publish.publisher import PrefixTakenError, deployment_claim, release_claim
from control.singleton import NAMESPACE, lock_key
from control.store.db import Conn
from hpcgate.net import port_is_free
from hpcgate.schemas import RedisNames
from hpcgate.up_state import (
    alive,
    command_line,
    end_processes,
    listening_pid,
    port_holder,
    read_record,
    serves_data_dir,
    this_process,
)


async def ensure_database(dsn: str) -> None:
    """Create the database if it does not exist, then apply the migrations."""
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except asyncpg.InvalidCatalogNameError:
        base, _, name = dsn.rpartition("/")
        name = name.split("?", 1)[0]
        admin = await asyncpg.connect(f"{base}/postgres", timeout=10)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        except asyncpg.DuplicateDatabaseError:
            pass
        finally:
            await admin.close()
        conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await migrate(conn)
    finally:
        await conn.close()


async def check_redis(url: str) -> None:
    client = aioredis.from_url(url, socket_connect_timeout=5)
    try:
        await client.ping()
    finally:
        await client.aclose()


async def release_redis_prefix(url: str, prefix: str, conn: Conn) -> None:
    """On a clean stop: free the prefix now rather than when the claim expires, so the next
    stack (another database) may use it at once. Best effort: Redis away, the claim expires."""
    client = aioredis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        await release_claim(client, RedisNames(prefix), await deployment_claim(conn))
    except (OSError, aioredis.RedisError, asyncpg.PostgresError, asyncpg.InterfaceError):
        pass
    finally:
        await client.aclose()


async def check_redis_prefix(url: str, prefix: str, conn: Conn) -> None:
    """Refuse a Redis prefix another deployment (another database) publishes under: this
    stack's tables would replace that one's (see control/publish/publisher.py)."""
    ours = await deployment_claim(conn)
    client = aioredis.from_url(url, socket_connect_timeout=5)
    try:
        raw = await client.get(RedisNames(prefix).owner)
    finally:
        await client.aclose()
    owner = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    if owner is not None and owner != ours:
        taken = PrefixTakenError(prefix, owner, ours)
        raise UpError(f"{taken}; a stopped deployment frees its prefix within a minute")


def _where(url: str) -> tuple[str, str]:
    """``user`` and ``host:port`` of a database URL, for messages (never the password)."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return parts.username or "(none)", f"{parts.hostname or 'localhost'}{port}"


def postgres_hint(url: str, exc: BaseException) -> str:
    """What failed reaching PostgreSQL and what to check, by the kind of failure."""
    user, where = _where(url)
    if isinstance(exc, (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError)):
        return (f"PostgreSQL at {where} refused authentication for user {user!r} ({exc}); check the user "
                "and password in HPCGATE_DATABASE_URL and the server's pg_hba.conf")
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return (f"PostgreSQL user {user!r} at {where} may not do this ({exc}); it needs to create the "
                "database or own it (CREATE DATABASE, CREATE TABLE)")
    if isinstance(exc, (OSError, asyncio.TimeoutError)):
        return (f"cannot reach PostgreSQL at {where} ({exc or type(exc).__name__}); is it running there? "
                "(./dev.sh up starts a local one)")
    return f"PostgreSQL at {where} as user {user!r}: {exc}"


def redis_hint(url: str, exc: BaseException) -> str:
    _, where = _where(url)
    if isinstance(exc, aioredis.AuthenticationError):
        return f"Redis at {where} refused authentication ({exc}); check the password in HPCGATE_REDIS_URL"
    if isinstance(exc, (OSError, aioredis.ConnectionError, aioredis.TimeoutError)):
        return f"cannot reach Redis at {where} ({exc}); is it running there? (./dev.sh up starts a local one)"
    return f"Redis at {where}: {exc}"


class UpError(Exception):
    """A reason not to start, said as is (what is in the way and what to do)."""


# Who holds the ``up`` lock of this database (the application name says pid and data dir).
_UP_HOLDER_SQL = """
SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid)
 WHERE l.locktype = 'advisory' AND l.classid = $1::oid AND l.objid = $2::oid AND l.granted
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


async def take_up_lock(dsn: str, data_dir: Path) -> asyncpg.Connection:
    """One ``up`` per database: a session advisory lock held while this process lives (the
    server releases it when the process dies, however). Raises UpError naming the holder."""
    name = f"hpcgate-up pid {os.getpid()} data dir {data_dir}"
    conn = await asyncpg.connect(dsn, timeout=10, server_settings={"application_name": name[:63]})
    key = lock_key("hpcgate-up")
    if await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", NAMESPACE, key):
        return conn
    holder = await conn.fetchval(_UP_HOLDER_SQL, NAMESPACE, key & 0xFFFFFFFF)
    await conn.close()
    db = urlsplit(dsn).path.lstrip("/") or "(default)"
    raise UpError(f"another hpcgate up uses database {db!r}: {holder or 'unknown session'}; stop it "
                  "first, or give this one its own database and Redis prefix (HPCGATE_DATABASE_URL, "
                  "HPCGATE_REDIS_PREFIX)")


def clear_stale(data_dir: Path, ports: list[tuple[str, int]]) -> None:
    """End what a crashed earlier run left (its recorded daemons), then check the ports."""
    record = read_record(data_dir / "run.json")
    if record is not None:
        if record.up.pid != os.getpid() and alive(record.up):
            raise UpError(f"hpcgate up (pid {record.up.pid}) is running with data dir {data_dir}; "
                          "stop it first (Ctrl-C there, or kill it)")
        ended = end_processes(record.children)
        if ended:
            print("  ended what the previous run (killed?) left running: "
                  + ", ".join(f"{p.name} (pid {p.pid})" for p in ended), flush=True)
    for host, port in ports:
        pid = listening_pid(port)
        if pid and serves_data_dir(pid, data_dir):  # an orphaned daemon of an earlier run here
            proc = this_process("daemon", pid)
            print(f"  ending pid {pid} ({command_line(pid)[:120]}), left on port {port} by an earlier run "
                  "with this data dir", flush=True)
            end_processes([proc])
        if not port_is_free(host, port):
            holder = port_holder(port) or "another process"
            raise UpError(f"{host}:{port} is in use by {holder}; stop it or choose another port "
                          "(--gateway-port, --api-port)")
