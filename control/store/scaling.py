"""Autoscaling through the admin API: a model's scaling view, policy overrides and schedule.

The autoscaler (control/autoscale/) writes the observations and decisions; this module only
reads them, and writes the per-model overrides (``ai_model_autoscaling.policy``, migration 0700),
which the autoscaler merges over its defaults on its next pass, and the schedule. Overrides are
validated by :class:`control.wire.ScalingPolicy` before they are stored (``null`` removes one); a
schedule is parsed before it is stored, and one that does not parse is refused (422) with the
parser's reason, nothing changed.
"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
from msgspec import UNSET

from control.autoscale.schedule import ScheduleError
from control.autoscale.schedule import parse as parse_schedule
from control.store.db import Database, InvalidError, NotFoundError
from control.wire import ModelScaling, ScalingDecision, ScalingPolicy, ScheduleUpdate

_decode = msgspec.json.Decoder()
_encode = msgspec.json.Encoder()

_VIEW = """
SELECT m.model_id, m.name, m.state, m.min_instances, m.desired_instances, m.max_instances,
       (SELECT count(*) FROM ai_model_endpoints e JOIN ai_model_endpoint_jobs j USING (endpoint_job_id)
         WHERE e.model_id = m.model_id AND e.ready_at IS NOT NULL AND NOT e.draining
           AND j.state = 'ready')::int AS ready_endpoints,
       (SELECT count(*) FROM ai_model_endpoint_jobs j
         WHERE j.model_id = m.model_id
           AND j.state IN ('pending', 'submitted', 'registered'))::int AS pending_jobs,
       coalesce(s.policy, '{}'::jsonb) AS policy, s.schedule, s.observed_at, s.hold, s.detail,
       coalesce(s.pending_overdue, false) AS pending_overdue, s.signals
  FROM ai_model_configurations m LEFT JOIN ai_model_autoscaling s USING (model_id)
 WHERE m.name = $1
"""
_DECISIONS = """
SELECT decided_at, from_instances, to_instances, reason, source, detail
  FROM ai_model_scaling_decisions WHERE model_id = $1 ORDER BY decision_id DESC LIMIT $2
"""


_RECENT = """
SELECT m.name AS model, d.decided_at, d.from_instances, d.to_instances, d.reason, d.source, d.detail
  FROM ai_model_scaling_decisions d JOIN ai_model_configurations m USING (model_id)
 ORDER BY d.decision_id DESC LIMIT $1
"""


async def recent_decisions(db: Database, limit: int = 20) -> list[tuple[str, ScalingDecision]]:
    """The latest desired-count changes of every model, newest first: (model, decision)."""
    async with db.transaction() as conn:
        rows = await conn.fetch(_RECENT, limit)
    return [(r["model"], ScalingDecision(**{k: v for k, v in dict(r).items() if k != "model"})) for r in rows]


async def get_scaling(db: Database, name: str, limit: int = 50) -> ModelScaling:
    async with db.transaction() as conn:
        row = await conn.fetchrow(_VIEW, name)
        if row is None:
            raise NotFoundError(f"no model {name!r}")
        decisions = [ScalingDecision(**dict(r)) for r in await conn.fetch(_DECISIONS, row["model_id"], limit)]
    doc = dict(row)
    del doc["model_id"]
    doc["model"] = doc.pop("name")
    doc["policy"] = _decode.decode(doc["policy"])
    signals = _decode.decode(doc["signals"]) if doc["signals"] else None
    if signals is not None:
        signals.pop("now", None)  # the autoscaler's monotonic clock: meaningless here
    doc["signals"] = signals
    try:
        schedule = parse_schedule(doc["schedule"] or "")
    except ScheduleError:  # written around the API: the autoscaler ignores it too
        schedule = parse_schedule("")
    limits = schedule.limits(datetime.now(UTC), doc["min_instances"], doc["max_instances"])
    doc.update(
        schedule_rule=limits.rule, effective_min=limits.min_instances, effective_max=limits.max_instances
    )
    return msgspec.convert({**doc, "decisions": decisions}, ModelScaling, from_attributes=True)


async def set_policy(db: Database, name: str, req: ScalingPolicy) -> ModelScaling:
    """Merge ``req`` into the model's overrides (a ``null`` field removes that override)."""
    changes = {f: v for f in req.__struct_fields__ if (v := getattr(req, f)) is not UNSET}
    async with db.transaction() as conn:
        model_id = await conn.fetchval(
            "SELECT model_id FROM ai_model_configurations WHERE name = $1 FOR UPDATE", name
        )
        if model_id is None:
            raise NotFoundError(f"no model {name!r}")
        current = await conn.fetchval("SELECT policy FROM ai_model_autoscaling WHERE model_id = $1", model_id)
        policy = _decode.decode(current) if current else {}
        for field, value in changes.items():
            if value is None:
                policy.pop(field, None)
            else:
                policy[field] = value
        await conn.execute(
            """INSERT INTO ai_model_autoscaling (model_id, policy) VALUES ($1, $2::jsonb)
               ON CONFLICT (model_id) DO UPDATE SET policy = EXCLUDED.policy, updated_at = now()""",
            model_id,
            _encode.encode(policy).decode(),
        )
    return await get_scaling(db, name)


async def set_schedule(db: Database, name: str, req: ScheduleUpdate) -> ModelScaling:
    text = (req.schedule or "").strip() or None
    if text is not None:
        try:
            parse_schedule(text)
        except ScheduleError as exc:
            raise InvalidError(f"schedule: {exc}") from None
    async with db.transaction() as conn:
        model_id = await conn.fetchval(
            "SELECT model_id FROM ai_model_configurations WHERE name = $1 FOR UPDATE", name
        )
        if model_id is None:
            raise NotFoundError(f"no model {name!r}")
        await conn.execute(
            """INSERT INTO ai_model_autoscaling (model_id, schedule) VALUES ($1, $2)
               ON CONFLICT (model_id) DO UPDATE SET schedule = EXCLUDED.schedule, updated_at = now()""",
            model_id,
            text,
        )
    return await get_scaling(db, name)
