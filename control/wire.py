"""Typed wire format of the control API: registration, admin and error bodies.

Shared by the API server (Litestar decodes requests into these types, encodes responses from
them and generates the OpenAPI document from them), the store (takes the query bundles,
returns the response views) and ``hpcgate admin`` (decodes them). msgspec, the standard
library and the shared schemas (the tribunals' default prompts) only.

Invariants: every request body type rejects unknown fields, and every request type or
parameter alias bounds every value so that anything it accepts also fits the database
(lengths, integer ranges, the name patterns of the schema's CHECK constraints, no NUL
characters in text); ``UNSET`` in an update means "leave as is". The ``*Query`` structs only
carry already validated query parameters from a handler to the store.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from hpcgate.schemas.tribunal import (
    DEFAULT_CRITIQUE_PROMPT,
    DEFAULT_JUDGE_PROMPT,
    DEFAULT_REVIEW_PROMPT,
    DEFAULT_REVISE_PROMPT,
)

# Patterns mirror the CHECK constraints of control/db/migrations/0001_initial.sql.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_./:-]{0,127}$"
TENANT_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
KEY_PREFIX_PATTERN = r"^[A-Za-z0-9_-]{1,16}$"
MAX_ID = 2**63 - 1  # PostgreSQL bigint
NODE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,252}$"

Id = Annotated[int, Meta(ge=1, le=MAX_ID)]
Count = Annotated[int, Meta(ge=0, le=100_000)]
PosInt32 = Annotated[int, Meta(ge=1, le=2**31 - 1)]
PosInt63 = Annotated[int, Meta(ge=1, le=2**63 - 1)]
ModelName = Annotated[str, Meta(pattern=NAME_PATTERN)]
TenantName = Annotated[str, Meta(pattern=TENANT_PATTERN)]
NodeName = Annotated[str, Meta(pattern=NODE_PATTERN)]
# Printable ASCII without spaces: it ends up in an HTTP header, so no CR/LF can slip in.
Secret = Annotated[str, Meta(pattern=r"^[\x21-\x7e]{1,512}$")]
LauncherJobId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.:+-]{1,64}$")]
Capability = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
Text = Annotated[str, Meta(max_length=1000, pattern=r"^[^\x00]*$")]
EngineArg = Annotated[str, Meta(max_length=4096, pattern=r"^[^\x00]*$")]
TemplateName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
ResourceKey = Annotated[str, Meta(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")]
ResourceValue = Annotated[str, Meta(max_length=1000, pattern=r"^[^\x00]*$")] | int | float | bool
Timestamp = Annotated[datetime, Meta(tz=True)]
JobState = Literal["pending", "submitted", "registered", "ready", "draining", "cancelling", "ended", "failed"]
ModelAdminState = Literal["active", "draining", "failed"]


class ErrorBody(Struct, kw_only=True):
    """Every 4xx/5xx answer: a stable code, a human reason, and the offending field if any."""

    error: str  # e.g. "validation_error", "conflict", "not_found", "unauthorized"
    message: str
    path: str | None = None  # JSON path of the invalid field, e.g. "$.node"


# ----------------------------------------------------------------------------- registration


class RegisterRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    """A job announcing itself from its compute node (``POST /v1/register``)."""

    endpoint_job_id: Id
    registration_token: Secret
    launcher_job_id: LauncherJobId
    node: NodeName
    model: ModelName
    bearer_token: Secret  # what its vLLM will require; the gateway sends it upstream
    capabilities: Annotated[list[Capability], Meta(max_length=64)] = []


class RegisterResponse(Struct, kw_only=True):
    endpoint_id: int
    port: int
    model: str


# ----------------------------------------------------------------------------- tenants


class ModelLimitSpec(Struct, kw_only=True, forbid_unknown_fields=True):
    """A tenant's limits on one model (on top of its tenant-wide ones); null: no such limit."""

    max_concurrent_requests: PosInt32 | None = None
    tokens_per_minute: PosInt32 | None = None


ModelLimits = Annotated[dict[ModelName, ModelLimitSpec], Meta(max_length=1000)]


class TenantCreate(Struct, kw_only=True, forbid_unknown_fields=True):
    name: TenantName
    enabled: bool = True
    allowed_models: Annotated[list[ModelName], Meta(max_length=1000)] | None = None  # None: every model
    max_concurrent_requests: PosInt32 | None = None
    tokens_per_minute: PosInt32 | None = None
    model_limits: ModelLimits = {}  # by canonical model name
    monthly_token_quota: PosInt63 | None = None  # prompt + completion tokens per calendar month (UTC)


