"""Assembling the control API application from settings and a database."""

from __future__ import annotations

from typing import Any

from control.api.http import ApiApp, Call, Route, Router
from control.api.openapi import build_openapi
from control.api.routes import ControlRoutes
from control.settings import ApiSettings
from control.store.db import Database

TITLE = "hpcgate control API"
VERSION = "1"


def _document(routes: list[Route]) -> dict[str, Any]:
    return build_openapi(routes, title=TITLE, version=VERSION)


def build_app(db: Database, settings: ApiSettings) -> ApiApp:
    routes = ControlRoutes(db, settings).routes()
    document = _document(routes)

    async def openapi(call: Call) -> dict[str, Any]:
        return document

    routes.append(Route("GET", "/admin/openapi.json", openapi, "none", "This document", "meta"))
    return ApiApp(
        Router(routes),
        admin_token=settings.admin_token,
        sd_token=settings.sd_token,
        max_body_bytes=settings.max_body_bytes,
    )


def openapi_document(settings: ApiSettings | None = None) -> dict[str, Any]:
    """The document without a running server (tests, docs)."""
    settings = settings or ApiSettings(admin_token="x", key_hash_secret="x")
    return _document(ControlRoutes(Database(settings.database_url), settings).routes())
