"""The Files and Batch APIs under generated input (Hypothesis), through the gateway's relay:
batch bodies with wrong types and values in every field, junk ids and paging parameters, and
uploads with odd purposes, names and forms. Property: never a 5xx, and the control API's log
holds no ``api_internal_error``. ``HPCGATE_FUZZ_EXAMPLES`` scales the count (a tenth of it here).
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any
from urllib.parse import quote

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.batch.conftest import BatchStack, chat_line, jsonl

EXAMPLES = max(20, int(os.environ.get("HPCGATE_FUZZ_EXAMPLES") or 300) // 10)
_run = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

_odd = st.sampled_from(["", "\x00", "..", "file-", "batch_", "%2F", "é" * 100, "9" * 40, "-1", "null",
                        "/v1/chat/completions", "/v1/embeddings", "24h", "1h", "999999h", "batch", "x" * 600])
_text = st.one_of(st.text(max_size=40), _odd)
_scalar = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**63),
                    st.floats(allow_nan=False, allow_infinity=False), _text)
_value = st.recursive(_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(_text, inner, max_size=3)), max_leaves=8)


@st.composite
def _batch_body(draw: st.DrawFn, file_id: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "input_file_id": draw(st.one_of(st.just(file_id), _value)),
        "endpoint": draw(st.one_of(st.just("/v1/chat/completions"), _value)),
        "completion_window": draw(st.one_of(st.just("24h"), _value)),
    }
    if draw(st.booleans()):
        body["metadata"] = draw(_value)
    for name in draw(st.lists(st.sampled_from(sorted(body)), max_size=2)):
        body.pop(name, None)
    return body


def _fuzz(base_url: str, key: str, file_id: str) -> None:
    with httpx.Client(base_url=base_url, timeout=30, headers={"authorization": f"Bearer {key}"}) as client:
        @_run
        @given(body=_batch_body(file_id), segment=_text, after=_text, limit=st.one_of(_text, st.integers()),
               purpose=st.one_of(st.just("batch"), _text), name=_text, content=st.binary(max_size=300))
        def check(body: dict[str, Any], segment: str, after: str, limit: object, *, purpose: str,
                  name: str, content: bytes) -> None:
            seg = quote(segment, safe="")
            as_json = {"content-type": "application/json"}
            replies = [
                client.post("/batches", content=json.dumps(body), headers=as_json),
                client.get(f"/batches/{seg}"),
                client.post(f"/batches/{seg}/cancel"),
                client.get("/batches", params={"after": after, "limit": str(limit)}),
                client.get(f"/files/{seg}"),
                client.get(f"/files/{seg}/content"),
                client.delete(f"/files/{seg}"),
                client.get("/files", params={"purpose": purpose, "after": after, "limit": str(limit)}),
                client.post("/files", data={"purpose": purpose}, files={"file": (name or "f", content)}),
            ]
            for reply in replies:
                assert reply.status_code < 500, (reply.request.method, reply.request.url, reply.status_code,
                                                 reply.text[:300])

        check()


async def test_generated_batch_and_file_requests_never_get_a_5xx(batch_stack: BatchStack) -> None:
    key = await batch_stack.tenant("batch-fuzz")
    async with httpx.AsyncClient(base_url=batch_stack.base_url, timeout=30,
                                 headers={"authorization": f"Bearer {key}"}) as client:
        up = await client.post("/files", data={"purpose": "batch"},
                               files={"file": ("in.jsonl", jsonl([chat_line("hi")]))})
        assert up.status_code == 200, up.text
    await asyncio.to_thread(_fuzz, batch_stack.base_url, key, up.json()["id"])
    assert not batch_stack.api.events("api_internal_error"), batch_stack.api.events("api_internal_error")[:3]
