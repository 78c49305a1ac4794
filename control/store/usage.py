"""Token usage per tenant and model over a time range, from the gateways' ``usage_records``.

The gateways upsert per-bucket counters; this module only sums them. A bucket counts when its
start lies in ``[since, until)``; with a period (hour, day, month) the sums are per period too,
periods starting on UTC boundaries. Each report also carries the monthly quotas of the tenants
it covers with what is left of them this month (whatever the range asked). :func:`usage_csv`
renders a report as CSV for a centre's accounting (pure).
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta

from control.store.db import Database, InvalidError
from control.wire import QuotaRow, Usage, UsageQuery, UsageRow

DEFAULT_WINDOW = timedelta(hours=24)

_USAGE_SQL = """
SELECT {period} t.name AS tenant, u.model, sum(u.requests)::bigint AS requests,
       sum(u.errors)::bigint AS errors, sum(u.prompt_tokens)::bigint AS prompt_tokens,
       sum(u.completion_tokens)::bigint AS completion_tokens
  FROM usage_records u JOIN identity_tenants t USING (tenant_id)
 WHERE u.bucket_start >= $1 AND u.bucket_start < $2
   AND ($3::text IS NULL OR t.name = $3) AND ($4::text IS NULL OR u.model = $4)
 GROUP BY {group} t.name, u.model ORDER BY {group} t.name, u.model
"""

# The period is one of a fixed set (validated by UsageQuery), never text from the request.
_PERIOD_SQL = "date_trunc('{p}', u.bucket_start AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"

_QUOTAS_SQL = """
SELECT t.name AS tenant, t.monthly_token_quota,
       date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS month_start,
       coalesce((SELECT sum(u.prompt_tokens + u.completion_tokens) FROM usage_records u
                  WHERE u.tenant_id = t.tenant_id
                    AND u.bucket_start >= date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'),
                0)::bigint AS used
  FROM identity_tenants t
 WHERE t.monthly_token_quota IS NOT NULL AND ($1::text IS NULL OR t.name = $1)
 ORDER BY t.name
"""


def _sql(period: str) -> str:
    if period == "total":
        return _USAGE_SQL.format(period="", group="")
    expr = _PERIOD_SQL.format(p=period)
    return _USAGE_SQL.format(period=f"{expr} AS period_start,", group="1,")


async def usage(db: Database, query: UsageQuery) -> Usage:
    until = query.until or datetime.now(UTC)
    since = query.since or until - DEFAULT_WINDOW
    if since >= until:
        raise InvalidError("since must be before until")
    async with db.transaction() as conn:
        rows = await conn.fetch(_sql(query.period), since, until, query.tenant, query.model)
        quotas = await conn.fetch(_QUOTAS_SQL, query.tenant)
    return Usage(
        since=since,
        until=until,
        period=query.period,
        rows=[UsageRow(**dict(r)) for r in rows],
        quotas=[QuotaRow(**dict(q), left=max(0, q["monthly_token_quota"] - q["used"])) for q in quotas],
    )


CSV_COLUMNS = ("period_start", "tenant", "model", "requests", "errors", "prompt_tokens", "completion_tokens",
               "total_tokens")


def usage_csv(report: Usage) -> str:
    """One line per row: ``period_start`` is the range's start for period "total" (RFC 3339, UTC)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in report.rows:
        start = r.period_start if isinstance(r.period_start, datetime) else report.since
        when = start.astimezone(UTC).isoformat().replace("+00:00", "Z")
        writer.writerow((when, r.tenant, r.model, r.requests, r.errors, r.prompt_tokens, r.completion_tokens,
                         r.prompt_tokens + r.completion_tokens))
    return out.getvalue()
