"""A small typed ASGI layer for the control API: routes, decoding, errors, auth.

Why not a framework: the control API is ~25 JSON routes whose request and response bodies are
msgspec Structs. A route table of :class:`Route` (method, path template, handler, and the
types used for the OpenAPI document) plus decoding helpers covers it in one module, with no
second validation library next to msgspec. Granian runs the ASGI app (see ``main.py``).

Invariants:
- paths are matched on ``raw_path`` split at ``/`` and percent-decoded per segment, so a
  model name containing ``/`` is addressed as ``%2F`` and never changes the route;
- a body is read up to ``max_body_bytes`` (413 beyond) and decoded straight into the route's
  Struct; a validation error is a 422 naming the field (``$.field``, ``query.x``, ``path.x``);
- every error answer is an :class:`control.wire.ErrorBody`; store errors map to 404/409/422,
  a database outage to 503 with ``Retry-After``; an unexpected exception is logged and
  answered 500 without details (it is a bug: every input is validated before use).
"""

from __future__ import annotations

import hmac
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl, unquote

import msgspec

from control.store.db import ConflictError, InvalidError, NotFoundError, StoreUnavailableError
from control.store.registration import RegistrationRejectedError
from control.wire import ErrorBody
from hpcgate.logs import get_logger

log = get_logger("hpcgate.control.api")

T = TypeVar("T")
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Auth = Literal["none", "admin", "sd"]

_JSON_HEADERS = [(b"content-type", b"application/json")]
_PATH_RE = re.compile(r"\s*-\s*at `\$([^`]*)`")
_encode = msgspec.json.Encoder().encode


class HttpError(Exception):
    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        path: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(error=error, message=message, path=path)
        self.headers = headers or []


def validation_error(exc: msgspec.ValidationError | msgspec.DecodeError, where: str) -> HttpError:
    """A 422 naming the field: ``where`` is "$" (body), "query" or "path"."""
    text = str(exc)
    match = _PATH_RE.search(text)
    path = None
    if match:
        rest = match.group(1)
        path = f"${rest}" if where == "$" else f"{where}{rest}"
    elif where != "$":
        path = where
    if isinstance(exc, msgspec.ValidationError):
        return HttpError(422, "validation_error", _PATH_RE.sub("", text), path)
    return HttpError(400 if where == "$" else 422, "malformed_json", text, path)


