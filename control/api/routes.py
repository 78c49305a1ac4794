"""The routes of ``hpcgate control api``: registration, admin, service discovery, health.

Each handler declares its input as typed parameters (a ``data`` body Struct of
:mod:`control.wire`, path and query parameters with the bounded aliases below), calls one store
function and returns a wire Struct. Litestar decodes and validates from those declarations and generates
the OpenAPI document (``/admin/openapi.json``) from the same ones, so the document cannot drift
from the code. The dependencies ``db``, ``ports``, ``key_secret`` and ``launch`` come from
:func:`control.api.app.build_app`; the guards sit on the routers there.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from litestar import delete, get, patch, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import SecurityRequirement
from litestar.params import JSONBody, PathParameter, QueryParameter

from control.api.errors import ApiError
from control.api.security import ADMIN_SCHEME, SD_SCHEME
from control.store import jobs, models, registration, tenants, tribunals, usage
from control.store.db import Database
from control.store.models import LaunchCheck
from control.store.registration import PortRange
from control.wire import (
    KEY_PREFIX_PATTERN,
    MAX_ID,
    NAME_PATTERN,
    TENANT_PATTERN,
    TRIBUNAL_PATTERN,
    ApiKey,
    Endpoint,
    EndpointQuery,
    ErrorBody,
    Health,
    Job,
    JobQuery,
    JobState,
    KeyCreate,
    KeyCreated,
    KeyQuery,
    KeyUpdate,
    Model,
    ModelCreate,
    ModelUpdate,
    RegisterRequest,
    RegisterResponse,
    SdTargetGroup,
    Tenant,
    TenantCreate,
    TenantUpdate,
    Tribunal,
    TribunalCreate,
    TribunalUpdate,
    Usage,
    UsagePeriod,
    UsageQuery,
)

_STATUS_TEXT = {
    400: "Malformed JSON or request",
    401: "Missing or wrong token",
    404: "Not found",
    409: "Conflict",
    413: "Body too large",
    415: "Not JSON",
    422: "Validation error",
    503: "Database unavailable",
}
# An empty body means {} (Litestar hands a handler its default when there is no body).
_NO_TENANT_CHANGE, _NO_KEY_CHANGE, _NO_MODEL_CHANGE = TenantUpdate(), KeyUpdate(), ModelUpdate()
_DEFAULT_KEY = KeyCreate()
_NO_TRIBUNAL_CHANGE = TribunalUpdate()
# Path and query parameters restate the bounds of the wire aliases from the same constants:
# Litestar documents and enforces ``PathParameter``/``QueryParameter`` constraints, not msgspec's
# ``Meta``, outside Structs.
TenantPath = Annotated[str, PathParameter(pattern=TENANT_PATTERN)]
ModelPath = Annotated[str, PathParameter(pattern=NAME_PATTERN)]
TribunalPath = Annotated[str, PathParameter(pattern=TRIBUNAL_PATTERN)]
IdPath = Annotated[int, PathParameter(ge=1, le=MAX_ID)]
TenantFilter = Annotated[str | None, QueryParameter(pattern=TENANT_PATTERN)]
ModelFilter = Annotated[str | None, QueryParameter(pattern=NAME_PATTERN)]
KeyPrefixFilter = Annotated[str | None, QueryParameter(pattern=KEY_PREFIX_PATTERN)]
StateFilter = Annotated[JobState | None, QueryParameter(name="state")]  # "state" is reserved by Litestar
TimeFilter = Annotated[datetime | None, QueryParameter()]  # with a time zone: see _aware()
PeriodFilter = Annotated[UsagePeriod, QueryParameter()]
Flag = Annotated[bool, QueryParameter()]
ListLimit = Annotated[int, QueryParameter(ge=1, le=1000)]
Db = NamedDependency[Database]
ADMIN: list[SecurityRequirement] = [{ADMIN_SCHEME: []}]
SD: list[SecurityRequirement] = [{SD_SCHEME: []}, {}]  # {}: open unless sd_token is set


def errors(*codes: int, body: bool = False, auth: bool = True) -> dict[int, ResponseSpec]:
    """The documented error answers of a route: 400, 422 and 503 always, the body's and auth's, ``codes``."""
    wanted = {400, 422, 503, *codes} | ({413, 415} if body else set()) | ({401} if auth else set())
    return {
        code: ResponseSpec(data_container=ErrorBody, description=_STATUS_TEXT[code], generate_examples=False)
        for code in sorted(wanted)
    }


# ----------------------------------------------------------------------------- meta, registration


@get("/health", summary="Liveness of the API process", tags=["meta"],
     responses=errors(auth=False))
async def health() -> Health:
    return Health()


@post("/v1/register", status_code=200, summary="Register a running job; returns its port",
      tags=["registration"], responses=errors(401, 409, body=True, auth=False))
async def register(db: Db, ports: NamedDependency[PortRange],
                   data: JSONBody[RegisterRequest]) -> RegisterResponse:
    return await registration.register(db, data, ports)


# ----------------------------------------------------------------------------- tenants and keys


@post("/tenants", summary="Create a tenant", tags=["tenants"], responses=errors(409, body=True))
async def create_tenant(db: Db, data: JSONBody[TenantCreate]) -> Tenant:
    return await tenants.create_tenant(db, data)


@get("/tenants", summary="List tenants", tags=["tenants"], responses=errors())
async def list_tenants(db: Db) -> list[Tenant]:
    return await tenants.list_tenants(db)


@get("/tenants/{name:str}", summary="Show a tenant", tags=["tenants"], responses=errors(404))
async def get_tenant(db: Db, name: TenantPath) -> Tenant:
    return await tenants.get_tenant(db, name)


@patch("/tenants/{name:str}", summary="Update a tenant (enabled=false disables it and all its keys)",
       tags=["tenants"], responses=errors(404, body=True))
async def update_tenant(db: Db, name: TenantPath, data: JSONBody[TenantUpdate] = _NO_TENANT_CHANGE) -> Tenant:
    return await tenants.update_tenant(db, name, data)


@delete("/tenants/{name:str}", status_code=200, tags=["tenants"], responses=errors(404, 409),
        summary="Delete a tenant without active keys (its old keys and usage records go with it)")
async def delete_tenant(db: Db, name: TenantPath) -> Tenant:
    return await tenants.delete_tenant(db, name)


@post("/tenants/{name:str}/keys", summary="Create an API key; the key is in this answer only",
      tags=["keys"], responses=errors(404, 409, body=True))
async def create_key(db: Db, key_secret: NamedDependency[bytes], name: TenantPath,
                     data: JSONBody[KeyCreate] = _DEFAULT_KEY) -> KeyCreated:
    return await tenants.create_key(db, key_secret, name, data)


@get("/keys", summary="List API keys (by prefix, tenant)", tags=["keys"], responses=errors())
async def list_keys(db: Db, prefix: KeyPrefixFilter = None, tenant: TenantFilter = None,
                    all: Flag = False) -> list[ApiKey]:  # all: include revoked and expired keys
    return await tenants.list_keys(db, KeyQuery(prefix=prefix, tenant=tenant, all=all))


@patch("/keys/{key_id:str}", summary="Change a key's expiry or description", tags=["keys"],
       responses=errors(404, body=True))
async def update_key(db: Db, key_id: IdPath, data: JSONBody[KeyUpdate] = _NO_KEY_CHANGE) -> ApiKey:
    return await tenants.update_key(db, key_id, data)


@post("/keys/{key_id:str}/revoke", status_code=200, summary="Revoke an API key", tags=["keys"],
      responses=errors(404))
async def revoke_key(db: Db, key_id: IdPath) -> ApiKey:
    return await tenants.revoke_key(db, key_id)


# ----------------------------------------------------------------------------- models


@post("/models", summary="Create a model configuration", tags=["models"], responses=errors(409, body=True))
async def create_model(db: Db, launch: NamedDependency[LaunchCheck], data: JSONBody[ModelCreate]) -> Model:
    return await models.create_model(db, data, launch)


@get("/models", summary="List models", tags=["models"], responses=errors())
async def list_models(db: Db) -> list[Model]:
    return await models.list_models(db)


@get("/models/{name:str}", summary="Show a model", tags=["models"], responses=errors(404))
async def get_model(db: Db, name: ModelPath) -> Model:
    return await models.get_model(db, name)


@patch("/models/{name:str}", summary="Update a model configuration", tags=["models"],
       responses=errors(404, 409, body=True))
async def update_model(db: Db, launch: NamedDependency[LaunchCheck], name: ModelPath,
                       data: JSONBody[ModelUpdate] = _NO_MODEL_CHANGE) -> Model:
    return await models.update_model(db, name, data, launch)


@delete("/models/{name:str}", status_code=200, tags=["models"], responses=errors(404, 409),
        summary="Delete a model without live jobs (its aliases and ended jobs go with it)")
async def delete_model(db: Db, name: ModelPath) -> Model:
    return await models.delete_model(db, name)


@post("/models/{name:str}/drain", status_code=200, tags=["models"], responses=errors(404),
      summary="Drain a model: no new requests, the Job Worker stops its jobs")
async def drain_model(db: Db, name: ModelPath) -> Model:
    return await models.drain_model(db, name)


# ----------------------------------------------------------------------------- tribunals


@post("/tribunals", summary="Create a tribunal (the virtual model tribunal/NAME)", tags=["tribunals"],
      responses=errors(409, body=True))
async def create_tribunal(db: Db, data: JSONBody[TribunalCreate]) -> Tribunal:
    return await tribunals.create_tribunal(db, data)


@get("/tribunals", summary="List tribunals", tags=["tribunals"], responses=errors())
async def list_tribunals(db: Db) -> list[Tribunal]:
    return await tribunals.list_tribunals(db)


@get("/tribunals/{name:str}", summary="Show a tribunal", tags=["tribunals"], responses=errors(404))
async def get_tribunal(db: Db, name: TribunalPath) -> Tribunal:
    return await tribunals.get_tribunal(db, name)


@patch("/tribunals/{name:str}", summary="Change a tribunal (validated as a whole)", tags=["tribunals"],
       responses=errors(404, body=True))
async def update_tribunal(db: Db, name: TribunalPath,
                          data: JSONBody[TribunalUpdate] = _NO_TRIBUNAL_CHANGE) -> Tribunal:
    return await tribunals.update_tribunal(db, name, data)


@delete("/tribunals/{name:str}", status_code=200, summary="Delete a tribunal", tags=["tribunals"],
        responses=errors(404))
async def delete_tribunal(db: Db, name: TribunalPath) -> Tribunal:
    return await tribunals.delete_tribunal(db, name)


# ----------------------------------------------------------------------------- jobs and endpoints


@get("/jobs", summary="List endpoint jobs", tags=["jobs"], responses=errors())
async def list_jobs(db: Db, model: ModelFilter = None, job_state: StateFilter = None,
                    all: Flag = False, limit: ListLimit = 200) -> list[Job]:  # all: ended and failed too
    return await jobs.list_jobs(db, JobQuery(model=model, state=job_state, all=all, limit=limit))


@get("/jobs/{job_id:str}", summary="Show an endpoint job", tags=["jobs"], responses=errors(404))
async def get_job(db: Db, job_id: IdPath) -> Job:
    return await jobs.get_job(db, job_id)


@post("/jobs/{job_id:str}/cancel", status_code=200, tags=["jobs"], responses=errors(404, 409),
      summary="Cancel a job (state cancelling; the Job Worker stops it)")
async def cancel_job(db: Db, job_id: IdPath) -> Job:
    return await jobs.cancel_job(db, job_id)


@post("/jobs/{job_id:str}/drain", status_code=200, tags=["jobs"], responses=errors(404, 409),
      summary="Drain a job (no new requests; the Job Worker replaces and stops it)")
async def drain_job(db: Db, job_id: IdPath) -> Job:
    return await jobs.drain_job(db, job_id)


@get("/endpoints", summary="List registered endpoints", tags=["endpoints"], responses=errors())
async def list_endpoints(db: Db, model: ModelFilter = None) -> list[Endpoint]:
    return await jobs.list_endpoints(db, EndpointQuery(model=model))


@post("/endpoints/{endpoint_id:str}/drain", status_code=200, summary="Drain an endpoint (and its job)",
      tags=["endpoints"], responses=errors(404, 409))
async def drain_endpoint(db: Db, endpoint_id: IdPath) -> Endpoint:
    return await jobs.drain_endpoint(db, endpoint_id)


# ----------------------------------------------------------------------------- usage


@get("/usage", summary="Token usage per tenant, model (and period) over a time range; monthly quotas left",
     tags=["usage"], responses=errors())
async def usage_report(db: Db, *, since: TimeFilter = None, until: TimeFilter = None,
                       tenant: TenantFilter = None, model: ModelFilter = None,
                       period: PeriodFilter = "total") -> Usage:
    """``since`` defaults to 24 hours before ``until``, ``until`` to now; ``period`` splits the
    sums per UTC hour, day or month."""
    query = UsageQuery(since=_aware(since, "since"), until=_aware(until, "until"), tenant=tenant, model=model,
                       period=period)
    return await usage.usage(db, query)


@get("/usage.csv", summary="The usage report as CSV (for accounting)", tags=["usage"], responses=errors(),
     media_type="text/csv")
async def usage_report_csv(db: Db, *, since: TimeFilter = None, until: TimeFilter = None,
                           tenant: TenantFilter = None, model: ModelFilter = None,
                           period: PeriodFilter = "total") -> str:
    """Columns: period_start (the range's start for period total), tenant, model, requests, errors,
    prompt_tokens, completion_tokens, total_tokens."""
    return usage.usage_csv(await usage_report.fn(db, since=since, until=until, tenant=tenant, model=model,
                                                 period=period))


def _aware(value: datetime | None, name: str) -> datetime | None:
    """Litestar has no time-zone constraint for parameters: a naive time is refused here."""
    if value is not None and value.tzinfo is None:
        reason = "Expected `datetime` with a timezone component"
        raise ApiError(422, "validation_error", reason, f"query.{name}")
    return value


# ----------------------------------------------------------------------------- Prometheus HTTP SD


@get("/sd/vllm", summary="Prometheus HTTP service discovery of ready vLLM endpoints", tags=["discovery"],
     security=SD, responses=errors())
async def sd_vllm(db: Db) -> list[SdTargetGroup]:
    return [
        SdTargetGroup(
            targets=[f"{ep.node}:{ep.port}"],
            labels={
                "model": ep.model,
                "node": ep.node,
                "endpoint_id": str(ep.endpoint_id),
                "endpoint_job_id": str(ep.endpoint_job_id),
                "launcher_job_id": ep.launcher_job_id or "",
                "draining": "true" if ep.draining or ep.job_state in ("draining", "cancelling") else "false",
                "__metrics_path__": "/metrics",
            },
        )
        for ep in await jobs.ready_endpoints(db)
    ]


OPEN_ROUTES: list[Any] = [health, register]
SD_ROUTES: list[Any] = [sd_vllm]
ADMIN_ROUTES: list[Any] = [
    create_tenant, list_tenants, get_tenant, update_tenant, delete_tenant,
    create_key, list_keys, update_key, revoke_key,
    create_model, list_models, get_model, update_model, delete_model, drain_model,
    create_tribunal, list_tribunals, get_tribunal, update_tribunal, delete_tribunal,
    list_jobs, get_job, cancel_job, drain_job, list_endpoints, drain_endpoint, usage_report, usage_report_csv,
]
