"""Validating a new batch and finalising a finished one: the runner's two whole-batch steps.

Both run in one transaction holding the batch's row lock (``FOR UPDATE SKIP LOCKED``), so of
several runners exactly one does each step, and a step cut short by a crash is simply redone.
Finalising writes the output and error files from the ``batch_lines`` rows (the results were
stored there, one transaction per line), in line order, under names derived from the batch id:
doing it twice writes the same files and inserts nothing twice.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from control.batch import results
from control.batch.filestore import FileStore
from control.batch.validate import split_lines, validate_lines
from control.batch.wire import BatchError
from control.store.db import Conn
from hpcgate.logs import get_logger

log = get_logger("hpcgate.control.batches")

_ACTIVE_CLAIMS = """SELECT count(*) FROM batch_lines
                     WHERE batch_id = $1 AND state = 'claimed' AND lease_until > now()"""


def derived_file_id(batch_id: str, kind: str) -> str:
    return "file-" + hashlib.sha256(f"{batch_id}/{kind}".encode()).hexdigest()[:24]


def line_id(batch_id: str, line_no: int) -> str:
    return f"batch_req_{batch_id.removeprefix('batch_')}_{line_no}"


async def _resolver(conn: Conn, tenant_id: int) -> Any:
    allowed = await conn.fetchval(
        "SELECT allowed_models FROM identity_tenants WHERE tenant_id = $1", tenant_id
    )
    rows = await conn.fetch(
        """SELECT c.name, c.name AS given FROM ai_model_configurations c
           UNION ALL SELECT c.name, a.alias
                       FROM ai_model_aliases a JOIN ai_model_configurations c USING (model_id)"""
    )
    canonical = {r["given"]: r["name"] for r in rows}
    permitted = None if allowed is None else set(allowed)

    def resolve(model: str) -> tuple[str | None, str]:
        name = canonical.get(model)
        if name is None:
            return None, f"the model {model!r} does not exist"
        if permitted is not None and name not in permitted and model not in permitted:
            return None, f"this API key may not use model {model!r}"
        return name, ""

    return resolve


async def validate_next(conn: Conn, files: FileStore, *, max_lines: int, max_errors: int) -> str | None:
    """Validate the oldest batch in ``validating``; returns its id, or None if there was none.
    Call inside a transaction."""
    row = await conn.fetchrow(
        """SELECT batch_id, tenant_id, endpoint, input_file_id FROM batches WHERE status = 'validating'
            ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED"""
    )
    if row is None:
        return None
    batch_id, tenant = row["batch_id"], row["tenant_id"]
    resolve = await _resolver(conn, tenant)
    try:
        with files.open(tenant, row["input_file_id"]) as fh:
            checked = validate_lines(
                split_lines(fh), row["endpoint"], resolve, max_lines=max_lines, max_errors=max_errors
            )
    except FileNotFoundError:
        checked = None
    if checked is None or checked.errors:
        errors = (
            checked.errors
            if checked is not None
            else [BatchError(code="invalid_file", message="the input file no longer exists")]
        )
        await conn.execute(
            """UPDATE batches SET status = 'failed', failed_at = now(), errors = $2 WHERE batch_id = $1""",
            batch_id,
            orjson.dumps([_error_dict(e) for e in errors]).decode(),
        )
        log.info(
            "batch_state",
            batch_id=batch_id,
            old="validating",
            new="failed",
            reason=f"{checked.error_count if checked else 1} invalid line(s)",
        )
        return str(batch_id)
    await conn.copy_records_to_table(
        "batch_lines",
        records=[(batch_id, *r) for r in checked.records],
        columns=["batch_id", "line_no", "custom_id", "model", "byte_offset", "byte_length"],
    )
    await conn.execute(
        """UPDATE batches SET status = 'in_progress', in_progress_at = now(), total = $2
            WHERE batch_id = $1""",
        batch_id,
        len(checked.records),
    )
    log.info(
        "batch_state", batch_id=batch_id, old="validating", new="in_progress", lines=len(checked.records)
    )
    return str(batch_id)


def _error_dict(e: BatchError) -> dict[str, object]:
    return {"code": e.code, "message": e.message, "line": e.line, "param": e.param}


async def advance(conn: Conn) -> None:
    """Whole-batch transitions that need no file work: expiry, and in_progress -> finalizing."""
    for row in await conn.fetch(
        """UPDATE batches SET status = 'finalizing', final_status = 'expired', finalizing_at = now()
                WHERE status IN ('validating', 'in_progress') AND expires_at < now() RETURNING batch_id"""
    ):
        log.info(
            "batch_state", batch_id=row["batch_id"], old="in_progress", new="finalizing", reason="expired"
        )
    for row in await conn.fetch(
        """UPDATE batches b SET status = 'finalizing', final_status = 'completed', finalizing_at = now()
                WHERE status = 'in_progress' AND NOT EXISTS (
                      SELECT 1 FROM batch_lines l WHERE l.batch_id = b.batch_id AND l.state <> 'done')
                RETURNING batch_id"""
    ):
        log.info(
            "batch_state",
            batch_id=row["batch_id"],
            old="in_progress",
            new="finalizing",
            reason="all lines done",
        )


async def finalize_next(conn: Conn, files: FileStore, *, grace_s: float, retention_s: float) -> str | None:
    """Finalise one batch in ``finalizing`` or ``cancelling`` whose lines in flight are done (or
    past the grace period). Call inside a transaction."""
    # No new line is claimed in these statuses, so "no live claim" cannot become false: check
    # first, then lock only the batch to finalise (a lock held on the others would stall the
    # result writes of their lines in flight).
    candidates = await conn.fetch(
        """SELECT batch_id, extract(epoch FROM now() - CASE WHEN status = 'finalizing' THEN finalizing_at
                                                            ELSE cancelling_at END) AS waited
             FROM batches WHERE status IN ('finalizing', 'cancelling') ORDER BY seq"""
    )
    for c in candidates:
        if c["waited"] < grace_s and await conn.fetchval(_ACTIVE_CLAIMS, c["batch_id"]):
            continue
        row = await conn.fetchrow(
            """SELECT * FROM batches WHERE batch_id = $1 AND status IN ('finalizing', 'cancelling')
                FOR UPDATE SKIP LOCKED""",
            c["batch_id"],
        )
        if row is None:  # another runner is at it
            continue
        await _write_files(conn, files, row, retention_s)
        return str(row["batch_id"])
    return None


async def expire_files(conn: Conn, files: FileStore) -> int:
    """Delete the files whose retention has passed (rows marked deleted, then the bytes)."""
    rows = await conn.fetch(
        """UPDATE batch_files SET deleted = true WHERE NOT deleted AND expires_at < now()
            RETURNING tenant_id, file_id"""
    )
    for r in rows:
        files.remove(r["tenant_id"], r["file_id"])
    if rows:
        log.info("batch_files_expired", files=len(rows))
    return len(rows)


async def _write_files(conn: Conn, files: FileStore, row: Any, retention_s: float) -> None:
    batch_id, tenant = row["batch_id"], row["tenant_id"]
    final = "cancelled" if row["status"] == "cancelling" else row["final_status"] or "completed"
    out_id, err_id = derived_file_id(batch_id, "output"), derived_file_id(batch_id, "errors")
    out_tmp, out_fh = files.begin(tenant, out_id)
    err_tmp, err_fh = files.begin(tenant, err_id)
    sizes = [0, 0]
    try:
        async for r in conn.cursor(
            "SELECT line_no, custom_id, state, ok, result FROM batch_lines WHERE batch_id = $1 "
            "ORDER BY line_no",
            batch_id,
            prefetch=500,
        ):
            if r["state"] == "done":
                fh, k = (out_fh, 0) if r["ok"] else (err_fh, 1)
                fh.write(r["result"] + b"\n")
                sizes[k] += len(r["result"]) + 1
            elif final == "expired":
                line = results.unanswered(
                    line_id(batch_id, r["line_no"]),
                    r["custom_id"],
                    "batch_expired",
                    "This request could not be executed before the completion window expired.",
                ).line
                err_fh.write(line + b"\n")
                sizes[1] += len(line) + 1
        ids: list[str | None] = [None, None]
        for k, (fid, tmp, fh, kind) in enumerate(
            ((out_id, out_tmp, out_fh, "output"), (err_id, err_tmp, err_fh, "errors"))
        ):
            if sizes[k] == 0:
                files.discard(tmp, fh)
                continue
            files.commit(tmp, fh, tenant, fid)
            ids[k] = fid
            await conn.execute(
                """INSERT INTO batch_files (file_id, tenant_id, purpose, filename, bytes, expires_at)
                   VALUES ($1, $2, 'batch_output', $3, $4, now() + make_interval(secs => $5))
                   ON CONFLICT (file_id) DO NOTHING""",
                fid,
                tenant,
                f"{batch_id}_{kind}.jsonl",
                sizes[k],
                retention_s,
            )
    except BaseException:
        files.discard(out_tmp, out_fh)
        files.discard(err_tmp, err_fh)
        raise
    stamp = {"completed": "completed_at", "expired": "expired_at", "cancelled": "cancelled_at"}[final]
    await conn.execute(
        f"""UPDATE batches SET status = $2, {stamp} = now(), output_file_id = $3, error_file_id = $4,
                final_status = NULL WHERE batch_id = $1""",
        batch_id,
        final,
        ids[0],
        ids[1],
    )
    log.info(
        "batch_state",
        batch_id=batch_id,
        old=row["status"],
        new=final,
        output_bytes=sizes[0],
        error_bytes=sizes[1],
    )
