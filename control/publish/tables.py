"""Building the published tables from database rows: pure functions, no I/O.

Rules of the endpoint table:
- an endpoint is listed once it has answered a probe (``ready_at`` set) and while its job is
  live (not ``ended``/``failed``);
- ``ready`` (routable unless draining) while it has failed fewer than ``unroutable_after``
  consecutive probes;
- ``draining`` when the endpoint, its job (``draining``/``cancelling``) or its model
  (``draining``) is being drained: it finishes in-flight requests, gets no new ones;
- a model is ``ready`` with at least one ready, non-draining endpoint, else ``failed`` if the
  Job Worker marked it so, else ``starting`` while instances are wanted, else ``stopped``.

Tribunals are published as stored (validated by the admin API when written); a row that no
longer decodes is left out (logged), never published half-read.

Rules of the key table: enabled tenants only; keys neither revoked nor expired at build time
and belonging to an enabled tenant (the gateway enforces a later ``expires_at`` itself).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

import msgspec

from hpcgate.logs import get_logger
from hpcgate.schemas import (
    ApiKeyEntry,
    EndpointEntry,
    EndpointTable,
    KeyTable,
    ModelEntry,
    ModelLimit,
    ModelState,
    TenantEntry,
    TribunalEntry,
)

log = get_logger("hpcgate.control.publish")


@dataclass(frozen=True, slots=True)
class ModelRow:
    name: str
    aliases: tuple[str, ...]
    state: str  # admin state: active | draining | failed
    state_reason: str | None
    desired_instances: int
    max_model_len: int | None


@dataclass(frozen=True, slots=True)
class EndpointRow:
    endpoint_id: int
    endpoint_job_id: int
    model: str
    node: str
    port: int
    launcher_job_id: str | None
    bearer_token: str
    consecutive_failures: int
    draining: bool  # endpoint, job or model draining


@dataclass(frozen=True, slots=True)
class TribunalRow:
    name: str
    config: str  # the JSON document of migration 0900


@dataclass(frozen=True, slots=True)
class TenantRow:
    tenant_id: int
    name: str
    allowed_models: tuple[str, ...] | None
    max_concurrent_requests: int | None
    tokens_per_minute: int | None
    model_limits: dict[str, ModelLimit] = field(default_factory=dict)
    monthly_token_quota: int | None = None


@dataclass(frozen=True, slots=True)
class KeyRow:
    key_hash: bytes
    prefix: str
    tenant_id: int
    expires_at: datetime | None


def endpoint_url(node: str, port: int) -> str:
    return f"http://{node}:{port}"


def build_endpoint_table(
    models: Iterable[ModelRow],
    endpoints: Iterable[EndpointRow],
    *,
    unroutable_after: int,
    version: int = 0,
    generated_at: float = 0.0,
    tribunals: Iterable[TribunalRow] = (),
) -> EndpointTable:
    entries = tuple(
        EndpointEntry(
            endpoint_id=e.endpoint_id,
            model=e.model,
            url=endpoint_url(e.node, e.port),
            node=e.node,
            port=e.port,
            endpoint_job_id=e.endpoint_job_id,
            launcher_job_id=e.launcher_job_id,
            bearer_token=e.bearer_token,
            ready=e.consecutive_failures < unroutable_after,
            draining=e.draining,
        )
        for e in sorted(endpoints, key=lambda e: e.endpoint_id)
    )
    serving = {e.model for e in entries if e.ready and not e.draining}
    model_entries = tuple(
        ModelEntry(
            name=m.name,
            aliases=m.aliases,
            state=_model_state(m, m.name in serving),
            reason=_model_reason(m),
            max_model_len=m.max_model_len,
        )
        for m in sorted(models, key=lambda m: m.name)
    )
    return EndpointTable(version=version, generated_at=generated_at, models=model_entries, endpoints=entries,
                         tribunals=tuple(_tribunal_entries(tribunals)))


def _tribunal_entries(rows: Iterable[TribunalRow]) -> Iterable[TribunalEntry]:
    for row in sorted(rows, key=lambda r: r.name):
        try:
            doc = msgspec.json.decode(row.config)
            doc["name"] = row.name
            yield msgspec.convert(doc, TribunalEntry)
        except (msgspec.DecodeError, msgspec.ValidationError, TypeError) as exc:
            log.error("tribunal_unpublishable", tribunal=row.name, error=str(exc))


def _model_reason(model: ModelRow) -> str | None:
    """Why a model may have no instance, for the gateway's 503: the failure, a drain, zero wanted."""
    if model.state == "failed":
        return model.state_reason
    if model.state == "draining":
        return "draining"
    return "scaled to zero" if model.desired_instances == 0 else None


def _model_state(model: ModelRow, serving: bool) -> ModelState:
    if serving:
        return ModelState.READY
    if model.state == "failed":
        return ModelState.FAILED
    if model.state == "active" and model.desired_instances > 0:
        return ModelState.STARTING
    return ModelState.STOPPED


def build_key_table(
    tenants: Iterable[TenantRow],
    keys: Iterable[KeyRow],
    *,
    version: int = 0,
    generated_at: float = 0.0,
) -> KeyTable:
    tenant_entries = tuple(
        TenantEntry(
            tenant_id=t.tenant_id,
            name=t.name,
            enabled=True,
            allowed_models=t.allowed_models,
            max_concurrent_requests=t.max_concurrent_requests,
            tokens_per_minute=t.tokens_per_minute,
            model_limits=t.model_limits,
            monthly_token_quota=t.monthly_token_quota,
        )
        for t in sorted(tenants, key=lambda t: t.tenant_id)
    )
    enabled = {t.tenant_id for t in tenant_entries}
    key_entries = tuple(
        ApiKeyEntry(
            key_hash=k.key_hash.hex(),
            prefix=k.prefix,
            tenant_id=k.tenant_id,
            expires_at=k.expires_at.timestamp() if k.expires_at else None,
        )
        for k in sorted(keys, key=lambda k: k.key_hash)
        if k.tenant_id in enabled
    )
    return KeyTable(version=version, generated_at=generated_at, tenants=tenant_entries, keys=key_entries)
