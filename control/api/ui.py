"""The operator page on the control API: ``GET /ui`` (the page) and ``GET /ui/login`` (a signed
login link from ``hpcgate admin ui`` exchanged for a session cookie).

Read-only: the handlers only read PostgreSQL (models, jobs, endpoints, today's usage) and scrape
the ready endpoints' ``/metrics`` for their load, each with a short timeout and concurrently, so
one slow engine shows as "unknown" instead of holding the page. Access needs the admin token,
either as a bearer header (curl, a proxy that injects it) or as the session cookie that a login
link sets (:mod:`control.ui_tickets`); a refusal is a 401 page that says how to get in.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from litestar import MediaType, Request, Response, Router, get
from litestar.datastructures import Cookie
from litestar.di import NamedDependency
from litestar.params import QueryParameter

from control.api.operator_page import OperatorView, render
from control.api.security import bears
from control.http_client import daemon_client
from control.jobs.inflight import scrape_engine_load
from control.store import jobs, models, usage
from control.store.db import Database
from control.ui_tickets import LOGIN, SESSION, SESSION_TTL_S, sign, verify
from control.wire import EndpointQuery, Job, JobQuery, UsageQuery

COOKIE = "hpcgate_ui"
SCRAPE_TIMEOUT_S = 1.0
RECENT_JOBS = timedelta(hours=1)  # ended or failed jobs stay on the page this long
_NO_STORE = {"cache-control": "no-store"}
_REFUSED = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>hpcgate operator</title>
</head><body><h1>Not signed in</h1><p>{reason}</p><p>Run <code>hpcgate admin ui</code> where the admin
token is set and open the link it prints (valid for five minutes), or send the admin token as
<code>Authorization: Bearer …</code>.</p></body></html>"""


def _refused(reason: str) -> Response[str]:
    return Response(_REFUSED.format(reason=reason), status_code=401, media_type=MediaType.HTML,
                    headers={**_NO_STORE, "www-authenticate": "Bearer"})


def _authorised(request: Request[Any, Any, Any], token: str) -> bool:
    return bears(request, token) or verify(token, SESSION, request.cookies.get(COOKIE, ""), time.time())


async def gather_view(db: Database) -> OperatorView:
    now = datetime.now(UTC)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    model_rows = await models.list_models(db)
    job_rows: list[Job] = [
        j for j in await jobs.list_jobs(db, JobQuery(model=None, state=None, all=True, limit=500))
        if j.state not in ("ended", "failed") or (j.ended_at is not None and now - j.ended_at < RECENT_JOBS)
    ]
    endpoints = await jobs.list_endpoints(db, EndpointQuery(model=None))
    bearers = await jobs.endpoint_bearer_tokens(db)
    today = await usage.usage(db, UsageQuery(since=midnight, until=now + timedelta(seconds=1),
                                             tenant=None, model=None))
    async with daemon_client(SCRAPE_TIMEOUT_S) as client:
        loads = await asyncio.gather(*(
            scrape_engine_load(client, ep.node, ep.port, bearers.get(ep.endpoint_id), SCRAPE_TIMEOUT_S)
            if ep.ready_at is not None else _none() for ep in endpoints))
    return OperatorView(generated_at=now, models=model_rows, jobs=job_rows,
                        endpoints=list(zip(endpoints, loads, strict=True)), usage=today)


async def _none() -> None:
    return None


def ui_router(admin_token: str) -> Router:
    """``/ui`` and ``/ui/login``, checking against ``admin_token`` (outside the bearer-guarded
    ``/admin`` router: a browser cannot send a header, so these accept the cookie as well)."""

    @get("/", include_in_schema=False)
    async def page(request: Request[Any, Any, Any], db: NamedDependency[Database]) -> Response[str]:
        if not _authorised(request, admin_token):
            return _refused("This page needs the admin token.")
        return Response(render(await gather_view(db)), media_type=MediaType.HTML, headers=_NO_STORE)

    @get("/login", include_in_schema=False)
    async def login(request: Request[Any, Any, Any],
                    ticket: Annotated[str, QueryParameter(max_length=100)] = "") -> Response[str]:
        now = time.time()
        if not verify(admin_token, LOGIN, ticket, now):
            return _refused("The login link is expired, malformed or was made with another admin token.")
        cookie = Cookie(key=COOKIE, value=sign(admin_token, SESSION, now, SESSION_TTL_S), path="/ui",
                        max_age=SESSION_TTL_S, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
        return Response("", status_code=303, headers={**_NO_STORE, "location": "/ui/"}, cookies=[cookie])

    return Router("/ui", route_handlers=[page, login])
