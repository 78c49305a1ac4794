"""The data plane's OpenAPI document (``GET /openapi.json``) against what the gateway serves.

Every documented operation is called on a live gateway (API key, simulator behind it) with a
body built from the documented schema and answers with a documented status and content type;
a body without a documented required field gets the documented 400; the document's paths are
exactly the gateway's routes, and a path it does not list is not served.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from gateway import app
from gateway.openapi import MODEL_PATH
from gateway.upload import UPLOAD_PATHS
from gateway.worker import Worker
from tests.gateway.conftest import SECRET, add_tenant, post, raw_exchange, running_gateway
from tests.support.sim import SimProcess

SAMPLES: dict[str, Any] = {
    "messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "input": "hi", "query": "q",
    "documents": ["a document"], "text_1": "a", "text_2": "b", "tokens": [1, 2],
}


@pytest.fixture(scope="module")
async def key(pg_dsn: str) -> str:
    return (await add_tenant(pg_dsn, "openapi-tenant"))[1]


@pytest.fixture(scope="module")
async def gw(sim_a: SimProcess, pg_dsn: str, key: str) -> AsyncIterator[Worker]:
    async with running_gateway(static_endpoints=(f"m1={sim_a.url}",), database_url=pg_dsn,
                               key_hash_secret=SECRET) as worker:
        yield worker


@pytest.fixture(scope="module")
async def doc(gw: Worker) -> dict[str, Any]:
    reply = await raw_exchange(gw.port, b"GET /openapi.json HTTP/1.1\r\nHost: t\r\n\r\n")
    assert reply.status == 200 and reply.headers["content-type"].startswith("application/json")
    document: dict[str, Any] = reply.json()
    assert document["openapi"] == "3.1.0" and document["info"]["title"] == "hpcgate data plane"
    return document


def _body(op: dict[str, Any], drop: str | None = None) -> bytes:
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    body: dict[str, Any] = {"model": "m1"}
    for name in schema["required"]:
        if name != "model":
            body[name] = SAMPLES[name]
    for alternatives in schema.get("allOf", ()):
        first = alternatives["anyOf"][0]["required"][0]
        body[first] = SAMPLES[first]
    if schema["properties"]["stream"].get("enum") != [False]:  # a generating path: keep it short
        body |= {"max_tokens": 2, "max_output_tokens": 2}
    if drop is not None:
        body.pop(drop)
    return msgspec.json.encode(body)


def _upload(path: str, key: str | None) -> bytes:
    body = (b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\nm1\r\n--B\r\nContent-Disposition: '
            b'form-data; name="file"; filename="a.wav"\r\n\r\nRIFF\r\n--B--\r\n')
    auth = b"Authorization: Bearer %b\r\n" % key.encode() if key is not None else b""
    return (b"POST %b HTTP/1.1\r\nHost: t\r\n%bContent-Type: multipart/form-data; "
            b"boundary=B\r\nContent-Length: %d\r\n\r\n%b") % (path.encode(), auth, len(body), body)


def _get(path: str, key: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\n\r\n".encode()


async def test_every_documented_operation_answers_as_documented(gw: Worker, doc: dict[str, Any],
                                                                key: str) -> None:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if "multipart/form-data" in op.get("requestBody", {}).get("content", {}):
                reply = await raw_exchange(gw.port, _upload(path, key))
                assert reply.status == 200 and "200" in op["responses"], (path, reply)
                bare = await raw_exchange(gw.port, _upload(path, None))
                assert bare.status == 401 and "401" in op["responses"], (path, bare)
                continue
            if method == "post":
                reply = await raw_exchange(gw.port, post(path, _body(op), key))
            else:
                reply = await raw_exchange(gw.port, _get(path.replace("{model}", "m1"), key))
            documented = op["responses"][str(reply.status)]  # KeyError: an undocumented status
            assert reply.status == 200, (path, reply)
            ctype = reply.headers["content-type"].split(";")[0]
            assert ctype in documented["content"], (path, ctype)
            if method == "post":
                required = op["requestBody"]["content"]["application/json"]["schema"]["required"]
                missing = await raw_exchange(gw.port, post(path, _body(op, drop=required[-1]), key))
                assert missing.status == 400 and "400" in op["responses"], (path, missing)
                assert required[-1] in missing.json()["error"]["message"]
            if op.get("security"):  # documented as needing a key: without one, the documented 401
                bare = (post(path, _body(op)) if method == "post"
                        else f"GET {path.replace('{model}', 'm1')} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
                assert (await raw_exchange(gw.port, bare)).status == 401 and "401" in op["responses"]


async def test_the_documented_paths_are_the_served_routes(gw: Worker, doc: dict[str, Any], key: str) -> None:
    served = ({p.decode() for p in app._POST_PATHS} | {p.decode() for p in app._GET_PATHS} | {MODEL_PATH}
              | {p.decode() for p in UPLOAD_PATHS})
    assert set(doc["paths"]) == served
    for path, kind in app._POST_PATHS.items():
        assert doc["paths"][path.decode()]["post"]["summary"], kind
    reply = await raw_exchange(gw.port, post("/v1/audio/speech", b"{}", key))
    assert reply.status == 404 and reply.json()["error"]["code"] == "unknown_url"
