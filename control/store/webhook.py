"""The paper's alert webhook (``POST /hooks/grafana``): Grafana alerts move desired counts.

A firing alert with ``labels.model`` (a model's name or alias) and ``labels.action``
(``scale_up``, the default, or ``scale_down``) moves that model's desired count by one, through
the same limits as the built-in autoscaler: the model's min and max narrowed by its schedule,
and a cooldown after any change (the model's ``cooldown_s`` override, else the API's
``webhook_cooldown_s``). Applied changes go into the same history (source ``webhook``). A
resolved alert changes nothing (scaling back down is the autoscaler's stabilised rule, or a
``scale_down`` alert); it is acknowledged.

Invariants: the whole notification is one transaction, checked before anything is written: an
unknown model or action refuses the notification (404/422 naming it) with nothing changed.
Idempotent per alert: (fingerprint, startsAt, status) is handled once; Grafana's repeats of a
notification answer ``duplicate`` and change nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from control.autoscale.schedule import ScheduleError
from control.autoscale.schedule import parse as parse_schedule
from control.autoscale.store import apply_decision
from control.store.db import Conn, Database, InvalidError, NotFoundError
from control.wire import GrafanaAlert, GrafanaWebhook, WebhookOutcome, WebhookResult

ACTIONS = {"scale_up": 1, "scale_down": -1}
_decode = msgspec.json.Decoder()

_MODEL = """
SELECT m.model_id, m.name, m.state, m.min_instances, m.max_instances, m.desired_instances,
       s.policy, s.schedule,
       (SELECT EXTRACT(EPOCH FROM now() - max(d.decided_at)) FROM ai_model_scaling_decisions d
         WHERE d.model_id = m.model_id)::float8 AS since_change_s
  FROM ai_model_configurations m LEFT JOIN ai_model_autoscaling s USING (model_id)
 WHERE m.name = $1 OR m.model_id = (SELECT model_id FROM ai_model_aliases WHERE alias = $1)
 FOR UPDATE OF m
"""


def _target(alert: GrafanaAlert) -> tuple[str, str]:
    model = alert.labels.get("model")
    if not model:
        raise InvalidError(f"alert {alert.fingerprint}: no 'model' label naming the model to scale")
    action = alert.labels.get("action", "scale_up")
    if action not in ACTIONS:
        raise InvalidError(
            f"alert {alert.fingerprint}: label action={action!r} is not one of {', '.join(ACTIONS)}"
        )
    return model, action


async def handle(db: Database, hook: GrafanaWebhook, cooldown_s: float, keep: int) -> WebhookResult:
    targets = [_target(a) for a in hook.alerts]
    out: list[WebhookOutcome] = []
    async with db.transaction() as conn:
        for (model, _), alert in zip(targets, hook.alerts, strict=True):
            if (
                await conn.fetchval(
                    "SELECT 1 FROM ai_model_configurations WHERE name = $1 UNION ALL "
                    "SELECT 1 FROM ai_model_aliases WHERE alias = $1 LIMIT 1",
                    model,
                )
                is None
            ):
                raise NotFoundError(f"alert {alert.fingerprint}: no model {model!r}")
        await conn.execute(
            "DELETE FROM ai_autoscaler_webhook_events WHERE received_at < now() - interval '7 days'"
        )
        for (model, action), alert in zip(targets, hook.alerts, strict=True):
            outcome = await _one(conn, alert, model, action, cooldown_s=cooldown_s, keep=keep)
            out.append(
                WebhookOutcome(
                    fingerprint=alert.fingerprint,
                    model=model,
                    action=action,
                    status=alert.status,
                    outcome=outcome,
                )
            )
    return WebhookResult(alerts=out)


async def _one(
    conn: Conn, alert: GrafanaAlert, model: str, action: str, *, cooldown_s: float, keep: int
) -> str:
    new = await conn.fetchval(
        """INSERT INTO ai_autoscaler_webhook_events (fingerprint, starts_at, status, model, outcome)
           VALUES ($1, $2, $3, $4, '') ON CONFLICT DO NOTHING RETURNING true""",
        alert.fingerprint,
        alert.starts_at,
        alert.status,
        model,
    )
    if not new:
        return "duplicate"
    outcome = (
        "resolved: no change"
        if alert.status == "resolved"
        else await _apply(conn, alert, model, action, cooldown_s=cooldown_s, keep=keep)
    )
    await conn.execute(
        "UPDATE ai_autoscaler_webhook_events SET outcome = $4 WHERE fingerprint = $1 AND starts_at = $2 "
        "AND status = $3",
        alert.fingerprint,
        alert.starts_at,
        alert.status,
        outcome,
    )
    return outcome


async def _apply(
    conn: Conn, alert: GrafanaAlert, model: str, action: str, *, cooldown_s: float, keep: int
) -> str:
    row = await conn.fetchrow(_MODEL, model)
    if row is None:  # deleted since the check above
        raise NotFoundError(f"alert {alert.fingerprint}: no model {model!r}")
    if row["state"] != "active":
        return f"not changed: model is {row['state']}"
    lo, hi = row["min_instances"], row["max_instances"]
    if row["schedule"]:
        try:
            limits = parse_schedule(row["schedule"]).limits(datetime.now(UTC), lo, hi)
            lo, hi = limits.min_instances, limits.max_instances
        except ScheduleError:
            pass  # written around the API; the autoscaler ignores it as well
    policy = _decode.decode(row["policy"]) if row["policy"] else {}
    cooldown = policy.get("cooldown_s", cooldown_s)
    desired = row["desired_instances"]
    to = desired + ACTIONS[action]
    if to > hi:
        return f"not changed: at max ({hi})"
    if to < lo:
        return f"not changed: at min ({lo})"
    since = row["since_change_s"]
    if since is not None and since < cooldown:
        return f"not changed: cooldown ({since:.0f} s of {cooldown:g} s since the last change)"
    name = alert.labels.get("alertname", "")
    detail = f"grafana alert {name!r} ({alert.fingerprint}) firing since {alert.starts_at or '?'}: {action}"
    applied = await apply_decision(
        conn,
        row["model_id"],
        desired,
        to,
        reason="webhook_firing",
        source="webhook",
        detail=detail[:1000],
        signals=None,
        keep=keep,
    )
    return f"applied {desired} -> {to}" if applied else "not changed: the model changed meanwhile"
