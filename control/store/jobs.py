"""Live jobs and endpoints as the admin sees them, and the two operator actions on them.

Invariants: the admin API never talks to the launcher. "Cancel" sets the job state
``cancelling`` (the Job Worker runs scancel and ends the job); "drain" sets the job state
``draining`` and the endpoint's ``draining`` flag (the published table then routes no new
requests to it; the Job Worker cancels it once in-flight requests end or its deadline passes).
Both are idempotent and refuse jobs that already ended (409).
"""

from __future__ import annotations

import asyncpg
import msgspec

from control.store.db import ConflictError, Conn, Database, NotFoundError, found
from control.wire import Endpoint, EndpointQuery, Job, JobQuery

_JOB_SELECT = """
SELECT j.endpoint_job_id, m.name AS model, j.generation, j.launcher, j.launcher_job_id, j.state,
       j.state_reason, j.created_at, j.submitted_at, j.registered_at, j.ready_at, j.ended_at,
       e.endpoint_id, e.node, e.port
  FROM ai_model_endpoint_jobs j
  JOIN ai_model_configurations m USING (model_id)
  LEFT JOIN ai_model_endpoints e USING (endpoint_job_id)
"""

_ENDPOINT_SELECT = """
SELECT e.endpoint_id, e.endpoint_job_id, m.name AS model, e.node, e.port,
       'http://' || e.node || ':' || e.port AS url, j.launcher_job_id, j.state AS job_state,
       e.capabilities, e.registered_at, e.ready_at, e.last_probe_at, e.consecutive_failures, e.draining
  FROM ai_model_endpoints e
  JOIN ai_model_endpoint_jobs j USING (endpoint_job_id)
  JOIN ai_model_configurations m ON m.model_id = e.model_id
"""

_FINAL_STATES = ("ended", "failed")


def _job(row: asyncpg.Record) -> Job:
    return msgspec.convert(dict(row), Job)


def _endpoint(row: asyncpg.Record) -> Endpoint:
    return msgspec.convert(dict(row), Endpoint)


async def list_jobs(db: Database, query: JobQuery) -> list[Job]:
    async with db.transaction() as conn:
        rows = await conn.fetch(
            _JOB_SELECT
            + """ WHERE ($1::text IS NULL OR m.name = $1) AND ($2::text IS NULL OR j.state = $2)
                    AND ($3 OR j.state NOT IN ('ended', 'failed'))
                  ORDER BY j.endpoint_job_id DESC LIMIT $4""",
            query.model,
            query.state,
            query.all,
            query.limit,
        )
    return [_job(r) for r in rows]


async def get_job(db: Database, job_id: int) -> Job:
    async with db.transaction() as conn:
        row = await conn.fetchrow(_JOB_SELECT + " WHERE j.endpoint_job_id = $1", job_id)
    if row is None:
        raise NotFoundError(f"no job {job_id}")
    return _job(found(row, "row"))


async def _set_job_state(
    conn: Conn, job_id: int, state: str, allowed_from: tuple[str, ...], reason: str
) -> None:
    current = await conn.fetchval(
        "SELECT state FROM ai_model_endpoint_jobs WHERE endpoint_job_id = $1 FOR UPDATE", job_id
    )
    if current is None:
        raise NotFoundError(f"no job {job_id}")
    if current == state:
        return
    if current not in allowed_from:
        raise ConflictError(f"job {job_id} is {current}")
    await conn.execute(
        "UPDATE ai_model_endpoint_jobs SET state = $2, state_reason = $3 WHERE endpoint_job_id = $1",
        job_id,
        state,
        reason,
    )


async def cancel_job(db: Database, job_id: int) -> Job:
    async with db.transaction() as conn:
        await _set_job_state(
            conn,
            job_id,
            "cancelling",
            ("pending", "submitted", "registered", "ready", "draining"),
            "cancelled by admin",
        )
        await conn.execute("UPDATE ai_model_endpoints SET draining = true WHERE endpoint_job_id = $1", job_id)
        row = await conn.fetchrow(_JOB_SELECT + " WHERE j.endpoint_job_id = $1", job_id)
    return _job(found(row, "row"))


async def drain_job(db: Database, job_id: int) -> Job:
    async with db.transaction() as conn:
        await _set_job_state(
            conn, job_id, "draining", ("pending", "submitted", "registered", "ready"), "drained by admin"
        )
        await conn.execute("UPDATE ai_model_endpoints SET draining = true WHERE endpoint_job_id = $1", job_id)
        row = await conn.fetchrow(_JOB_SELECT + " WHERE j.endpoint_job_id = $1", job_id)
    return _job(found(row, "row"))


async def list_endpoints(db: Database, query: EndpointQuery) -> list[Endpoint]:
    async with db.transaction() as conn:
        rows = await conn.fetch(
            _ENDPOINT_SELECT + " WHERE ($1::text IS NULL OR m.name = $1) ORDER BY e.endpoint_id", query.model
        )
    return [_endpoint(r) for r in rows]


async def drain_endpoint(db: Database, endpoint_id: int) -> Endpoint:
    async with db.transaction() as conn:
        job_id = await conn.fetchval(
            "SELECT endpoint_job_id FROM ai_model_endpoints WHERE endpoint_id = $1", endpoint_id
        )
        if job_id is None:
            raise NotFoundError(f"no endpoint {endpoint_id}")
    await drain_job(db, job_id)
    async with db.transaction() as conn:
        row = await conn.fetchrow(_ENDPOINT_SELECT + " WHERE e.endpoint_id = $1", endpoint_id)
    if row is None:
        raise NotFoundError(f"no endpoint {endpoint_id}")
    return _endpoint(row)


async def endpoint_bearer_tokens(db: Database) -> dict[int, str | None]:
    """Each endpoint's bearer token, for control-side scrapes of its ``/metrics`` (never sent out)."""
    async with db.transaction() as conn:
        rows = await conn.fetch("SELECT endpoint_id, bearer_token FROM ai_model_endpoints")
    return {r["endpoint_id"]: r["bearer_token"] for r in rows}


async def ready_endpoints(db: Database) -> list[Endpoint]:
    """Endpoints that answered a probe and whose job is live (Prometheus SD)."""
    async with db.transaction() as conn:
        rows = await conn.fetch(
            _ENDPOINT_SELECT
            + " WHERE e.ready_at IS NOT NULL AND j.state NOT IN ('ended', 'failed') ORDER BY e.endpoint_id"
        )
    return [_endpoint(r) for r in rows]
