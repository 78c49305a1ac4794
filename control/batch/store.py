"""PostgreSQL side of the Files and Batch APIs: rows of ``batch_files`` and ``batches`` for one
tenant at a time, turned into OpenAI's objects.

Invariants: every query is scoped by ``tenant_id`` (another tenant's id is "not found", so ids
do not leak); lists are newest first, paged by the ``seq`` column of the row named by ``after``;
a batch is created only for an input file of the same tenant with purpose ``batch``.
"""

from __future__ import annotations

import secrets
from datetime import datetime

import asyncpg
import orjson

from control.batch.wire import (
    BatchError,
    BatchErrors,
    BatchList,
    BatchObject,
    BatchUsage,
    FileList,
    FileObject,
    RequestCounts,
)
from control.store.db import Conn


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def _ts(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


def file_object(row: asyncpg.Record) -> FileObject:
    return FileObject(
        id=row["file_id"],
        bytes=row["bytes"],
        created_at=int(row["created_at"].timestamp()),
        filename=row["filename"],
        purpose=row["purpose"],
        expires_at=_ts(row["expires_at"]),
    )


def batch_object(row: asyncpg.Record) -> BatchObject:
    errors = None
    if row["errors"] is not None:
        errors = BatchErrors(data=[BatchError(**e) for e in orjson.loads(row["errors"])])
    prompt, completion = row["prompt_tokens"], row["completion_tokens"]
    return BatchObject(
        id=row["batch_id"],
        endpoint=row["endpoint"],
        input_file_id=row["input_file_id"],
        completion_window=row["completion_window"],
        status=row["status"],
        created_at=int(row["created_at"].timestamp()),
        expires_at=int(row["expires_at"].timestamp()),
        request_counts=RequestCounts(total=row["total"], completed=row["completed"], failed=row["failed"]),
        errors=errors,
        output_file_id=row["output_file_id"],
        error_file_id=row["error_file_id"],
        in_progress_at=_ts(row["in_progress_at"]),
        finalizing_at=_ts(row["finalizing_at"]),
        completed_at=_ts(row["completed_at"]),
        failed_at=_ts(row["failed_at"]),
        expired_at=_ts(row["expired_at"]),
        cancelling_at=_ts(row["cancelling_at"]),
        cancelled_at=_ts(row["cancelled_at"]),
        metadata=orjson.loads(row["metadata"]) if row["metadata"] is not None else None,
        usage=BatchUsage(input_tokens=prompt, output_tokens=completion, total_tokens=prompt + completion),
    )


# -- files ---------------------------------------------------------------------------------------
# Advisory lock classes: with a tenant's id, they serialise one tenant's checks of a limit.
BATCH_CREATE_LOCK, FILE_QUOTA_LOCK = 8000, 8001


async def lock_tenant(conn: Conn, lock_class: int, tenant_id: int) -> None:
    """Hold (``lock_class``, tenant) until the transaction ends: that tenant's limit checks of
    this class run one at a time, so a limit holds under concurrent requests."""
    await conn.execute("SELECT pg_advisory_xact_lock($1, $2::int)", lock_class, tenant_id % 2**31)


async def stored_bytes(conn: Conn, tenant_id: int) -> int:
    total = await conn.fetchval(
        "SELECT coalesce(sum(bytes), 0) FROM batch_files WHERE tenant_id = $1 AND NOT deleted", tenant_id
    )
    return int(total)


async def insert_file(
    conn: Conn, *, file_id: str, tenant_id: int, purpose: str, filename: str, size: int, retention_s: float
) -> FileObject:
    row = await conn.fetchrow(
        """INSERT INTO batch_files (file_id, tenant_id, purpose, filename, bytes, expires_at)
           VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6)) RETURNING *""",
        file_id,
        tenant_id,
        purpose,
        filename,
        size,
        retention_s,
    )
    assert row is not None
    return file_object(row)


async def get_file(conn: Conn, tenant_id: int, file_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT * FROM batch_files WHERE file_id = $1 AND tenant_id = $2 AND NOT deleted", file_id, tenant_id
    )


async def list_files(
    conn: Conn, tenant_id: int, *, purpose: str | None, after: str | None, limit: int
) -> FileList:
    rows = await conn.fetch(
        """SELECT * FROM batch_files
            WHERE tenant_id = $1 AND NOT deleted AND ($2::text IS NULL OR purpose = $2)
              AND ($3::text IS NULL
                   OR seq < (SELECT seq FROM batch_files WHERE file_id = $3 AND tenant_id = $1))
            ORDER BY seq DESC LIMIT $4""",
        tenant_id,
        purpose,
        after,
        limit + 1,
    )
    data = [file_object(r) for r in rows[:limit]]
    return FileList(
        data=data,
        has_more=len(rows) > limit,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


async def mark_file_deleted(conn: Conn, tenant_id: int, file_id: str) -> bool:
    done = await conn.fetchval(
        "UPDATE batch_files SET deleted = true WHERE file_id = $1 AND tenant_id = $2 AND NOT deleted "
        "RETURNING true",
        file_id,
        tenant_id,
    )
    return bool(done)


# -- batches -------------------------------------------------------------------------------------
async def active_batches(conn: Conn, tenant_id: int) -> int:
    n = await conn.fetchval(
        "SELECT count(*) FROM batches WHERE tenant_id = $1 AND status IN "
        "('validating', 'in_progress', 'finalizing', 'cancelling')",
        tenant_id,
    )
    return int(n)


async def insert_batch(
    conn: Conn,
    *,
    tenant_id: int,
    endpoint: str,
    input_file_id: str,
    completion_window: str,
    window_s: float,
    metadata: dict[str, str] | None,
) -> BatchObject:
    row = await conn.fetchrow(
        """INSERT INTO batches (batch_id, tenant_id, endpoint, input_file_id, completion_window, metadata,
                                expires_at)
           VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7)) RETURNING *""",
        new_id("batch_"),
        tenant_id,
        endpoint,
        input_file_id,
        completion_window,
        None if metadata is None else orjson.dumps(metadata).decode(),
        window_s,
    )
    assert row is not None
    return batch_object(row)


async def get_batch(conn: Conn, tenant_id: int, batch_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT * FROM batches WHERE batch_id = $1 AND tenant_id = $2", batch_id, tenant_id
    )


async def list_batches(conn: Conn, tenant_id: int, *, after: str | None, limit: int) -> BatchList:
    rows = await conn.fetch(
        """SELECT * FROM batches
            WHERE tenant_id = $1
              AND ($2::text IS NULL OR seq < (SELECT seq FROM batches WHERE batch_id = $2 AND tenant_id = $1))
            ORDER BY seq DESC LIMIT $3""",
        tenant_id,
        after,
        limit + 1,
    )
    data = [batch_object(r) for r in rows[:limit]]
    return BatchList(
        data=data,
        has_more=len(rows) > limit,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


async def cancel_batch(conn: Conn, tenant_id: int, batch_id: str) -> asyncpg.Record | None:
    """validating or in_progress -> cancelling (the runner finishes the lines in flight, then
    finalises as cancelled); any other status is left as it is and returned."""
    row = await conn.fetchrow(
        """UPDATE batches SET status = 'cancelling', cancelling_at = now()
            WHERE batch_id = $1 AND tenant_id = $2 AND status IN ('validating', 'in_progress')
            RETURNING *""",
        batch_id,
        tenant_id,
    )
    return row if row is not None else await get_batch(conn, tenant_id, batch_id)
