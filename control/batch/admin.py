"""``GET /admin/batches``: every tenant's batches for operators (status, progress, throughput, ETA).

Throughput is lines finished per second since the batch went in progress; the ETA divides the
remaining lines by it. Newest first; ``active`` limits the list to batches still running.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from litestar import get
from litestar.di import NamedDependency
from litestar.params import QueryParameter

from control.batch.wire import ACTIVE_STATUSES
from control.store.db import Database
from control.wire import TENANT_PATTERN, BatchSummary

TenantFilter = Annotated[str | None, QueryParameter(pattern=TENANT_PATTERN)]
Limit = Annotated[int, QueryParameter(ge=1, le=1000)]


async def batch_summaries(db: Database, *, tenant: str | None, active: bool,
                          limit: int) -> list[BatchSummary]:
    async with db.transaction() as conn:
        rows = await conn.fetch(
            """SELECT b.*, t.name AS tenant FROM batches b JOIN identity_tenants t USING (tenant_id)
                WHERE ($1::text IS NULL OR t.name = $1) AND (NOT $2 OR b.status = ANY($3::text[]))
                ORDER BY b.seq DESC LIMIT $4""",
            tenant, active, list(ACTIVE_STATUSES), limit)
    now = datetime.now(UTC)
    out = []
    for r in rows:
        done = r["completed"] + r["failed"]
        rate = eta = None
        if r["in_progress_at"] is not None:
            end = r["completed_at"] or r["expired_at"] or r["cancelled_at"] or now
            elapsed = (end - r["in_progress_at"]).total_seconds()
            rate = round(done / elapsed, 2) if elapsed > 0 else None
            left = r["total"] - done
            if rate and left > 0 and r["status"] in ACTIVE_STATUSES:
                eta = round(left / rate, 1)
        out.append(BatchSummary(
            batch_id=r["batch_id"], tenant=r["tenant"], status=r["status"], endpoint=r["endpoint"],
            total=r["total"], completed=r["completed"], failed=r["failed"],
            progress_pct=round(100.0 * done / r["total"], 1) if r["total"] else 0.0,
            lines_per_s=rate, eta_s=eta, created_at=r["created_at"], in_progress_at=r["in_progress_at"],
            expires_at=r["expires_at"]))
    return out


@get("/batches", summary="Batches of all tenants: status, progress, throughput, ETA", tags=["batches"])
async def list_all_batches(db: NamedDependency[Database], tenant: TenantFilter = None,
                           active: Annotated[bool, QueryParameter()] = False,
                           limit: Limit = 100) -> list[BatchSummary]:
    return await batch_summaries(db, tenant=tenant, active=active, limit=limit)
