"""The Job Worker's SQL: reads the desired state, writes job transitions. No decisions here.

Invariants:
- every transition is a conditional UPDATE from the states it may come from, so a concurrent
  writer (the registration API moving a job to ``registered``, the Endpoint Worker marking it
  ``ready``, an admin draining it) is never overwritten with an older state;
- a job row exists (with its name) before anything is submitted for it, and the registration
  token is rotated only while the row is ``pending`` without a launcher job id;
- ending a job deletes its endpoint row (freeing the node's port) in the same transaction;
- a start failure bumps the model's failure counter and backoff in the same transaction, and
  the ``max_failures``-th in a row marks the model ``failed`` with the reason.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy

from control.jobs.naming import job_name
from hpcgate.backoff import ceiling


class ModelRow(msgspec.Struct, frozen=True, kw_only=True):
    model_id: int
    name: str
    state: str
    state_reason: str | None
    desired_instances: int
    generation: int
    startup_timeout_s: int
    slurm_template: str
    slurm_resources: str  # JSON text, validated by control.jobs.resources
    engine_args: str  # JSON text
    consecutive_failures: int
    retry_not_before: float | None


class JobRow(msgspec.Struct, frozen=True, kw_only=True):
    endpoint_job_id: int
    model_id: int
    generation: int
    state: str
    launcher_job_id: str | None
    job_name: str | None
    created_at: float
    ready_at: float | None
    replaces: int | None
    draining_since: float | None
    cancel_requested_at: float | None
    walltime_s: int | None
    endpoint_id: int | None
    node: str | None
    port: int | None
    bearer_token: str | None


# A plain connection or one borrowed from a pool.
Conn = asyncpg.Connection | PoolConnectionProxy


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


async def load_models(conn: Conn) -> list[ModelRow]:
    rows = await conn.fetch(
        """SELECT model_id, name, state, state_reason, desired_instances, generation, startup_timeout_s,
                  slurm_template, slurm_resources::text AS slurm_resources, engine_args::text AS engine_args,
                  consecutive_failures, retry_not_before
             FROM ai_model_configurations ORDER BY model_id"""
    )
    return [ModelRow(**{**dict(r), "retry_not_before": _ts(r["retry_not_before"])}) for r in rows]


async def load_live_jobs(conn: Conn, launcher: str) -> list[JobRow]:
    """Live jobs of this launcher. A job whose endpoint answered a probe counts as ready even if
    the Endpoint Worker has not moved the job row yet."""
    rows = await conn.fetch(
        """SELECT j.endpoint_job_id, j.model_id, j.generation,
                  CASE WHEN j.state IN ('registered', 'submitted') AND e.ready_at IS NOT NULL
                       THEN 'ready' ELSE j.state END AS state,
                  j.launcher_job_id, j.job_name, j.created_at, coalesce(j.ready_at, e.ready_at) AS ready_at,
                  j.replaces_endpoint_job_id AS replaces, j.draining_since, j.cancel_requested_at,
                  j.walltime_s, e.endpoint_id, e.node, e.port, e.bearer_token
             FROM ai_model_endpoint_jobs j
             LEFT JOIN ai_model_endpoints e USING (endpoint_job_id)
            WHERE j.launcher = $1 AND j.state NOT IN ('ended', 'failed')
            ORDER BY j.endpoint_job_id""",
        launcher,
    )
    out = []
    for r in rows:
        d: dict[str, Any] = dict(r)
        for key in ("created_at", "ready_at", "draining_since", "cancel_requested_at"):
            d[key] = _ts(d[key])
        out.append(JobRow(**d))
    return out


async def create_job(conn: Conn, *, model_id: int, model: str, generation: int, launcher: str,
                     prefix: str, replaces: int | None, walltime_s: int | None,
                     token_hash: bytes, token_ttl_s: float) -> tuple[int, str]:
    """Insert a pending job row with its name; returns (endpoint_job_id, job name)."""
    async with conn.transaction():
        job_id: int = await conn.fetchval(
            """INSERT INTO ai_model_endpoint_jobs
                   (model_id, generation, launcher, registration_token_hash, registration_expires_at,
                    walltime_s, replaces_endpoint_job_id)
               VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5), $6, $7)
               RETURNING endpoint_job_id""",
            model_id, generation, launcher, token_hash, token_ttl_s, walltime_s, replaces,
        )
        name = job_name(prefix, model, generation, job_id)
        await conn.execute("UPDATE ai_model_endpoint_jobs SET job_name = $2 WHERE endpoint_job_id = $1",
                           job_id, name)
    return job_id, name


async def rotate_token(conn: Conn, job_id: int, token_hash: bytes, token_ttl_s: float) -> bool:
    """Give a still-unsubmitted job a fresh token (the old plaintext died with a previous run)."""
    done = await conn.fetchval(
        """UPDATE ai_model_endpoint_jobs
              SET registration_token_hash = $2, registration_expires_at = now() + make_interval(secs => $3)
            WHERE endpoint_job_id = $1 AND state = 'pending' AND launcher_job_id IS NULL
           RETURNING true""",
        job_id, token_hash, token_ttl_s,
    )
    return bool(done)


async def record_submitted(conn: Conn, job_id: int, launcher_job_id: str) -> None:
    # Registration may have won the race (state 'registered', same launcher id): keep its state.
    await conn.execute(
        """UPDATE ai_model_endpoint_jobs
              SET launcher_job_id = coalesce(launcher_job_id, $2),
                  submitted_at = coalesce(submitted_at, now()),
                  state = CASE WHEN state = 'pending' THEN 'submitted' ELSE state END
            WHERE endpoint_job_id = $1""",
        job_id, launcher_job_id,
    )


async def set_draining(conn: Conn, job_id: int, reason: str) -> str | None:
    """Returns the previous state, or None if the job could not be drained (already stopping)."""
    async with conn.transaction():
        old = await conn.fetchval(
            "SELECT state FROM ai_model_endpoint_jobs WHERE endpoint_job_id = $1 FOR UPDATE", job_id)
        if old not in ("pending", "submitted", "registered", "ready", "draining"):
            return None
        await conn.execute(
            """UPDATE ai_model_endpoint_jobs
                  SET state = 'draining', draining_since = coalesce(draining_since, now()),
                      state_reason = CASE WHEN state = 'draining' THEN state_reason ELSE $2 END
                WHERE endpoint_job_id = $1""",
            job_id, reason,
        )
        await conn.execute("UPDATE ai_model_endpoints SET draining = true WHERE endpoint_job_id = $1", job_id)
    return str(old)


async def set_cancelling(conn: Conn, job_id: int, reason: str) -> str | None:
    async with conn.transaction():
        old = await conn.fetchval(
            "SELECT state FROM ai_model_endpoint_jobs WHERE endpoint_job_id = $1 FOR UPDATE", job_id)
        if old is None or old in ("ended", "failed"):
            return None
        await conn.execute(
            """UPDATE ai_model_endpoint_jobs
                  SET state = 'cancelling', cancel_requested_at = now(),
                      state_reason = CASE WHEN state = 'cancelling' THEN state_reason ELSE $2 END
                WHERE endpoint_job_id = $1""",
            job_id, reason,
        )
        await conn.execute("UPDATE ai_model_endpoints SET draining = true WHERE endpoint_job_id = $1", job_id)
    return str(old)


class FailurePolicy(msgspec.Struct, frozen=True, kw_only=True):
    max_failures: int = 3
    backoff_base_s: float = 10.0
    backoff_max_s: float = 600.0

    def backoff_s(self, failures: int) -> float:
        return ceiling(self.backoff_base_s, self.backoff_max_s, failures - 1)


async def finish_job(conn: Conn, job_id: int, state: str, reason: str, *, failure: bool,
                     policy: FailurePolicy) -> tuple[str | None, str | None]:
    """End a job; returns (its previous state or None if already final, the model's new state if
    this failure marked it failed)."""
    async with conn.transaction():
        row = await conn.fetchrow(
            """UPDATE ai_model_endpoint_jobs j
                  SET state = $2, state_reason = $3, ended_at = now()
                 FROM ai_model_endpoint_jobs old
                WHERE j.endpoint_job_id = $1 AND old.endpoint_job_id = j.endpoint_job_id
                  AND j.state NOT IN ('ended', 'failed')
               RETURNING old.state AS old_state, j.model_id""",
            job_id, state, reason[:4000],
        )
        if row is None:
            return None, None
        await conn.execute("DELETE FROM ai_model_endpoints WHERE endpoint_job_id = $1", job_id)
        if not failure:
            return str(row["old_state"]), None
        failures: int = await conn.fetchval(
            """UPDATE ai_model_configurations SET consecutive_failures = consecutive_failures + 1
                WHERE model_id = $1 RETURNING consecutive_failures""",
            row["model_id"],
        )
        retry_at = datetime.now(UTC) + timedelta(seconds=policy.backoff_s(failures))
        await conn.execute("UPDATE ai_model_configurations SET retry_not_before = $2 WHERE model_id = $1",
                           row["model_id"], retry_at)
        if failures >= policy.max_failures:
            changed = await conn.fetchval(
                """UPDATE ai_model_configurations
                      SET state = 'failed', updated_at = now(),
                          state_reason = $2
                    WHERE model_id = $1 AND state = 'active' RETURNING true""",
                row["model_id"], f"{failures} job starts failed in a row; last: {reason}"[:4000],
            )
            return str(row["old_state"]), "failed" if changed else None
        return str(row["old_state"]), None


async def fail_model(conn: Conn, model_id: int, reason: str) -> bool:
    done = await conn.fetchval(
        """UPDATE ai_model_configurations SET state = 'failed', state_reason = $2, updated_at = now()
            WHERE model_id = $1 AND state = 'active' RETURNING true""",
        model_id, reason[:4000],
    )
    return bool(done)


async def reset_failures(conn: Conn, model_id: int) -> None:
    await conn.execute(
        """UPDATE ai_model_configurations SET consecutive_failures = 0, retry_not_before = NULL
            WHERE model_id = $1 AND (consecutive_failures <> 0 OR retry_not_before IS NOT NULL)""",
        model_id,
    )
