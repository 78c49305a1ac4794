"""The data plane's OpenAPI 3.1 document, built from the gateway's own route tables.

Served at ``GET /openapi.json``. It is derived, not written by hand: the paths come from the
dispatch tables the gateway routes with (``gateway.app``, ``gateway.upload``), each POST path's
required fields and
whether it streams from :data:`gateway.request_view.REQUIRED` and ``STREAMABLE``, so the
document cannot list a route the gateway does not serve or miss one it does
(``tests/gateway/test_openapi.py`` checks both against the running gateway). Request bodies are
described by what the gateway checks (``model`` and the path's required fields); every other
field goes to the engine unchanged and is documented by vLLM and OpenAI. Built once, on first
request, and kept as bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import msgspec

from gateway.request_view import REQUIRED, STREAMABLE
from hpcgate import __version__

_SUMMARIES = {
    "chat": "Chat completion (OpenAI chat.completions)",
    "completions": "Text completion (OpenAI completions)",
    "embeddings": "Embeddings (OpenAI embeddings)",
    "responses": "Responses API (OpenAI responses)",
    "rerank": "Rerank documents against a query (vLLM, Jina/Cohere shape)",
    "score": "Score text pairs (vLLM)",
    "tokenize": "Tokenize a prompt or messages with the model's tokenizer (vLLM)",
    "detokenize": "Turn token ids back into text (vLLM)",
    "pooling": "Pooling model output (vLLM)",
    "classify": "Classify inputs (vLLM)",
}

_ERROR_STATUSES = {
    "400": "Malformed JSON, a required field missing or ill-typed",
    "401": "Missing, unknown, revoked or expired API key",
    "403": "The key's tenant may not use this model",
    "404": "Unknown model",
    "413": "Body over max_body_bytes",
    "415": "Content-Type is not application/json",
    "429": "Tenant over a limit (concurrency, tokens per minute, per model) or its monthly quota",
    "502": "Every tried endpoint failed before the first byte",
    "503": "No instance ready (starting, stopped, failed) or the model's queue is full",
    "504": "Upstream timed out",
}

_GET_DOCS: dict[str, tuple[str, bool, str]] = {  # path -> (summary, needs a key, content type)
    "/v1/models": ("Models this key may use, with state and aliases", True, "application/json"),
    "/health": ("Liveness", False, "application/json"),
    "/ready": ("Readiness: 200 once an endpoint table is held, else 503", False, "application/json"),
    "/metrics": ("Prometheus metrics (bearer metrics_token when set)", False, "text/plain"),
    "/openapi.json": ("This document", False, "application/json"),
}
MODEL_PATH = "/v1/models/{model}"


def _error_ref() -> dict[str, object]:
    return {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _post(kind: str) -> dict[str, object]:
    props: dict[str, object] = {"model": {"type": "string", "minLength": 1,
                                          "description": "a model name or alias"}}
    required = ["model"]
    any_of: list[object] = []
    for names, _first, what in REQUIRED[kind]:
        for n in names:
            props[n] = {"description": what}
        if len(names) == 1:
            required.append(names[0])
        else:
            any_of.append({"anyOf": [{"required": [n]} for n in names]})
    if kind in STREAMABLE:
        props["stream"] = {"type": "boolean"}
    else:
        props["stream"] = {"type": "boolean", "enum": [False]}
    schema: dict[str, object] = {"type": "object", "properties": props, "required": required,
                                 "additionalProperties": True}
    if any_of:
        schema["allOf"] = any_of
    ok: dict[str, object] = {"application/json": {"schema": {"type": "object"}}}
    if kind in STREAMABLE:
        ok["text/event-stream"] = {"schema": {"type": "string"}}
    responses: dict[str, object] = {"200": {"description": "The engine's answer, relayed", "content": ok}}
    responses |= {code: {"description": why, **_error_ref()} for code, why in _ERROR_STATUSES.items()}
    return {"summary": _SUMMARIES[kind], "security": [{"apiKey": []}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": responses}


def _upload(path: str) -> dict[str, object]:
    schema = {"type": "object", "required": ["model", "file"], "properties": {
        "model": {"type": "string", "description": "a model name or alias; must come before the file"},
        "file": {"type": "string", "format": "binary"}}, "additionalProperties": True}
    responses: dict[str, object] = {"200": {"description": "The engine's answer, relayed",
                                            "content": {"application/json": {"schema": {"type": "object"}}}}}
    responses |= {code: {"description": why, **_error_ref()} for code, why in _ERROR_STATUSES.items()}
    responses["408"] = {"description": "The upload stalled", **_error_ref()}
    what = "Transcribe" if path.endswith("transcriptions") else "Translate"
    return {"summary": f"{what} audio (OpenAI audio API), relayed to the engine as it is uploaded",
            "security": [{"apiKey": []}], "operationId": "post" + path.replace("/", "_"),
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}},
            "responses": responses}


def build_document(post_paths: Mapping[bytes, str], get_paths: Iterable[bytes],
                   upload_paths: Iterable[bytes] = ()) -> bytes:
    """The document for these route tables (path -> kind for POST; GET paths; multipart uploads)."""
    paths: dict[str, dict[str, object]] = {}
    for raw in upload_paths:
        paths[raw.decode()] = {"post": _upload(raw.decode())}
    for raw, kind in post_paths.items():
        path = raw.decode()
        op = _post(kind)
        op["operationId"] = kind + path.replace("/", "_").replace("-", "_")
        paths[path] = {"post": op}
    for raw in get_paths:
        path = raw.decode()
        summary, keyed, ctype = _GET_DOCS[path]
        op = {"summary": summary, "operationId": "get" + path.replace("/", "_").replace(".", "_"),
              "responses": {"200": {"description": "OK", "content": {ctype: {"schema": {}}}}}}
        if keyed:
            op["security"] = [{"apiKey": []}]
            op["responses"]["401"] = {"description": _ERROR_STATUSES["401"], **_error_ref()}  # type: ignore[index]
        if path == "/ready":
            op["responses"]["503"] = {"description": "No endpoint table yet", **_error_ref()}  # type: ignore[index]
        if path == "/metrics":
            op["responses"]["401"] = {"description": "metrics_token required", **_error_ref()}  # type: ignore[index]
        paths[path] = {"get": op}
    paths[MODEL_PATH] = {"get": {
        "summary": "One model (OpenAI models.retrieve): state, aliases, owner, context length",
        "operationId": "get_v1_models_model", "security": [{"apiKey": []}],
        "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {"200": {"description": "OK",
                              "content": {"application/json": {"schema": {"type": "object"}}}},
                      "401": {"description": _ERROR_STATUSES["401"], **_error_ref()},
                      "404": {"description": "Unknown model, or one the key may not use", **_error_ref()}}}}
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "hpcgate data plane", "version": __version__,
                 "description": "OpenAI-compatible inference API of the hpcgate gateway. Every response "
                                "carries x-request-id."},
        "paths": dict(sorted(paths.items())),
        "components": {
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["message", "type"],
                "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                               "param": {"type": ["string", "null"]},
                               "code": {"type": ["string", "null"]}}}}}},
        },
    }
    return msgspec.json.encode(doc)
