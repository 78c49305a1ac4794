"""Rendering admin API answers for people: aligned tables for lists, ``field value`` lines for one object."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import msgspec

from control.wire import (
    ApiKey,
    Endpoint,
    Job,
    JurorSpec,
    KeyCreated,
    Model,
    ModelLimitSpec,
    Tenant,
    Tribunal,
    Usage,
)

_COLUMNS: dict[type, tuple[str, ...]] = {
    Tenant: (
        "name",
        "enabled",
        "allowed_models",
        "max_concurrent_requests",
        "tokens_per_minute",
        "monthly_token_quota",
        "model_limits",
        "active_keys",
    ),
    ApiKey: ("key_id", "tenant", "prefix", "active", "expires_at", "revoked_at", "description"),
    Model: (
        "name",
        "aliases",
        "state",
        "min_instances",
        "desired_instances",
        "max_instances",
        "live_jobs",
        "ready_endpoints",
        "generation",
        "slurm_template",
    ),
    Tribunal: ("model", "jurors", "judge", "fallback_judge", "rounds", "quorum", "peer_review", "deadline_s"),
    Job: ("endpoint_job_id", "model", "state", "launcher", "launcher_job_id", "node", "port", "state_reason"),
    Endpoint: (
        "endpoint_id",
        "endpoint_job_id",
        "model",
        "url",
        "job_state",
        "ready_at",
        "draining",
        "consecutive_failures",
    ),
}


# ----------------------------------------------------------------------------- rendering


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%SZ")
    if isinstance(value, JurorSpec):
        return value.model if value.temperature is None else f"{value.model}@{value.temperature:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(_cell, value)) or "-"
    if isinstance(value, ModelLimitSpec):  # concurrent=2/tpm=5000
        pairs = (("concurrent", value.max_concurrent_requests), ("tpm", value.tokens_per_minute))
        return "/".join(f"{name}={v}" for name, v in pairs if v is not None) or "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={_cell(v) if isinstance(v, ModelLimitSpec) else v}"
                        for k, v in value.items()) or "-"
    return str(value)


def render_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _render_usage(value: Usage) -> str:
    cols: tuple[str, ...] = ("tenant", "model", "requests", "errors", "prompt_tokens", "completion_tokens")
    if value.period != "total":
        cols = ("period_start", *cols)
    out = f"usage from {_cell(value.since)} to {_cell(value.until)}\n"
    if value.rows:
        out += render_table(cols, [[getattr(r, c) for c in cols] for r in value.rows])
    else:
        out += "(none)"
    if value.quotas:
        qcols = ("tenant", "monthly_token_quota", "used", "left")
        out += f"\n\nmonthly quotas (month from {_cell(value.quotas[0].month_start)})\n"
        out += render_table(qcols, [[getattr(q, c) for c in qcols] for q in value.quotas])
    return out


def render(value: object) -> str:
    if isinstance(value, list):
        if not value:
            return "(none)"
        cols = _COLUMNS[type(value[0])]
        return render_table(cols, [[getattr(v, c) for c in cols] for v in value])
    if isinstance(value, KeyCreated):
        return f"key: {value.key}\n(store it now: it is shown only once)\n\n" + render([value.api_key])
    if isinstance(value, Usage):
        return _render_usage(value)
    fields = msgspec.structs.asdict(value)  # type: ignore[arg-type]
    width = max(len(k) for k in fields)
    return "\n".join(f"{k.ljust(width)}  {_cell(v)}" for k, v in fields.items())
