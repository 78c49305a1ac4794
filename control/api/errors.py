"""Every error answer of the control API is an :class:`control.wire.ErrorBody`; this module
turns each exception the API can meet into one.

Invariants:
- client mistakes are 4xx with a stable ``error`` code and a reason: malformed JSON 400, a
  field that fails its type 422 naming it (``$.field`` in the body, ``query.x``, ``path.x``),
  unknown route 404, wrong method 405 (with ``Allow``), body too large 413, not JSON 415,
  missing or wrong token 401 (with ``WWW-Authenticate: Bearer``);
- store errors map to 404/409/422, a database outage to 503 with ``Retry-After: 1``;
- anything else is a bug: logged as ``api_internal_error`` and answered 500 without details.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import (
    HTTPException,
    MethodNotAllowedException,
    NotFoundException,
    ValidationException,
)
from litestar.status_codes import HTTP_413_REQUEST_ENTITY_TOO_LARGE

from control.store.db import ConflictError, InvalidError, NotFoundError, StoreUnavailableError
from control.store.registration import RegistrationRejectedError
from control.wire import ErrorBody
from hpcgate.logs import get_logger

log = get_logger("hpcgate.control.api")

_PATH_RE = re.compile(r"\s*-\s*at `\$([^`]*)`")
# Where a Litestar validation message says the value came from -> how our ``path`` names it.
_SOURCE_PREFIX = {"body": "$.", "query": "query.", "path": "path."}


class ApiError(Exception):
    """An answer other than 2xx, raised anywhere below the handlers."""

    def __init__(self, status: int, error: str, message: str, path: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(error=error, message=message, path=path)
        self.headers = dict(headers or {})


def unauthorized() -> ApiError:
    return ApiError(401, "unauthorized", "missing or wrong bearer token",
                    headers={"www-authenticate": "Bearer"})


def validation_error(exc: msgspec.ValidationError | msgspec.DecodeError) -> ApiError:
    """A body that msgspec refused: 422 naming the field, or 400 if it is not JSON at all."""
    text = str(exc)
    match = _PATH_RE.search(text)
    path = f"${match.group(1)}" if match else None
    if isinstance(exc, msgspec.ValidationError):
        return ApiError(422, "validation_error", _PATH_RE.sub("", text), path)
    return ApiError(400, "malformed_json", text, path)


def respond(err: ApiError) -> Response[ErrorBody]:
    return Response(err.body, status_code=err.status, headers=err.headers, media_type="application/json")


def _api_error(_: Request[Any, Any, Any], exc: ApiError) -> Response[ErrorBody]:
    return respond(exc)


def _store_error(_: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    if isinstance(exc, RegistrationRejectedError):
        code = {401: "unauthorized", 409: "conflict"}.get(exc.status, "validation_error")
        return respond(ApiError(exc.status, code, exc.message, exc.path))
    if isinstance(exc, NotFoundError):
        return respond(ApiError(404, "not_found", str(exc)))
    if isinstance(exc, ConflictError):
        return respond(ApiError(409, "conflict", str(exc)))
    if isinstance(exc, InvalidError):
        return respond(ApiError(422, "validation_error", str(exc)))
    return respond(ApiError(503, "unavailable", str(exc), headers={"retry-after": "1"}))


def _invalid_parameter(request: Request[Any, Any, Any], exc: ValidationException) -> Response[ErrorBody]:
    """A query or path parameter (or a missing body) that Litestar's signature check refused."""
    problems: list[dict[str, str]] = exc.extra if isinstance(exc.extra, list) else []
    first = problems[0] if problems else {}
    key, source = first.get("key", ""), first.get("source", "")
    message = first.get("message", exc.detail)
    if source == "body" and key == "data":  # no body at all where one is required
        return respond(ApiError(422, "validation_error", "a JSON body is required", "$"))
    field = request.route_handler.parsed_fn_signature.parameters.get(key)
    alias = getattr(field.kwarg_definition, "name", None) if field is not None else None  # e.g. state
    path = f"{_SOURCE_PREFIX[source]}{alias or key}" if key and source in _SOURCE_PREFIX else None
    return respond(ApiError(422, "validation_error", message, path))


def _http_exception(_: Request[Any, Any, Any], exc: HTTPException) -> Response[ErrorBody]:
    """Litestar's own refusals (routing, body size): the same codes as every other error."""
    headers = dict(exc.headers or {})
    if isinstance(exc, NotFoundException):
        return respond(ApiError(404, "not_found", "no such route"))
    if isinstance(exc, MethodNotAllowedException):
        allowed = headers.get("allow", "")
        return respond(ApiError(405, "method_not_allowed", f"use {allowed}", headers=headers))
    if exc.status_code == HTTP_413_REQUEST_ENTITY_TOO_LARGE:
        return respond(ApiError(413, "body_too_large", "request body too large"))
    if 400 <= exc.status_code < 500:
        return respond(ApiError(exc.status_code, "bad_request", exc.detail, headers=headers))
    return _internal_error(_, exc)


def _internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    # Litestar calls exception handlers inside its ``except`` block: the traceback is current.
    log.exception("api_internal_error", route=request.scope.get("path_template", "?"), error=repr(exc))
    return respond(ApiError(500, "internal_error", "internal error"))


ExceptionHandler = Callable[[Request[Any, Any, Any], Any], Response[ErrorBody]]

EXCEPTION_HANDLERS: dict[type[Exception], ExceptionHandler] = {
    ApiError: _api_error,
    RegistrationRejectedError: _store_error,
    NotFoundError: _store_error,
    ConflictError: _store_error,
    InvalidError: _store_error,
    StoreUnavailableError: _store_error,
    ValidationException: _invalid_parameter,
    HTTPException: _http_exception,
    Exception: _internal_error,
}
