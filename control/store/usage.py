"""Token usage per tenant and model over a time range, from the gateways' ``usage_records``.

The gateways upsert per-bucket counters; this module only sums them. A bucket counts when its
start lies in ``[since, until)``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from control.store.db import Database, InvalidError
from control.wire import Usage, UsageQuery, UsageRow

DEFAULT_WINDOW = timedelta(hours=24)


async def usage(db: Database, query: UsageQuery) -> Usage:
    until = query.until or datetime.now(UTC)
    since = query.since or until - DEFAULT_WINDOW
    if since >= until:
        raise InvalidError("since must be before until")
    async with db.transaction() as conn:
        rows = await conn.fetch(
            """SELECT t.name AS tenant, u.model, sum(u.requests)::bigint AS requests,
                      sum(u.errors)::bigint AS errors, sum(u.prompt_tokens)::bigint AS prompt_tokens,
                      sum(u.completion_tokens)::bigint AS completion_tokens
                 FROM usage_records u JOIN identity_tenants t USING (tenant_id)
                WHERE u.bucket_start >= $1 AND u.bucket_start < $2
                  AND ($3::text IS NULL OR t.name = $3) AND ($4::text IS NULL OR u.model = $4)
                GROUP BY t.name, u.model ORDER BY t.name, u.model""",
            since,
            until,
            query.tenant,
            query.model,
        )
    return Usage(since=since, until=until, rows=[UsageRow(**dict(r)) for r in rows])
