"""The gateway under generated requests (Hypothesis): never a 5xx, never a hang, nothing left behind.

A live gateway worker (static mode with ``--no-auth``, and authenticated mode with keys from
PostgreSQL) in front of the simulator runs on the test's event loop; Hypothesis drives it from
a worker thread over blocking sockets with generated requests: methods, paths, header sets
(duplicates, odd casing, huge values, contradictory or bad ``Content-Length`` and
``Transfer-Encoding``), and bodies (valid and invalid JSON, wrong types in every field the gateway
reads, deep nesting, huge numbers, unicode edge cases, invalid UTF-8, NUL bytes), sometimes two
pipelined on one connection. Properties, per example: every response the gateway writes is
well-formed (``tests/support/strict_http.py``) with a status below 500; the exchange ends
within a deadline (a response, or the gateway closing the connection after one); and a valid
request on a new connection still succeeds. After the run: no request in flight, no connection
left open.

``HPCGATE_FUZZ_EXAMPLES`` sets the number of examples per mode (the suite's default is small;
e.g. 5000 for a long run). A failure Hypothesis finds is replayed first on the next run (its
database in ``.hypothesis/``); a fixed one becomes a regular test in ``test_api.py`` or
``test_sans_io.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.worker import Worker
from tests.gateway.conftest import SECRET, add_tenant, handler_tasks, running_gateway
from tests.support.procs import wait_until
from tests.support.sim import SimProcess
from tests.support.strict_http import FramingError, Response, ResponseParser

# The gateway under test runs in another thread and draws its routing tie-breaks from `random`;
# Hypothesis takes that for a strategy using the global random and warns. It is not one.
pytestmark = [pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning"),
              pytest.mark.serial]  # per-exchange deadlines: after the parallel rest (./dev.sh test)

EXAMPLES = int(os.environ.get("HPCGATE_FUZZ_EXAMPLES") or 300)
DEADLINE_S = 5.0  # per exchange; the gateway's request read timeout is 0.5 s
PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health", "/ready",
         "/metrics", "/v1/chat/completions?x=1", "/v1/nothing", "/", "//v1/chat/completions", "/v1/%00")

# -- generated requests --------------------------------------------------------------------------
_text = st.text(st.characters(codec="utf-8"), max_size=40)
_odd_text = st.sampled_from(["", "\x00", "\ud7ff", "\U0010ffff", "é" * 300, "\u202e", "m1\x00", " m1 ", "M1"])
_json_scalar = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                         st.floats(allow_nan=False), _text, _odd_text)
_json_any = st.recursive(_json_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(_text, inner, max_size=4)), max_leaves=12)
_messages = st.one_of(
    st.just([{"role": "user", "content": "hi"}]),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"]),
                                    "content": st.one_of(_text, _odd_text, _json_any)}), max_size=3),
    _json_any)


def _often(common: object, *rare: object, weight: int = 4) -> st.SearchStrategy[object]:
    """``common`` ``weight`` times as likely as each of ``rare``: most requests are valid but for
    one or two things, so generation reaches the code behind the first check."""
    return st.sampled_from([common] * weight + list(rare))


_PATH_OF = {"chat": "/v1/chat/completions", "completion": "/v1/completions", "embedding": "/v1/embeddings"}
_FIELD_OF = {"chat": "messages", "completion": "prompt", "embedding": "input"}


@st.composite
def _body(draw: st.DrawFn, kind: str) -> bytes:
    shape = draw(_often("object", "any-json", "raw", "nested", weight=8))
    if shape == "raw":
        return draw(st.binary(max_size=200))
    if shape == "nested":
        depth = draw(st.integers(1, 5000))
        return b"[" * depth + b"]" * draw(st.integers(0, depth))
    if shape == "any-json":
        return json.dumps(draw(_json_any)).encode()
    model = st.one_of(st.just("m1"), st.just("m1"), st.just("m1"), _odd_text, _json_scalar)
    doc: dict[str, object] = {"model": draw(model)}
    good = [{"role": "user", "content": "hi"}] if kind == "chat" else "hi"
    other = _messages if kind == "chat" else st.one_of(_text, st.lists(_text, max_size=3), _json_any)
    doc[_FIELD_OF.get(kind, "messages")] = draw(st.one_of(st.just(good), st.just(good), other))
    for key, values in (("stream", st.one_of(st.booleans(), _json_scalar)),
                        ("stream_options", st.one_of(st.none(), st.fixed_dictionaries(
                            {"include_usage": st.one_of(st.booleans(), _json_scalar)}), _json_any)),
                        ("max_tokens", st.one_of(st.integers(0, 4), st.integers(0, 4),
                                                 st.integers(-(2**64), 2**64), _json_scalar)),
                        ("ignore_eos", st.booleans())):
        if draw(st.booleans()):
            doc[key] = draw(values)
    if doc.get("ignore_eos") is True and not isinstance(doc.get("max_tokens"), int):
        doc["max_tokens"] = 4  # else the engine writes its whole context (32k tokens): not a hang
    body = json.dumps(doc, ensure_ascii=draw(st.booleans())).encode()
    mangle = draw(_often("none", "bad-utf8", "bad-utf8-value", "nul", "truncate", "dup-key", weight=3))
    if mangle == "bad-utf8":  # invalid UTF-8 inside a string the gateway decodes (the model name)
        body = body.replace(b'"model": ', b'"model": "\xff\xfe", "x": ', 1)
    elif mangle == "bad-utf8-value":  # ... and inside one it forwards as raw JSON
        body = body.replace(b'"hi"', b'"h\xc3\x28"', 1)
    elif mangle == "nul":
        body = body.replace(b'"', b'"\x00', 1)
    elif mangle == "truncate":
        body = body[: draw(st.integers(0, max(0, len(body) - 1)))]
    elif mangle == "dup-key":
        body = body.replace(b"{", b'{"model":"m2",', 1)
    return body


_random_path = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=60)


@st.composite
def _request(draw: st.DrawFn, key: str | None) -> bytes:
    kind = draw(st.sampled_from(["chat", "chat", "completion", "embedding"]))
    method = draw(_often("POST", "GET", "PUT", "DELETE", "OPTIONS", "HEAD", "post", "BREW", weight=14))
    path = draw(st.one_of(_often(_PATH_OF[kind], *PATHS, weight=24), _random_path.map(lambda p: "/" + p)))
    body = draw(_body(kind))
    headers: list[tuple[bytes, bytes]] = [(b"Host", b"t")]
    ctype = draw(_often(b"application/json", b"application/json; charset=utf-8", b"text/plain", b"",
                        b"application/JSON", None, weight=10))
    if ctype is not None:
        headers.append((draw(_often(b"Content-Type", b"content-type", b"CONTENT-TYPE")), ctype))
    if key is not None:
        token = key.encode()
        auth = draw(_often(b"Bearer " + token, b"Bearer " + token + b"x", b"bearer " + token, b"Bearer",
                           b"Basic Zm9vOmJhcg==", b"Bearer \xff", None, weight=12))
        if auth is not None:
            headers.append((b"Authorization", auth))
    framing = draw(_often("length", "none", "chunked", "both", "bad-length", "two-lengths", "short-length",
                          "negative", weight=14))
    if framing == "length":
        headers.append((b"Content-Length", b"%d" % len(body)))
    elif framing == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        body = b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    elif framing == "both":
        headers += [(b"Content-Length", b"%d" % len(body)), (b"Transfer-Encoding", b"chunked")]
    elif framing == "bad-length":
        bad = draw(st.sampled_from([b"abc", b"1e3", b"+5", b" ", b"99999999999999999"]))
        headers.append((b"Content-Length", bad))
    elif framing == "two-lengths":
        headers += [(b"Content-Length", b"%d" % len(body)), (b"Content-Length", b"%d" % (len(body) + 1))]
    elif framing == "short-length":  # the gateway waits for bytes that never come: 408, no hang
        headers.append((b"Content-Length", b"%d" % (len(body) + draw(st.integers(1, 100)))))
    elif framing == "negative":
        headers.append((b"Content-Length", b"-1"))
    for _ in range(draw(_often(0, 1, 2, 3))):
        names = [b"X-Request-Id", b"x-request-id", b"X-Odd", b"Accept", b"x-" + b"a" * 99]
        name = draw(st.sampled_from(names))
        one_line = st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
        value = draw(st.one_of(one_line, st.just(b"v" * draw(st.sampled_from([1, 9000, 70000])))))
        headers.append((name, value))
    head = b"%b %b HTTP/1.1\r\n" % (method.encode(), path.encode()) + b"".join(
        b"%b: %b\r\n" % h for h in headers) + b"\r\n"
    return head + body


# -- one exchange, from the Hypothesis thread ----------------------------------------------------
def _exchange(port: int, data: bytes, expect: int) -> tuple[list[Response], bool]:
    """Send ``data``; read until ``expect`` responses or the gateway closes. (responses, closed)"""
    parser = ResponseParser()
    responses: list[Response] = []
    deadline = time.monotonic() + DEADLINE_S
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:
        with contextlib.suppress(OSError):  # the gateway may answer and close before it took a large
            sock.sendall(data)  # body: read what it said
        while len(responses) < expect:
            left = deadline - time.monotonic()
            assert left > 0, f"no complete response within {DEADLINE_S} s to {data[:300]!r}"
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            except TimeoutError:
                raise AssertionError(f"hang: no response within {DEADLINE_S} s to {data[:300]!r}") from None
            if not chunk:
                assert not parser.in_message, f"a response cut short: {data[:300]!r}"
                return responses, True
            try:
                responses += parser.feed(chunk)
            except FramingError as exc:
                raise AssertionError(f"malformed response ({exc}) to {data[:300]!r}") from None
    return responses, False


def _valid_request(key: str | None) -> bytes:
    body = b'{"model":"m1","messages":[{"role":"user","content":"still there?"}],"max_tokens":2}'
    auth = b"Authorization: Bearer %b\r\n" % key.encode() if key else b""
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n%bContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (auth, len(body), body))


def _fuzz(port: int, key: str | None) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(first=_request(key), second=st.one_of(st.none(), _request(key)))
    def check(first: bytes, second: bytes | None) -> None:
        data = first if second is None else first + second
        responses, _ = _exchange(port, data, 1 if second is None else 2)
        for r in responses:
            assert r.status < 500, f"{r.status} {r.body[:300]!r} for {data[:400]!r}"
        (ok,), _ = _exchange(port, _valid_request(key), 1)  # the gateway still serves
        assert ok.status == 200, ok

    check()


async def _run_fuzz(gw: Worker, key: str | None) -> None:
    await asyncio.to_thread(_fuzz, gw.port, key)
    await wait_until(lambda: handler_tasks(gw) == 0, 10, "no request in flight")
    await wait_until(lambda: not gw.server.connections, 10, "every client connection closed")
    assert all(b.inflight == 0 for b in gw.gateway.backends.values())


@pytest.fixture
async def fuzz_gw(sim_a: SimProcess) -> AsyncIterator[Worker]:
    async with running_gateway(static_endpoints=(f"m1={sim_a.url}",), no_auth=True,
                               request_read_timeout_s=0.5, max_body_bytes=64 * 1024,
                               max_header_count=50) as gw:
        yield gw


async def test_generated_requests_never_get_a_5xx_in_static_mode(fuzz_gw: Worker) -> None:
    await _run_fuzz(fuzz_gw, None)


async def test_generated_requests_never_get_a_5xx_with_api_keys(sim_a: SimProcess, pg_dsn: str) -> None:
    _, key = await add_tenant(pg_dsn, "fuzz-tenant", allowed=["m1"])
    async with running_gateway(static_endpoints=(f"m1={sim_a.url}",), database_url=pg_dsn,
                               key_hash_secret=SECRET, request_read_timeout_s=0.5,
                               max_body_bytes=64 * 1024, max_header_count=50) as gw:
        await _run_fuzz(gw, key)