class TenantUpdate(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    enabled: bool | UnsetType = UNSET
    allowed_models: Annotated[list[ModelName], Meta(max_length=1000)] | UnsetType | None = UNSET
    max_concurrent_requests: PosInt32 | UnsetType | None = UNSET
    tokens_per_minute: PosInt32 | UnsetType | None = UNSET
    model_limits: ModelLimits | UnsetType = UNSET  # replaces the whole map ({}: none)
    monthly_token_quota: PosInt63 | UnsetType | None = UNSET


class Tenant(Struct, kw_only=True):
    tenant_id: int
    name: str
    enabled: bool
    allowed_models: list[str] | None
    max_concurrent_requests: int | None
    tokens_per_minute: int | None
    model_limits: dict[str, ModelLimitSpec] = {}
    monthly_token_quota: int | None = None
    active_keys: int
    created_at: datetime
    updated_at: datetime


# ----------------------------------------------------------------------------- API keys


class KeyCreate(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    description: Text = ""
    expires_at: Timestamp | None = None
    expires_in_s: PosInt32 | None = None  # alternative to expires_at


class KeyUpdate(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    description: Text | UnsetType = UNSET
    expires_at: Timestamp | UnsetType | None = UNSET  # None: never expires


class ApiKey(Struct, kw_only=True):
    key_id: int
    tenant: str
    prefix: str
    description: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    active: bool


class KeyCreated(Struct, kw_only=True):
    """The only answer that ever contains the key itself."""

    key: str
    api_key: ApiKey


# ----------------------------------------------------------------------------- models


class ModelCreate(Struct, kw_only=True, forbid_unknown_fields=True):
    name: ModelName
    aliases: Annotated[list[ModelName], Meta(max_length=64)] = []
    engine_args: Annotated[list[EngineArg], Meta(max_length=256)] = []
    slurm_template: TemplateName = "sim"
    slurm_resources: Annotated[dict[ResourceKey, ResourceValue], Meta(max_length=64)] = {}
    min_instances: Count = 0
    max_instances: Count = 1
    desired_instances: Count = 0
    startup_timeout_s: PosInt32 = 1800
    max_model_len: PosInt32 | None = None


class ModelUpdate(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    aliases: Annotated[list[ModelName], Meta(max_length=64)] | UnsetType = UNSET  # replaces the set
    engine_args: Annotated[list[EngineArg], Meta(max_length=256)] | UnsetType = UNSET
    slurm_template: TemplateName | UnsetType = UNSET
    slurm_resources: Annotated[dict[ResourceKey, ResourceValue], Meta(max_length=64)] | UnsetType = UNSET
    min_instances: Count | UnsetType = UNSET
    max_instances: Count | UnsetType = UNSET
    desired_instances: Count | UnsetType = UNSET
    startup_timeout_s: PosInt32 | UnsetType = UNSET
    max_model_len: PosInt32 | UnsetType | None = UNSET
    state: Literal["active", "draining"] | UnsetType = UNSET  # "active" also clears "failed"


class Model(Struct, kw_only=True):
    model_id: int
    name: str
    aliases: list[str]
    engine_args: list[str]
    slurm_template: str
    slurm_resources: dict[str, ResourceValue]
    min_instances: int
    max_instances: int
    desired_instances: int
    startup_timeout_s: int
    max_model_len: int | None
    state: ModelAdminState
    state_reason: str | None
    generation: int  # bumped when the launch configuration changes
    live_jobs: int
    ready_endpoints: int
    created_at: datetime
    updated_at: datetime


# ----------------------------------------------------------------------------- tribunals

TRIBUNAL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"  # mirrors migration 0900
TribunalName = Annotated[str, Meta(pattern=TRIBUNAL_PATTERN)]
Prompt = Annotated[str, Meta(min_length=1, max_length=8000, pattern=r"^[^\x00]*$")]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
StepSeconds = Annotated[float, Meta(gt=0.0, le=3600.0)]
GraceSeconds = Annotated[float, Meta(ge=0.0, le=600.0)]


class JurorSpec(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    model: ModelName
    temperature: Temperature | None = None
    system_prompt: Prompt | None = None


class TribunalSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A tribunal's whole configuration (its name aside); defaults are the shipped ones.

    The prompts' placeholders are listed in :mod:`hpcgate.schemas.tribunal`."""

    jurors: Annotated[list[JurorSpec], Meta(min_length=1, max_length=16)]
    judge: ModelName
    fallback_judge: ModelName | None = None
    judge_prompt: Prompt = DEFAULT_JUDGE_PROMPT
    critique_prompt: Prompt = DEFAULT_CRITIQUE_PROMPT
    revise_prompt: Prompt = DEFAULT_REVISE_PROMPT
    review_prompt: Prompt = DEFAULT_REVIEW_PROMPT
    rounds: Annotated[int, Meta(ge=0, le=5)] = 0
    quorum: Annotated[int, Meta(ge=1, le=16)] = 1
    juror_timeout_s: StepSeconds = 60.0
    judge_timeout_s: StepSeconds = 120.0
    deadline_s: StepSeconds = 300.0
    grace_s: GraceSeconds = 2.0
    peer_review: bool = False
    show_deliberation: bool = False


class TribunalCreate(TribunalSettings, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: TribunalName


class TribunalUpdate(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Fields to change; the result is validated as a whole."""

    jurors: Annotated[list[JurorSpec], Meta(min_length=1, max_length=16)] | UnsetType = UNSET
    judge: ModelName | UnsetType = UNSET
    fallback_judge: ModelName | UnsetType | None = UNSET
    judge_prompt: Prompt | UnsetType = UNSET
    critique_prompt: Prompt | UnsetType = UNSET
    revise_prompt: Prompt | UnsetType = UNSET
    review_prompt: Prompt | UnsetType = UNSET
    rounds: Annotated[int, Meta(ge=0, le=5)] | UnsetType = UNSET
    quorum: Annotated[int, Meta(ge=1, le=16)] | UnsetType = UNSET
    juror_timeout_s: StepSeconds | UnsetType = UNSET
    judge_timeout_s: StepSeconds | UnsetType = UNSET
    deadline_s: StepSeconds | UnsetType = UNSET
    grace_s: GraceSeconds | UnsetType = UNSET
    peer_review: bool | UnsetType = UNSET
    show_deliberation: bool | UnsetType = UNSET


class Tribunal(TribunalSettings, frozen=True, kw_only=True):
    name: str
    model: str  # what clients send: "tribunal/<name>"
    created_at: datetime
    updated_at: datetime


# ----------------------------------------------------------------------------- jobs, endpoints


class JobQuery(Struct, kw_only=True):
    """The filters of ``GET /admin/jobs``; its query parameters (control/api/routes.py) give the
    bounds and defaults."""

    model: str | None
    state: JobState | None
    all: bool  # include ended and failed jobs
    limit: int


class Job(Struct, kw_only=True):
    endpoint_job_id: int
    model: str
    generation: int
    launcher: str
    launcher_job_id: str | None
    state: JobState
    state_reason: str | None
    created_at: datetime
    submitted_at: datetime | None
    registered_at: datetime | None
    ready_at: datetime | None
    ended_at: datetime | None
    endpoint_id: int | None
    node: str | None
    port: int | None


class EndpointQuery(Struct, kw_only=True):
    model: str | None


class Endpoint(Struct, kw_only=True):
    endpoint_id: int
    endpoint_job_id: int
    model: str
    node: str
    port: int
    url: str
    launcher_job_id: str | None
    job_state: JobState
    capabilities: list[str]
    registered_at: datetime
    ready_at: datetime | None
    last_probe_at: datetime | None
    consecutive_failures: int
    draining: bool


# ----------------------------------------------------------------------------- keys query, usage


class KeyQuery(Struct, kw_only=True):
    prefix: str | None
    tenant: str | None
    all: bool  # include revoked and expired keys


UsagePeriod = Literal["total", "hour", "day", "month"]


class UsageQuery(Struct, kw_only=True):
    since: datetime | None  # None: 24 hours before `until`
    until: datetime | None  # None: now
    tenant: str | None
    model: str | None
    period: UsagePeriod = "total"  # one row per tenant x model, or per hour/day/month (UTC) as well


class UsageRow(Struct, kw_only=True):
    period_start: datetime | UnsetType = UNSET  # absent for period "total"
    tenant: str
    model: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int


class QuotaRow(Struct, kw_only=True):
    """A tenant's monthly token quota and what is left of it this calendar month (UTC)."""

    tenant: str
    monthly_token_quota: int
    month_start: datetime
    used: int
    left: int


class Usage(Struct, kw_only=True):
    since: datetime
    until: datetime
    rows: list[UsageRow]
    period: UsagePeriod = "total"
    quotas: list[QuotaRow] = []  # tenants (as filtered) that have a monthly quota


class Health(Struct, kw_only=True):
    status: Literal["ok"] = "ok"


# Prometheus HTTP SD: https://prometheus.io/docs/prometheus/latest/http_sd/
class SdTargetGroup(Struct, kw_only=True):
    targets: list[str]
    labels: dict[str, str]


def encode(value: object) -> bytes:
    return msgspec.json.encode(value)
