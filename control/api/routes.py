"""The routes of ``hpcgate control api``: registration, admin, service discovery, health.

Each handler decodes its input with the typed helpers of :mod:`control.api.http`, calls one
store function and returns a wire Struct; the :class:`Route` entries carry the same types for
the OpenAPI document (``/admin/openapi.json``), so the document cannot drift from the code
without the schemathesis test noticing.
"""

from __future__ import annotations

from typing import Any

from control.api.http import Auth, Call, Route
from control.settings import ApiSettings
from control.store import jobs, models, registration, tenants, usage
from control.store.db import Database
from control.store.registration import PortRange
from control.wire import (
    ApiKey,
    Endpoint,
    EndpointQuery,
    Health,
    Id,
    Job,
    JobQuery,
    KeyCreate,
    KeyCreated,
    KeyQuery,
    KeyUpdate,
    Model,
    ModelCreate,
    ModelName,
    ModelUpdate,
    RegisterRequest,
    RegisterResponse,
    SdTargetGroup,
    Tenant,
    TenantCreate,
    TenantName,
    TenantUpdate,
    Usage,
    UsageQuery,
)


class ControlRoutes:
    """Handlers bound to the database and settings of one API process."""

    def __init__(self, db: Database, settings: ApiSettings) -> None:
        self.db = db
        self.ports = PortRange(settings.port_range_start, settings.port_range_end)
        self.secret = settings.key_hash_secret.encode()

    # -- liveness
    async def health(self, call: Call) -> Health:
        return Health()

    # -- registration
    async def register(self, call: Call) -> RegisterResponse:
        return await registration.register(self.db, call.json(RegisterRequest), self.ports)

    # -- tenants and keys
    async def create_tenant(self, call: Call) -> Tenant:
        return await tenants.create_tenant(self.db, call.json(TenantCreate))

    async def list_tenants(self, call: Call) -> list[Tenant]:
        return await tenants.list_tenants(self.db)

    async def get_tenant(self, call: Call) -> Tenant:
        return await tenants.get_tenant(self.db, call.param("name", TenantName))

    async def update_tenant(self, call: Call) -> Tenant:
        name = call.param("name", TenantName)
        return await tenants.update_tenant(self.db, name, call.json(TenantUpdate))

    async def create_key(self, call: Call) -> KeyCreated:
        name = call.param("name", TenantName)
        return await tenants.create_key(self.db, self.secret, name, call.json(KeyCreate))

    async def list_keys(self, call: Call) -> list[ApiKey]:
        return await tenants.list_keys(self.db, call.query_as(KeyQuery))

    async def update_key(self, call: Call) -> ApiKey:
        key_id = call.param("key_id", Id)
        return await tenants.update_key(self.db, key_id, call.json(KeyUpdate))

    async def revoke_key(self, call: Call) -> ApiKey:
        return await tenants.revoke_key(self.db, call.param("key_id", Id))

    # -- models
    async def create_model(self, call: Call) -> Model:
        return await models.create_model(self.db, call.json(ModelCreate))

    async def list_models(self, call: Call) -> list[Model]:
        return await models.list_models(self.db)

    async def get_model(self, call: Call) -> Model:
        return await models.get_model(self.db, call.param("name", ModelName))

    async def update_model(self, call: Call) -> Model:
        name = call.param("name", ModelName)
        return await models.update_model(self.db, name, call.json(ModelUpdate))

    async def drain_model(self, call: Call) -> Model:
        return await models.drain_model(self.db, call.param("name", ModelName))

    # -- jobs and endpoints
    async def list_jobs(self, call: Call) -> list[Job]:
        return await jobs.list_jobs(self.db, call.query_as(JobQuery))

    async def get_job(self, call: Call) -> Job:
        return await jobs.get_job(self.db, call.param("job_id", Id))

    async def cancel_job(self, call: Call) -> Job:
        return await jobs.cancel_job(self.db, call.param("job_id", Id))

    async def drain_job(self, call: Call) -> Job:
        return await jobs.drain_job(self.db, call.param("job_id", Id))

    async def list_endpoints(self, call: Call) -> list[Endpoint]:
        return await jobs.list_endpoints(self.db, call.query_as(EndpointQuery))

    async def drain_endpoint(self, call: Call) -> Endpoint:
        return await jobs.drain_endpoint(self.db, call.param("endpoint_id", Id))

    # -- usage
    async def usage(self, call: Call) -> Usage:
        return await usage.usage(self.db, call.query_as(UsageQuery))

    # -- Prometheus HTTP SD
    async def sd_vllm(self, call: Call) -> list[SdTargetGroup]:
        return [
            SdTargetGroup(
                targets=[f"{ep.node}:{ep.port}"],
                labels={
                    "model": ep.model,
                    "node": ep.node,
                    "endpoint_id": str(ep.endpoint_id),
                    "endpoint_job_id": str(ep.endpoint_job_id),
                    "launcher_job_id": ep.launcher_job_id or "",
                    "draining": "true"
                    if ep.draining or ep.job_state in ("draining", "cancelling")
                    else "false",
                    "__metrics_path__": "/metrics",
                },
            )
            for ep in await jobs.ready_endpoints(self.db)
        ]

    def routes(self) -> list[Route]:
        a: Auth = "admin"
        n: Auth = "none"
        name_p: dict[str, Any] = {"name": TenantName}
        model_p: dict[str, Any] = {"name": ModelName}
        return [
            Route("GET", "/health", self.health, n, "Liveness of the API process", "meta", response=Health),
            Route(
                "POST",
                "/v1/register",
                self.register,
                n,
                "Register a running job; returns its port",
                "registration",
                body=RegisterRequest,
                response=RegisterResponse,
                errors=(401, 409),
            ),
            Route(
                "POST",
                "/admin/tenants",
                self.create_tenant,
                a,
                "Create a tenant",
                "tenants",
                body=TenantCreate,
                response=Tenant,
                status=201,
                errors=(409,),
            ),
            Route(
                "GET",
                "/admin/tenants",
                self.list_tenants,
                a,
                "List tenants",
                "tenants",
                response=list[Tenant],
            ),
            Route(
                "GET",
                "/admin/tenants/{name}",
                self.get_tenant,
                a,
                "Show a tenant",
                "tenants",
                response=Tenant,
                params=name_p,
                errors=(404,),
            ),
            Route(
                "PATCH",
                "/admin/tenants/{name}",
                self.update_tenant,
                a,
                "Update a tenant (enabled=false disables it and all its keys)",
                "tenants",
                body=TenantUpdate,
                response=Tenant,
                params=name_p,
                errors=(404,),
            ),
            Route(
                "POST",
                "/admin/tenants/{name}/keys",
                self.create_key,
                a,
                "Create an API key; the key is in this answer only",
                "keys",
                body=KeyCreate,
                response=KeyCreated,
                status=201,
                params=name_p,
                errors=(404, 409),
            ),
            Route(
                "GET",
                "/admin/keys",
                self.list_keys,
                a,
                "List API keys (by prefix, tenant)",
                "keys",
                query=KeyQuery,
                response=list[ApiKey],
            ),
            Route(
                "PATCH",
                "/admin/keys/{key_id}",
                self.update_key,
                a,
                "Change a key's expiry or description",
                "keys",
                body=KeyUpdate,
                response=ApiKey,
                params={"key_id": Id},
                errors=(404,),
            ),
            Route(
                "POST",
                "/admin/keys/{key_id}/revoke",
                self.revoke_key,
                a,
                "Revoke an API key",
                "keys",
                response=ApiKey,
                params={"key_id": Id},
                errors=(404,),
            ),
            Route(
                "POST",
                "/admin/models",
                self.create_model,
                a,
                "Create a model configuration",
                "models",
                body=ModelCreate,
                response=Model,
                status=201,
                errors=(409,),
            ),
            Route("GET", "/admin/models", self.list_models, a, "List models", "models", response=list[Model]),
            Route(
                "GET",
                "/admin/models/{name}",
                self.get_model,
                a,
                "Show a model",
                "models",
                response=Model,
                params=model_p,
                errors=(404,),
            ),
            Route(
                "PATCH",
                "/admin/models/{name}",
                self.update_model,
                a,
                "Update a model configuration",
                "models",
                body=ModelUpdate,
                response=Model,
                params=model_p,
                errors=(404, 409),
            ),
            Route(
                "POST",
                "/admin/models/{name}/drain",
                self.drain_model,
                a,
                "Drain a model: no new requests, the Job Worker stops its jobs",
                "models",
                response=Model,
                params=model_p,
                errors=(404,),
            ),
            Route(
                "GET",
                "/admin/jobs",
                self.list_jobs,
                a,
                "List endpoint jobs",
                "jobs",
                query=JobQuery,
                response=list[Job],
            ),
            Route(
                "GET",
                "/admin/jobs/{job_id}",
                self.get_job,
                a,
                "Show an endpoint job",
                "jobs",
                response=Job,
                params={"job_id": Id},
                errors=(404,),
            ),
            Route(
                "POST",
                "/admin/jobs/{job_id}/cancel",
                self.cancel_job,
                a,
                "Cancel a job (state cancelling; the Job Worker stops it)",
                "jobs",
                response=Job,
                params={"job_id": Id},
                errors=(404, 409),
            ),
            Route(
                "POST",
                "/admin/jobs/{job_id}/drain",
                self.drain_job,
                a,
                "Drain a job (no new requests; the Job Worker replaces and stops it)",
                "jobs",
                response=Job,
                params={"job_id": Id},
                errors=(404, 409),
            ),
            Route(
                "GET",
                "/admin/endpoints",
                self.list_endpoints,
                a,
                "List registered endpoints",
                "endpoints",
                query=EndpointQuery,
                response=list[Endpoint],
            ),
            Route(
                "POST",
                "/admin/endpoints/{endpoint_id}/drain",
                self.drain_endpoint,
                a,
                "Drain an endpoint (and its job)",
                "endpoints",
                response=Endpoint,
                params={"endpoint_id": Id},
                errors=(404, 409),
            ),
            Route(
                "GET",
                "/admin/usage",
                self.usage,
                a,
                "Token usage per tenant and model over a time range",
                "usage",
                query=UsageQuery,
                response=Usage,
            ),
            Route(
                "GET",
                "/sd/vllm",
                self.sd_vllm,
                "sd",
                "Prometheus HTTP service discovery of ready vLLM endpoints",
                "discovery",
                response=list[SdTargetGroup],
            ),
        ]