@dataclass(slots=True)
class Call:
    """One request as a handler sees it."""

    method: str
    params: dict[str, str]
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self, cls: type[T]) -> T:
        try:
            return msgspec.json.decode(self.body or b"{}", type=cls)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise validation_error(exc, "$") from None

    def query_as(self, cls: type[T]) -> T:
        try:
            return msgspec.convert(self.query, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise validation_error(exc, "query") from None

    def param(self, name: str, cls: type[T]) -> T:
        try:
            return msgspec.convert(self.params[name], cls, strict=False)
        except msgspec.ValidationError as exc:
            raise validation_error(exc, f"path.{name}") from None


Handler = Callable[[Call], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str  # template, e.g. "/admin/models/{name}/drain"
    handler: Handler
    auth: Auth
    summary: str
    tag: str
    body: Any = None  # request body type, for decoding docs
    query: Any = None  # Struct of query parameters
    response: Any = None  # response body type
    status: int = 200
    params: dict[str, Any] = field(default_factory=dict)  # path parameter types
    errors: tuple[int, ...] = ()  # documented 4xx answers besides 401/422

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.strip("/").split("/"))


class Router:
    def __init__(self, routes: list[Route]) -> None:
        self.routes = routes
        self._compiled = [(r, r.segments) for r in routes]

    def match(self, method: str, segments: list[str]) -> tuple[Route, dict[str, str]]:
        allowed: list[str] = []
        for route, template in self._compiled:
            if len(template) != len(segments):
                continue
            params: dict[str, str] = {}
            for want, got in zip(template, segments, strict=True):
                if want.startswith("{"):
                    params[want[1:-1]] = got
                elif want != got:
                    break
            else:
                if route.method == method:
                    return route, params
                allowed.append(route.method)
        if allowed:
            raise HttpError(
                405,
                "method_not_allowed",
                f"use {', '.join(allowed)}",
                headers=[(b"allow", ", ".join(allowed).encode())],
            )
        raise HttpError(404, "not_found", "no such route")


class ApiApp:
    """The ASGI application: routing, auth, body limits, error mapping, one access log line."""

    def __init__(self, router: Router, *, admin_token: str, sd_token: str, max_body_bytes: int) -> None:
        self.router = router
        self._tokens: dict[Auth, str] = {"admin": admin_token, "sd": sd_token}
        self._max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        started = time.monotonic()
        status, route_path = 500, "?"
        try:
            route, call = await self._prepare(scope, receive)
            route_path = route.path
            result = await route.handler(call)
            status = route.status
            await _respond(send, status, _encode(result))
        except HttpError as exc:
            status = exc.status
            await _respond(send, status, _encode(exc.body), exc.headers)
        except Exception as exc:
            error = _map_store_error(exc)
            if error is None:
                log.exception("api_internal_error", path=route_path)
                error = HttpError(500, "internal_error", "internal error")
            status = error.status
            await _respond(send, status, _encode(error.body), error.headers)
        finally:
            log.info(
                "api_request",
                method=scope.get("method"),
                route=route_path,
                status=status,
                duration_ms=round((time.monotonic() - started) * 1000, 2),
            )

    async def _prepare(self, scope: Scope, receive: Receive) -> tuple[Route, Call]:
        raw = scope.get("raw_path") or scope["path"].encode()
        raw_path = raw.split(b"?", 1)[0].decode("latin-1")
        try:
            segments = [unquote(s, errors="strict") for s in raw_path.strip("/").split("/")]
        except UnicodeDecodeError:
            raise HttpError(404, "not_found", "path is not valid UTF-8") from None
        route, params = self.router.match(scope["method"], segments)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        self._authorize(route.auth, headers.get("authorization", ""))
        try:
            query = dict(
                parse_qsl(scope.get("query_string", b"").decode(), keep_blank_values=True, errors="strict")
            )
        except (UnicodeDecodeError, ValueError):
            raise HttpError(422, "validation_error", "query string is not valid UTF-8", "query") from None
        body = await self._read_body(receive, headers)
        return route, Call(scope["method"], params, query, headers, body)

    def _authorize(self, auth: Auth, header: str) -> None:
        if auth == "none":
            return
        token = self._tokens[auth]
        if auth == "sd" and not token:
            return  # service discovery is open unless sd_token is set (its labels hold no secrets)
        accepted = [token] if auth == "admin" else [token, self._tokens["admin"]]
        scheme, _, given = header.partition(" ")
        presented = given.strip().encode()
        matches = [hmac.compare_digest(presented, t.encode()) for t in accepted if t]
        if scheme.lower() != "bearer" or not any(matches):
            raise HttpError(
                401,
                "unauthorized",
                "missing or wrong bearer token",
                headers=[(b"www-authenticate", b"Bearer")],
            )

    async def _read_body(self, receive: Receive, headers: dict[str, str]) -> bytes:
        ctype = headers.get("content-type", "application/json").split(";")[0].strip().lower()
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                raise HttpError(413, "body_too_large", f"body larger than {self._max_body} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body and ctype != "application/json" and not ctype.endswith("+json"):
            raise HttpError(415, "unsupported_media_type", "send application/json")
        return body


def _map_store_error(exc: Exception) -> HttpError | None:
    if isinstance(exc, RegistrationRejectedError):
        code = {401: "unauthorized", 409: "conflict"}.get(exc.status, "validation_error")
        return HttpError(exc.status, code, exc.message, exc.path)
    if isinstance(exc, NotFoundError):
        return HttpError(404, "not_found", str(exc))
    if isinstance(exc, ConflictError):
        return HttpError(409, "conflict", str(exc))
    if isinstance(exc, InvalidError):
        return HttpError(422, "validation_error", str(exc))
    if isinstance(exc, StoreUnavailableError):
        return HttpError(503, "unavailable", str(exc), headers=[(b"retry-after", b"1")])
    return None


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*_JSON_HEADERS, (b"content-length", str(len(body)).encode()), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": body})
