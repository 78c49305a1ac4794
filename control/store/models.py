"""Model configurations and their aliases (admin API).

Invariants: names and aliases share one namespace (an alias may not be any model's name nor
another model's alias; checked under a table lock so two writers cannot both pass the check);
``generation`` is bumped whenever the launch configuration (engine args, template, resources,
max_model_len) changes, so the Job Worker replaces jobs of an older generation; ``drain`` sets
state ``draining`` (the Job Worker treats it as zero desired instances and the published
table marks its endpoints draining); ``state: active`` undoes a drain and clears ``failed``.
A launch configuration is written only after the caller's :class:`LaunchCheck` accepted it
(the whole configuration, as it will be after the change), so what is stored renders.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import asyncpg
import msgspec
from msgspec import UNSET

from control.store.db import ConflictError, Conn, Database, InvalidError, NotFoundError, found, restated
from control.wire import Model, ModelCreate, ModelUpdate

_SELECT = """
SELECT m.model_id, m.name, m.engine_args, m.slurm_template, m.slurm_resources, m.min_instances,
       m.max_instances, m.desired_instances, m.startup_timeout_s, m.max_model_len, m.state,
       m.state_reason, m.generation, m.created_at, m.updated_at,
       coalesce((SELECT array_agg(a.alias ORDER BY a.alias) FROM ai_model_aliases a
                  WHERE a.model_id = m.model_id), '{}') AS aliases,
       (SELECT count(*) FROM ai_model_endpoint_jobs j
         WHERE j.model_id = m.model_id AND j.state NOT IN ('ended', 'failed'))::int AS live_jobs,
       (SELECT count(*) FROM ai_model_endpoints e JOIN ai_model_endpoint_jobs j USING (endpoint_job_id)
         WHERE e.model_id = m.model_id AND e.ready_at IS NOT NULL
           AND j.state NOT IN ('ended', 'failed'))::int AS ready_endpoints
  FROM ai_model_configurations m
