"""Assembling the control API: a Litestar application behind a thin ASGI edge.

The edge (:class:`ApiEdge`) does the two things that must happen before Litestar routes: it
gives Litestar a path in which ``%2F`` still separates nothing (:func:`routing_path`), and it
writes one ``api_request`` access record per request with the route template, status and
duration. Everything else (routing, guards, decoding, errors, the OpenAPI document) is
Litestar's, configured here.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import msgspec
from litestar import Litestar, Router
from litestar.di import Provide
from litestar.enums import MediaType
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme

from control.api.decoding import ApiRequest, decode_path_params, routing_path
from control.api.errors import EXCEPTION_HANDLERS, ApiError
from control.api.metrics import metrics
from control.api.routes import ADMIN, ADMIN_ROUTES, OPEN_ROUTES, SD_ROUTES
from control.api.security import ADMIN_SCHEME, SD_SCHEME, bearer_guard, sd_guards
from control.api.ui import ui_router
from control.jobs.render import LaunchConfig, prepare
from control.jobs.resources import ResourceError
from control.settings import ApiSettings
from control.store.db import Database
from control.store.models import LaunchCheck
from control.store.registration import PortRange
from hpcgate.logs import get_logger

log = get_logger("hpcgate.control.api")

TITLE = "hpcgate control API"
VERSION = "1"
OPENAPI_PATH = "/admin/openapi.json"
_encode = msgspec.json.Encoder().encode
# The edge sees raw ASGI dicts (Litestar's TypedDicts begin inside it).
Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def build_litestar(db: Database, settings: ApiSettings) -> Litestar:
    def constant(value: object) -> Provide:
        def provide() -> object:
            return value

        return Provide(provide, use_cache=True, sync_to_thread=False)

    return Litestar(
        route_handlers=[
            *OPEN_ROUTES,
            Router("/", route_handlers=[*SD_ROUTES, metrics],
                   guards=sd_guards(settings.sd_token, settings.admin_token)),
            Router("/admin", route_handlers=ADMIN_ROUTES, guards=[bearer_guard(settings.admin_token)],
                   security=ADMIN),
            ui_router(settings.admin_token),
        ],
        dependencies={
            "db": constant(db),
            "ports": constant(PortRange(settings.port_range_start, settings.port_range_end)),
            "key_secret": constant(settings.key_hash_secret.encode()),
            "launch": constant(launch_check(settings)),
        },
        middleware=[decode_path_params],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        request_class=ApiRequest,
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title=TITLE,
            version=VERSION,
            path=OPENAPI_PATH,
            render_plugins=[JsonRenderPlugin(path="/", media_type=MediaType.JSON)],
            components=Components(security_schemes={
                ADMIN_SCHEME: _bearer("the admin_token setting"),
                SD_SCHEME: _bearer("the api.sd_token setting"),
            }),
        ),
        logging_config=None,
        debug=False,
    )


def launch_check(settings: ApiSettings) -> LaunchCheck:
    """The Job Worker's own check of a launch configuration (template found, resources valid,
    layout fits the template, the script renders), run when a model is created or changed."""
    search = tuple(Path(d) for d in settings.template_dirs)

    def check(name: str, template: str, resources: Mapping[str, object], engine_args: Sequence[str]) -> None:
        config = LaunchConfig(model=name, template=template, resources=resources,
                              engine_args=list(engine_args))
        try:
            prepare(config, search, control_url="http://control.invalid", hpcgate_bin="hpcgate")
        except ResourceError as exc:
            raise ApiError(422, "validation_error", str(exc), exc.path) from None

    return check


def _bearer(description: str) -> SecurityScheme:
    return SecurityScheme(type="http", scheme="bearer", description=description)


class ApiEdge:
    """The ASGI application granian serves: routing path, access log, then Litestar."""

    def __init__(self, app: Litestar) -> None:
        self.litestar = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.litestar(cast(Any, scope), cast(Any, receive), cast(Any, send))
            return
        started = time.monotonic()
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            path = routing_path(scope.get("raw_path") or scope["path"].encode())
            if path is None:
                await _send_error(send_and_note, ApiError(404, "not_found", "path is not valid UTF-8"))
            else:
                inner = {**scope, "path": path}
                await self.litestar(cast(Any, inner), cast(Any, receive), cast(Any, send_and_note))
                scope["path_template"] = inner.get("path_template", "?")
        finally:
            log.info("api_request", method=scope["method"], route=scope.get("path_template", "?"),
                     status=status, duration_ms=round((time.monotonic() - started) * 1000, 2))


async def _send_error(send: Send, err: ApiError) -> None:
    body = _encode(err.body)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def build_app(db: Database, settings: ApiSettings) -> ApiEdge:
    return ApiEdge(build_litestar(db, settings))


def openapi_document(settings: ApiSettings | None = None) -> dict[str, Any]:
    """The document without a running server (tests, docs)."""
    settings = settings or ApiSettings(admin_token="x", key_hash_secret="x")
    document = build_litestar(Database(settings.database_url), settings).openapi_schema.to_schema()
    return msgspec.to_builtins(document)  # type: ignore[no-any-return]  # defaults may be Structs
