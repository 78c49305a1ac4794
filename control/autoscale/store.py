"""The autoscaler's reads and writes in PostgreSQL.

Invariants: a desired count is changed only by a compare-and-set (``WHERE desired_instances =
<the count the decision saw> AND state = 'active'``), so an operator's concurrent change or a
drain wins and the decision is dropped, not applied on top; the change and its history row
commit together; the history keeps at most ``keep`` rows per model (older ones are trimmed
in the same transaction).
"""

from __future__ import annotations

import msgspec

from control.autoscale.policy import PolicyConfig, Signals
from control.autoscale.signals import Endpoint, ModelObservation
from control.store.db import Conn

_json = msgspec.json.Encoder()
_decode_policy = msgspec.json.Decoder(dict[str, object])

_MODELS = """
SELECT m.model_id, m.name, m.min_instances, m.max_instances, m.desired_instances,
       coalesce(s.policy, '{}'::jsonb) AS policy, s.schedule,
       coalesce((SELECT array_agg(a.alias) FROM ai_model_aliases a WHERE a.model_id = m.model_id),
                '{}') AS aliases,
       coalesce((SELECT array_agg(ARRAY[e.endpoint_id::text, e.node, e.port::text, e.bearer_token]
                                  ORDER BY e.endpoint_id)
                   FROM ai_model_endpoints e JOIN ai_model_endpoint_jobs j USING (endpoint_job_id)
                  WHERE e.model_id = m.model_id AND e.ready_at IS NOT NULL AND NOT e.draining
                    AND j.state = 'ready'), '{}') AS ready,
       (SELECT count(*) FROM ai_model_endpoint_jobs j
         WHERE j.model_id = m.model_id AND j.state IN ('pending', 'submitted', 'registered'))::int AS pending,
       (SELECT extract(epoch FROM now() - min(j.created_at)) FROM ai_model_endpoint_jobs j
         WHERE j.model_id = m.model_id AND j.state IN ('pending', 'submitted', 'registered'))::float8
         AS oldest_pending_s,
       (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY r.start_s) FROM
          (SELECT extract(epoch FROM j.ready_at - j.created_at) AS start_s FROM ai_model_endpoint_jobs j
            WHERE j.model_id = m.model_id AND j.ready_at IS NOT NULL
            ORDER BY j.endpoint_job_id DESC LIMIT 10) r)::float8 AS expected_start_s
  FROM ai_model_configurations m LEFT JOIN ai_model_autoscaling s USING (model_id)
 WHERE m.state = 'active'
 ORDER BY m.model_id
"""


class ModelRow(msgspec.Struct, frozen=True, kw_only=True):
    model_id: int
    name: str
    aliases: tuple[str, ...]
    min_instances: int
    max_instances: int
    desired: int
    policy: dict[str, object]  # per-model overrides of PolicyConfig fields
    schedule: str | None
    observation: ModelObservation


def policy_config(defaults: PolicyConfig, row: ModelRow) -> PolicyConfig:
    """Settings' defaults, then the model's overrides, then its min/max (an unknown or
    malformed override is ignored here: the admin API validates what it stores)."""
    fields = set(PolicyConfig.__struct_fields__) - {"min_instances", "max_instances"}
    merged = {f: getattr(defaults, f) for f in PolicyConfig.__struct_fields__}
    merged.update({k: v for k, v in row.policy.items() if k in fields})
    merged.update(min_instances=row.min_instances, max_instances=row.max_instances)
    try:
        return msgspec.convert(merged, PolicyConfig)
    except msgspec.ValidationError:
        return msgspec.structs.replace(
            defaults, min_instances=row.min_instances, max_instances=row.max_instances
        )


async def active_models(conn: Conn) -> list[ModelRow]:
    rows = []
    for r in await conn.fetch(_MODELS):
        ready = tuple(Endpoint(int(e[0]), e[1], int(e[2]), e[3]) for e in r["ready"])
        obs = ModelObservation(ready=ready, pending=r["pending"], oldest_pending_s=r["oldest_pending_s"],
                               expected_start_s=r["expected_start_s"])
        rows.append(
            ModelRow(
                model_id=r["model_id"],
                name=r["name"],
                aliases=tuple(r["aliases"]),
                min_instances=r["min_instances"],
                max_instances=r["max_instances"],
                desired=r["desired_instances"],
                policy=_decode_policy.decode(r["policy"]),
                schedule=r["schedule"],
                observation=obs,
            )
        )
    return rows


async def apply_decision(
    conn: Conn,
    model_id: int,
    from_n: int,
    to_n: int,
    *,
    reason: str,
    source: str,
    detail: str,
    signals: Signals | None,
    keep: int,
) -> bool:
    """Set desired ``from_n`` → ``to_n`` and record it; False if the row moved meanwhile."""
    async with conn.transaction():
        done = await conn.fetchval(
            """UPDATE ai_model_configurations SET desired_instances = $3, updated_at = now()
                WHERE model_id = $1 AND desired_instances = $2 AND state = 'active'
                  AND $3 BETWEEN min_instances AND max_instances
            RETURNING true""",
            model_id,
            from_n,
            to_n,
        )
        if not done:
            return False
        await conn.execute(
            """INSERT INTO ai_model_scaling_decisions
                   (model_id, from_instances, to_instances, reason, source, detail, signals)
               VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)""",
            model_id,
            from_n,
            to_n,
            reason,
            source,
            detail,
            None if signals is None else _json.encode(signals).decode(),
        )
        await conn.execute(
            """INSERT INTO ai_model_autoscaling AS s (model_id, decision_counts)
               VALUES ($1, jsonb_build_object($2::text, 1))
               ON CONFLICT (model_id) DO UPDATE SET decision_counts = s.decision_counts
                   || jsonb_build_object($2::text, coalesce((s.decision_counts ->> $2)::bigint, 0) + 1)""",
            model_id,
            f"{source}:{reason}",
        )
        await conn.execute(
            """DELETE FROM ai_model_scaling_decisions WHERE model_id = $1 AND decision_id <
                   (SELECT decision_id FROM ai_model_scaling_decisions WHERE model_id = $1
                     ORDER BY decision_id DESC OFFSET $2 LIMIT 1)""",
            model_id,
            keep - 1,
        )
    return True


async def record_status(
    conn: Conn, model_id: int, signals: Signals, *, hold: str | None, detail: str, pending_overdue: bool
) -> None:
    """The last observation of a model, for the admin API and the control API's metrics."""
    await conn.execute(
        """INSERT INTO ai_model_autoscaling (model_id, observed_at, signals, hold, detail, pending_overdue)
           VALUES ($1, now(), $2::jsonb, $3, $4, $5)
           ON CONFLICT (model_id) DO UPDATE SET observed_at = now(), signals = EXCLUDED.signals,
               hold = EXCLUDED.hold, detail = EXCLUDED.detail, pending_overdue = EXCLUDED.pending_overdue""",
        model_id,
        _json.encode(signals).decode(),
        hold,
        detail,
        pending_overdue,
    )