"""

_LAUNCH_FIELDS = ("engine_args", "slurm_template", "slurm_resources", "max_model_len")
_JSON_FIELDS = ("engine_args", "slurm_resources")
_json_decode = msgspec.json.Decoder()


@runtime_checkable  # Litestar checks dependency values against their declared type
class LaunchCheck(Protocol):
    """Refuses (raises) a launch configuration the Job Worker could not render."""

    def __call__(self, name: str, template: str, resources: Mapping[str, object],
                 engine_args: Sequence[str]) -> None: ...


def _model(row: asyncpg.Record) -> Model:
    doc = dict(row)
    for field in _JSON_FIELDS:
        doc[field] = _json_decode.decode(doc[field])
    return msgspec.convert(doc, Model, from_attributes=False, strict=False)


def _check_counts(min_i: int, max_i: int, desired: int) -> None:
    if max_i < min_i:
        raise InvalidError(f"max_instances={max_i} is below min_instances={min_i}")
    if not min_i <= desired <= max_i:
        hint = "raise max_instances" if desired > max_i else "lower min_instances"
        hint = f" ({hint} in the same change)"
        raise InvalidError(f"desired_instances={desired} is not between min_instances={min_i} "
                           f"and max_instances={max_i}{hint}")


async def _set_aliases(conn: Conn, model_id: int, name: str, aliases: list[str]) -> None:
    if name in aliases:
        raise InvalidError(f"alias {name!r} is the model's own name")
    # Share-row-exclusive: concurrent alias/name writers serialize; readers are not blocked.
    await conn.execute("LOCK TABLE ai_model_aliases IN SHARE ROW EXCLUSIVE MODE")
    taken = await conn.fetchval(
        "SELECT name FROM ai_model_configurations WHERE name = ANY($1::text[]) AND model_id <> $2 LIMIT 1",
        aliases,
        model_id,
    )
    if taken is not None:
        raise ConflictError(f"alias {taken!r} is the name of another model")
    await conn.execute("DELETE FROM ai_model_aliases WHERE model_id = $1", model_id)
    await conn.executemany(
        "INSERT INTO ai_model_aliases (alias, model_id) VALUES ($1, $2)",
        [(alias, model_id) for alias in dict.fromkeys(aliases)],
    )


async def create_model(db: Database, req: ModelCreate, check: LaunchCheck) -> Model:
    _check_counts(req.min_instances, req.max_instances, req.desired_instances)
    check(req.name, req.slurm_template, req.slurm_resources, req.engine_args)
    try:
        async with db.transaction() as conn:
            await conn.execute("LOCK TABLE ai_model_aliases IN SHARE ROW EXCLUSIVE MODE")
            if await conn.fetchval("SELECT 1 FROM ai_model_aliases WHERE alias = $1", req.name):
                raise ConflictError(f"{req.name!r} is already an alias of another model")
            model_id = await conn.fetchval(
                """INSERT INTO ai_model_configurations
                       (name, engine_args, slurm_template, slurm_resources, min_instances, max_instances,
                        desired_instances, startup_timeout_s, max_model_len)
                   VALUES ($1, $2::jsonb, $3, $4::jsonb, $5, $6, $7, $8, $9) RETURNING model_id""",
                req.name,
                msgspec.json.encode(req.engine_args).decode(),
                req.slurm_template,
                msgspec.json.encode(req.slurm_resources).decode(),
                req.min_instances,
                req.max_instances,
                req.desired_instances,
                req.startup_timeout_s,
                req.max_model_len,
            )
            await _set_aliases(conn, model_id, req.name, req.aliases)
            return _model(found(await conn.fetchrow(_SELECT + " WHERE m.model_id = $1", model_id), "row"))
    except ConflictError as exc:
        message = f"model {req.name!r} already exists"
        raise restated(exc, "ai_model_configurations_name_key", message) from None


async def list_models(db: Database) -> list[Model]:
    async with db.transaction() as conn:
        return [_model(r) for r in await conn.fetch(_SELECT + " ORDER BY m.name")]


async def get_model(db: Database, name: str) -> Model:
    async with db.transaction() as conn:
        row = await conn.fetchrow(_SELECT + " WHERE m.name = $1", name)
    if row is None:
        raise NotFoundError(f"no model {name!r}")
    return _model(found(row, "row"))


async def update_model(db: Database, name: str, req: ModelUpdate, check: LaunchCheck | None = None) -> Model:
    """``check`` is required when ``req`` changes the launch configuration."""
    async with db.transaction() as conn:
        row = await conn.fetchrow(
            """SELECT model_id, min_instances, max_instances, desired_instances, slurm_template,
                      slurm_resources, engine_args
                 FROM ai_model_configurations WHERE name = $1 FOR UPDATE""",
            name,
        )
        if row is None:
            raise NotFoundError(f"no model {name!r}")
        fields = (
            "engine_args",
            "slurm_template",
            "slurm_resources",
            "min_instances",
            "max_instances",
            "desired_instances",
            "startup_timeout_s",
            "max_model_len",
            "state",
        )
        changes = {f: v for f in fields if (v := getattr(req, f)) is not UNSET}
        _check_counts(
            changes.get("min_instances", row["min_instances"]),
            changes.get("max_instances", row["max_instances"]),
            changes.get("desired_instances", row["desired_instances"]),
        )
        if any(f in changes for f in _LAUNCH_FIELDS):
            if check is None:
                raise TypeError("update_model: a launch configuration change needs a LaunchCheck")
            check(name, changes.get("slurm_template", row["slurm_template"]),
                  changes.get("slurm_resources", _json_decode.decode(row["slurm_resources"])),
                  changes.get("engine_args", _json_decode.decode(row["engine_args"])))
        if changes:
            sets, args = [], []
            for i, (field, value) in enumerate(changes.items(), start=2):
                if field in _JSON_FIELDS:
                    sets.append(f"{field} = ${i}::jsonb")
                    args.append(msgspec.json.encode(value).decode())
                else:
                    sets.append(f"{field} = ${i}")
                    args.append(value)
            if "state" in changes:
                sets.append("state_reason = NULL")
            if changes.get("state") == "active":  # a fresh start: the Job Worker's failure count (0600)
                sets += ["consecutive_failures = 0", "retry_not_before = NULL"]
            if any(f in changes for f in _LAUNCH_FIELDS):
                sets.append("generation = generation + 1")
            await conn.execute(
                f"UPDATE ai_model_configurations SET {', '.join(sets)}, updated_at = now()"
                " WHERE model_id = $1",
                row["model_id"],
                *args,
            )
        if req.aliases is not UNSET:
            await _set_aliases(conn, row["model_id"], name, req.aliases)
        return _model(found(await conn.fetchrow(_SELECT + " WHERE m.model_id = $1", row["model_id"]), "row"))


async def delete_model(db: Database, name: str) -> Model:
    """Delete a model with no live job, with its aliases and the rows of its ended jobs.

    A model with a job not yet ended or failed is refused (409): its instances would keep running
    unmanaged; scaling it to zero (or draining it) and waiting for its jobs to end comes first."""
    async with db.transaction() as conn:
        model = _model(found(await conn.fetchrow(_SELECT + " WHERE m.name = $1 FOR UPDATE OF m", name),
                             f"model {name!r}"))
        if model.live_jobs:
            # the row lock makes a job the Job Worker inserts meanwhile wait, then fail its foreign key
            raise ConflictError(f"model {name!r} still has {model.live_jobs} live job(s); scale it to 0 or "
                                "drain it and wait for its jobs to end (hpcgate admin job list --model NAME)")
        # ended jobs' endpoints go with them (ON DELETE CASCADE), aliases with the model
        await conn.execute("DELETE FROM ai_model_endpoint_jobs WHERE model_id = $1", model.model_id)
        await conn.execute("DELETE FROM ai_model_configurations WHERE model_id = $1", model.model_id)
    return model


async def drain_model(db: Database, name: str) -> Model:
    return await update_model(db, name, ModelUpdate(state="draining"))
