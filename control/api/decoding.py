"""How the control API reads its input: percent-encoded path segments and strict JSON bodies.

Paths: model names contain ``/`` and are sent as ``%2F`` inside one segment. Litestar routes on
the decoded ``scope["path"]``, where that ``/`` would split the segment, so :func:`routing_path`
rebuilds the path from ``raw_path`` with each segment decoded except for ``%`` and ``/`` (which
stay ``%25`` and ``%2F``); after routing, :func:`decode_path_params` decodes the parameter values
exactly once. A name therefore never changes the route it addresses.

Bodies: :class:`ApiRequest` decodes the body straight into the type the handler declares for
``data``, strictly (no string-to-number coercion) and with the field's JSON path in the error;
Litestar hands a handler the ``data`` default when the body is empty (an update's default
changes nothing). A body that is not JSON is a 415, malformed JSON a 400, a field that fails
its type a 422.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import msgspec
from litestar import Request
from litestar.types import ASGIApp, Receive, Scope, Send

from control.api.errors import ApiError, validation_error


def routing_path(raw_path: bytes) -> str | None:
    """The path Litestar should route on, or None if a segment is not valid UTF-8."""
    path = raw_path.split(b"?", 1)[0].decode("latin-1")
    try:
        segments = [unquote(s, errors="strict") for s in path.split("/")]
    except UnicodeDecodeError:
        return None
    return "/".join(s.replace("%", "%25").replace("/", "%2F") for s in segments)


def decode_path_params(app: ASGIApp) -> ASGIApp:
    """Litestar middleware: the path parameters, decoded once (``org%2Fm`` -> ``org/m``)."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        params = scope.get("path_params")
        if params:
            scope["path_params"] = {k: unquote(v) if isinstance(v, str) else v for k, v in params.items()}
        await app(scope, receive, send)

    return middleware


class ApiRequest(Request[Any, Any, Any]):
    """A request whose ``json()`` is the route's ``data`` type, decoded by msgspec in strict mode."""

    async def json(self) -> Any:
        body = await self.body()
        content_type = self.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if body and content_type != "application/json" and not content_type.endswith("+json"):
            raise ApiError(415, "unsupported_media_type", "send application/json")
        field = self.route_handler.parsed_data_field
        try:
            return msgspec.json.decode(body, type=Any if field is None else field.annotation)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise validation_error(exc) from None
