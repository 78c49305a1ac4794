"""Registration of a running job: check its one-time token, give it a port unique on its node.

Invariants (all enforced inside one transaction):
- the job row is locked (``FOR UPDATE``), so two registrations of one job are serialized;
- the token is compared as SHA-256 digests in constant time; an unknown job and a wrong
  token get the same answer, so ids cannot be probed;
- a token is single-use: once ``registration_used_at`` is set, only a repeat of the same
  claim (same launcher job id and node) succeeds, and it returns the same endpoint and port;
- ports are chosen under a transaction-level advisory lock per node as the first port of the
  configured range, after the last one handed out on that node (wrapping around), that no
  endpoint on that node holds; UNIQUE(node, port) backs this up, and a unique violation is
  retried, never surfaced as an error. Rotating (rather than always taking the lowest) keeps a
  port that a foreign process occupies from breaking job after job.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

import asyncpg

from control.store.db import ConflictError, Conn, Database
from control.store.tokens import hash_registration_token
from control.wire import RegisterRequest, RegisterResponse

# Jobs in these states may still register; later states mean the job was given up.
REGISTRABLE_STATES = ("pending", "submitted")
_PORT_RETRIES = 5


class RegistrationRejectedError(Exception):
    """The claim is refused; ``status`` is the HTTP status to answer (401, 409 or 422)."""

    def __init__(self, status: int, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.path = path


@dataclass(frozen=True, slots=True)
class PortRange:
    start: int
    end: int


async def register(db: Database, req: RegisterRequest, ports: PortRange) -> RegisterResponse:
    """Validate the claim and create (or return) the job's endpoint."""
    for attempt in range(_PORT_RETRIES):
        try:
            async with db.transaction() as conn:
                return await _register(conn, req, ports)
        except ConflictError as exc:
            # A unique violation on (node, port) means a writer bypassed the node lock; pick again.
            if "ai_model_endpoints_node_port_key" not in str(exc.__cause__) or attempt == _PORT_RETRIES - 1:
                raise
    raise AssertionError("unreachable")


async def _register(conn: Conn, req: RegisterRequest, ports: PortRange) -> RegisterResponse:
    job = await conn.fetchrow(
        """SELECT j.endpoint_job_id, j.state, j.launcher, j.launcher_job_id, j.registration_token_hash,
                  j.registration_expires_at <= now() AS expired, j.registration_used_at,
                  m.model_id, m.name AS model
             FROM ai_model_endpoint_jobs j JOIN ai_model_configurations m USING (model_id)
            WHERE j.endpoint_job_id = $1
              FOR UPDATE OF j""",
        req.endpoint_job_id,
    )
    if job is None or not hmac.compare_digest(
        bytes(job["registration_token_hash"]), hash_registration_token(req.registration_token)
    ):
        raise RegistrationRejectedError(401, "unknown endpoint job or wrong registration token")

    if job["registration_used_at"] is not None:
        return await _repeat(conn, req, job)
    if job["expired"]:
        raise RegistrationRejectedError(401, "registration token expired")
    if job["state"] not in REGISTRABLE_STATES:
        raise RegistrationRejectedError(409, f"job is {job['state']}, it can no longer register")
    if req.model != job["model"]:
        raise RegistrationRejectedError(
            409, f"job {req.endpoint_job_id} runs model {job['model']!r}, not {req.model!r}", "$.model"
        )
    if job["launcher_job_id"] is not None and job["launcher_job_id"] != req.launcher_job_id:
        raise RegistrationRejectedError(
            409, f"job {req.endpoint_job_id} is launcher job {job['launcher_job_id']!r}", "$.launcher_job_id"
        )
    clash = await conn.fetchval(
        """SELECT 1 FROM ai_model_endpoint_jobs
            WHERE launcher = $1 AND launcher_job_id = $2 AND endpoint_job_id <> $3""",
        job["launcher"],
        req.launcher_job_id,
        req.endpoint_job_id,
    )
    if clash:
        raise RegistrationRejectedError(
            409, "launcher job id belongs to another endpoint job", "$.launcher_job_id"
        )

    # Serialize port choice per node; hashtextextended keeps distinct nodes mostly independent.
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 5))", req.node)
    port = await conn.fetchval(
        """SELECT p FROM generate_series($2::int, $3::int) AS p
            WHERE NOT EXISTS (SELECT 1 FROM ai_model_endpoints e WHERE e.node = $1 AND e.port = p)
            ORDER BY p <= coalesce((SELECT last_port FROM ai_node_port_cursors WHERE node = $1), 0), p
            LIMIT 1""",
        req.node,
        ports.start,
        ports.end,
    )
    if port is None:
        raise RegistrationRejectedError(
            409, f"no free port left on node {req.node!r} in {ports.start}-{ports.end}"
        )
    await conn.execute(
        """INSERT INTO ai_node_port_cursors (node, last_port) VALUES ($1, $2)
           ON CONFLICT (node) DO UPDATE SET last_port = EXCLUDED.last_port""",
        req.node,
        port,
    )
    endpoint_id = await conn.fetchval(
        """INSERT INTO ai_model_endpoints (endpoint_job_id, model_id, node, port, bearer_token, capabilities)
           VALUES ($1, $2, $3, $4, $5, $6) RETURNING endpoint_id""",
        req.endpoint_job_id,
        job["model_id"],
        req.node,
        port,
        req.bearer_token,
        req.capabilities,
    )
    await conn.execute(
        """UPDATE ai_model_endpoint_jobs
              SET state = 'registered', launcher_job_id = $2, registered_at = now(),
                  registration_used_at = now(), submitted_at = coalesce(submitted_at, now())
            WHERE endpoint_job_id = $1""",
        req.endpoint_job_id,
        req.launcher_job_id,
    )
    return RegisterResponse(endpoint_id=endpoint_id, port=port, model=job["model"])


async def _repeat(conn: Conn, req: RegisterRequest, job: asyncpg.Record) -> RegisterResponse:
    """A used token: the same claim gets the same answer, anything else is a conflict."""
    endpoint = await conn.fetchrow(
        "SELECT endpoint_id, node, port FROM ai_model_endpoints WHERE endpoint_job_id = $1",
        req.endpoint_job_id,
    )
    same = (
        endpoint is not None
        and endpoint["node"] == req.node
        and job["launcher_job_id"] == req.launcher_job_id
        and job["model"] == req.model
    )
    if not same or endpoint is None:
        raise RegistrationRejectedError(409, "registration token already used by another claim")
    return RegisterResponse(endpoint_id=endpoint["endpoint_id"], port=endpoint["port"], model=job["model"])
