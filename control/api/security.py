"""Bearer-token guards of the control API.

``/admin/*`` needs the admin token. ``/sd/*`` is open unless ``sd_token`` is set (its labels hold
no secrets); then it takes the sd token or the admin token. Registration and ``/health`` need
none (a job proves itself with its one-time registration token in the body). Tokens are
compared in constant time; a refusal is 401 with ``WWW-Authenticate: Bearer``.
"""

from __future__ import annotations

import hmac
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.types import Guard

from control.api.errors import unauthorized

ADMIN_SCHEME = "adminToken"
SD_SCHEME = "sdToken"


def bears(connection: ASGIConnection[Any, Any, Any, Any], *tokens: str) -> bool:
    """Whether the request's ``Authorization: Bearer`` is one of the non-empty ``tokens``
    (each compared in constant time, all of them always)."""
    scheme, _sep, given = connection.headers.get("authorization", "").partition(" ")
    presented = given.strip().encode()
    matches = [hmac.compare_digest(presented, t.encode()) for t in tokens if t]
    return scheme.lower() == "bearer" and any(matches)


def bearer_guard(*tokens: str) -> Guard:
    """Admits a request bearing any of the non-empty ``tokens``."""

    def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        if not bears(connection, *tokens):
            raise unauthorized()

    return guard


def sd_guards(sd_token: str, admin_token: str) -> list[Guard]:
    return [bearer_guard(sd_token, admin_token)] if sd_token else []
