"""The OpenAPI 3.1 document of the control API, generated from the route table's msgspec types.

msgspec's JSON Schema (``schema_components``) is JSON Schema 2020-12, which is what OpenAPI 3.1
uses, so the component schemas go in unchanged. Built once at start.
"""

from __future__ import annotations

from typing import Any

import msgspec

from control.api.http import Route
from control.wire import ErrorBody

_REF = "#/components/schemas/{name}"
_STATUS_TEXT = {
    400: "Malformed JSON",
    401: "Missing or wrong token",
    404: "Not found",
    409: "Conflict",
    413: "Body too large",
    415: "Not JSON",
    422: "Validation error",
    503: "Database unavailable",
}


def _param_schema(tp: Any) -> dict[str, Any]:
    (schema,), components = msgspec.json.schema_components([tp], ref_template=_REF)
    if components:  # parameters are scalars; anything else would need the components too
        raise ValueError(f"parameter type {tp!r} is not a scalar")
    return schema


def _query_params(cls: Any) -> list[dict[str, Any]]:
    """One query parameter per field of the query Struct, with the field's schema."""
    (_ref,), components = msgspec.json.schema_components([cls], ref_template=_REF)
    own = components[cls.__name__]
    required = set(own.get("required", ()))
    return [
        {"name": name, "in": "query", "required": name in required, "schema": schema}
        for name, schema in own["properties"].items()
    ]


def build_openapi(routes: list[Route], *, title: str, version: str) -> dict[str, Any]:
    types = {ErrorBody}
    for r in routes:
        types.update(t for t in (r.body, r.response) if t is not None)
    ordered = list(types)
    schemas, components = msgspec.json.schema_components(ordered, ref_template=_REF)
    ref = dict(zip(map(repr, ordered), schemas, strict=True))
    error = {"content": {"application/json": {"schema": ref[repr(ErrorBody)]}}}

    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        op: dict[str, Any] = {"summary": r.summary, "tags": [r.tag], "operationId": r.handler.__name__}
        params = [
            {"name": n, "in": "path", "required": True, "schema": _param_schema(t)}
            for n, t in r.params.items()
        ]
        if r.query is not None:
            params += _query_params(r.query)
        if params:
            op["parameters"] = params
        if r.body is not None:
            # An empty body means {}: optional when every field has a default (the updates).
            op["requestBody"] = {
                "required": bool(components[r.body.__name__].get("required")),
                "content": {"application/json": {"schema": ref[repr(r.body)]}},
            }
        responses: dict[str, Any] = {
            str(r.status): {
                "description": "OK",
                "content": {"application/json": {"schema": ref[repr(r.response)]}},
            },
        }
        codes = {422, 503, *r.errors}
        if r.body is not None:
            codes |= {400, 413, 415}
        if r.auth == "admin":
            codes.add(401)
            op["security"] = [{"adminToken": []}]
        elif r.auth == "sd":
            codes.add(401)
            op["security"] = [{"sdToken": []}, {}]
        else:
            op["security"] = []
        for code in sorted(codes):
            responses[str(code)] = {"description": _STATUS_TEXT.get(code, "Error"), **error}
        op["responses"] = responses
        paths.setdefault(r.path, {})[r.method.lower()] = op

    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "adminToken": {"type": "http", "scheme": "bearer", "description": "the admin_token setting"},
                "sdToken": {"type": "http", "scheme": "bearer", "description": "the api.sd_token setting"},
            },
        },
    }
