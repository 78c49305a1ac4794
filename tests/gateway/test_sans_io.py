"""Unit tests of the gateway's sans-IO parts: fed bytes and data, no sockets, no sleeps."""

from __future__ import annotations

import time

import msgspec
import pytest

from gateway.auth import Authenticator, index_from_key_table
from gateway.backend import Backend
from gateway.balancer import choose
from gateway.errors import ApiError
from gateway.http_parse import FramingError, RequestFramer
from gateway.request_view import ask_for_usage, parse_view
from gateway.routing_table import table_from_snapshot
from gateway.settings import parse_static_endpoints
from gateway.sse import SseScanner
from gateway.upstream_client import UpstreamPool
from hpcgate.metrics_text import parse_engine_load
from hpcgate.schemas import (
    ApiKeyEntry,
    EndpointEntry,
    EndpointTable,
    KeyTable,
    ModelEntry,
    ModelState,
    TenantEntry,
    hash_api_key,
)
from hpcgate.settings import SettingsError


def framer(max_body: int = 1000, headers: int = 10, header_bytes: int = 1000) -> RequestFramer:
    return RequestFramer(max_body, headers, header_bytes)


# -- request framing --------------------------------------------------------------------------
def test_request_split_across_reads_and_pipelined() -> None:
    f = framer()
    raw = (b"POST /v1/x?a=1 HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n"
           b"Content-Length: 4\r\n\r\nabcd")
    done = []
    for i in range(len(raw)):  # one byte at a time
        done += f.feed(raw[i:i + 1])
        assert f.in_message == (i < len(raw) - 1)
    assert len(done) == 1
    req = done[0]
    assert (req.method, req.path, req.body, req.keep_alive) == (b"POST", b"/v1/x?a=1", b"abcd", True)
    assert req.headers[b"content-type"] == b"application/json"
    two = f.feed(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.0\r\n\r\n")
    assert [r.path for r in two] == [b"/a", b"/b"]
    assert two[1].keep_alive is False


def test_chunked_body_is_joined() -> None:
    f = framer()
    reqs = f.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert reqs[0].body == b"abcde"


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"POST / HTTP/1.1\r\nContent-Length: 5000\r\n\r\n", 413),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n7d0\r\n" + b"x" * 2000 + b"\r\n", 413),
        (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(11)) + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"y" * 2000 + b"\r\n\r\n", 431),
        (b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n", 400),
    ],
)
def test_framing_limits(raw: bytes, status: int) -> None:
    with pytest.raises(FramingError) as err:
        framer().feed(raw)
    assert err.value.status == status


# -- request view ------------------------------------------------------------------------------
def test_view_reads_only_routing_fields() -> None:
    v = parse_view("chat", b'{"model":"m","messages":[{"role":"user","content":"x"}],"stream":true,'
                           b'"stream_options":{"include_usage":true},"temperature":0.5}')
    assert (v.model, v.stream, v.stream_options is not None) == ("m", True, True)


@pytest.mark.parametrize(
    ("kind", "body", "param"),
    [
        ("chat", b"", None),
        ("chat", b"{not json", None),
        ("chat", b"[1,2]", None),
        ("chat", b'"str"', None),
        ("chat", b'{"messages":[]}', None),
        ("chat", b'{"model":5,"messages":[]}', "model"),
        ("chat", b'{"model":"","messages":[]}', "model"),
        ("chat", b'{"model":"m"}', "messages"),
        ("chat", b'{"model":"m","messages":"hi"}', "messages"),
        ("chat", b'{"model":"m","messages":[],"stream":"yes"}', "stream"),
        ("completions", b'{"model":"m","prompt":5}', "prompt"),
        ("embeddings", b'{"model":"m"}', "input"),
        ("embeddings", b'{"model":"m","input":"x","stream":true}', "stream"),
        ("chat", b'{"model":"\xff\xfe","messages":[]}', None),  # invalid UTF-8 in a string: was a 500
    ],
)
def test_view_rejects_bad_bodies_with_400(kind: str, body: bytes, param: str | None) -> None:
    with pytest.raises(ApiError) as err:
        parse_view(kind, body)
    assert err.value.status == 400
    if param is not None:
        assert err.value.param == param


@pytest.mark.parametrize("options", [None, b"null", b"{}", b'{"include_usage":false}',
                                     b'{"include_usage":null,"continuous_usage_stats":true}'])
def test_the_engine_is_always_asked_for_usage_and_the_rest_of_the_body_kept(options: bytes | None) -> None:
    extra = b"" if options is None else b',"stream_options":' + options
    body = b'  {"model":"m","messages":[{"role":"user","content":"\xc3\xa9"}],"stream":true%b}' % extra
    view = parse_view("chat", body)
    out = msgspec.json.decode(ask_for_usage(body, view.stream_options is not msgspec.UNSET))
    assert out["stream_options"]["include_usage"] is True
    if options and b"continuous" in options:
        assert out["stream_options"]["continuous_usage_stats"] is True  # other options kept
    assert out["model"] == "m" and out["messages"][0]["content"] == "é" and out["stream"] is True


# -- SSE ---------------------------------------------------------------------------------------
CHUNK = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}\n\n'
DONE = b"data: [DONE]\n\n"


@pytest.mark.parametrize("strip", [True, False])
def test_sse_scanner_finds_and_strips_usage_across_split_reads(strip: bool) -> None:
    stream = CHUNK * 3 + USAGE + DONE
    for cut in range(1, len(stream)):  # every split point of the stream into two reads
        s = SseScanner(strip_usage=strip)
        out = s.feed(stream[:cut]) + s.feed(stream[cut:]) + s.flush()
        assert out == (CHUNK * 3 + DONE if strip else stream)
        assert s.usage is not None
        assert (s.usage.prompt_tokens, s.usage.completion_tokens) == (7, 3)


def test_sse_scanner_counts_content_events_without_usage() -> None:
    s = SseScanner(strip_usage=False)
    assert s.feed(CHUNK * 5 + DONE) == CHUNK * 5 + DONE
    assert s.usage is None
    assert s.content_events == 5


def test_sse_scanner_passes_oversize_event_through() -> None:
    s = SseScanner(strip_usage=True)
    big = b"data: " + b"x" * (2 << 20)
    assert s.feed(big) == big
    assert s.feed(b"\n\n") == b"\n\n"


# -- metrics text -------------------------------------------------------------------------------
def test_engine_load_current_and_legacy_names() -> None:
    text = (b'# HELP vllm:num_requests_running x\n'
            b'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
            b'vllm:num_requests_running{engine="1",model_name="m"} 2.0\n'
            b'vllm:num_requests_waiting{model_name="m a"} 4\n'
            b'vllm:kv_cache_usage_perc{model_name="m"} 0.25\n')
    load = parse_engine_load(text)
    assert (load.running, load.waiting, load.kv_usage, load.queue) == (5.0, 4.0, 0.25, 9.0)
    legacy = parse_engine_load(b"vllm:gpu_cache_usage_perc 0.5\nvllm:num_requests_waiting 1\n")
    assert (legacy.kv_usage, legacy.running, legacy.queue) == (0.5, None, 1.0)
    assert parse_engine_load(b"other_metric 1\n").queue is None  # missing means unknown, not zero


# -- routing and balancing -----------------------------------------------------------------------
class _Loop:
    """Enough of a loop for UpstreamPool's constructor; pools are never used here."""


def backend(i: int) -> Backend:
    pool = UpstreamPool("h", i, loop=_Loop(), max_idle=1, connect_timeout=1, read_timeout=1)  # type: ignore[arg-type]
    return Backend(f"http://h:{i}", "h", i, None, pool)


def test_least_queue_uses_scrapes_and_own_in_flight() -> None:
    a, b, c = backend(1), backend(2), backend(3)
    now = 100.0
    for x, q in ((a, 5.0), (b, 1.0), (c, 3.0)):
        x.queue, x.scraped_at = q, now
    assert choose((a, b, c), now, stale_after=3) is b
    b.since_scrape = 3  # sent 3 since the scrape: b now scores 4 > c's 3
    assert choose((a, b, c), now, stale_after=3) is c
    assert choose((a, b, c), now, stale_after=3, exclude=[c]) is b
    # stale scrape: load unknown, scored by own in-flight + penalty, not as zero
    assert choose((a, b, c), now + 10, stale_after=3) in (a, b, c)
    a.inflight = 1
    assert choose((a, b), now + 10, stale_after=3) is b


def test_a_backend_whose_scrapes_fail_comes_after_every_answering_one() -> None:
    busy, down, unknown = backend(1), backend(2), backend(3)
    now = 100.0
    busy.queue, busy.scraped_at, busy.since_scrape = 40.0, now, 5
    down.scrape_failures = 2  # /metrics refused: probably dead
    assert choose((busy, down), now, stale_after=3) is busy
    assert choose((down, unknown), now, stale_after=3) is unknown  # never scraped yet: just unknown
    assert choose((down,), now, stale_after=3) is down  # still used when nothing else is left
    down.record_load(parse_engine_load(b"vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"), now)
    assert down.scrape_failures == 0
    assert choose((busy, down), now, stale_after=3) is down


def test_ties_are_broken_randomly() -> None:
    bs = tuple(backend(i) for i in range(4))
    seen = {choose(bs, 0.0, stale_after=1, rand=lambda r=r: r).port for r in (0.0, 0.3, 0.6, 0.99)}  # type: ignore[union-attr,misc]
    assert len(seen) > 1


def test_ejected_and_saturated_backends() -> None:
    a, b = backend(1), backend(2)
    assert a.record_failure(10.0, 2, 5.0) is False
    assert a.record_failure(10.0, 2, 5.0) is True
    assert choose((a, b), 11.0, stale_after=1) is b
    b.ejected_until = 20.0
    assert choose((a, b), 11.0, stale_after=1) in (a, b)  # all ejected: ejection ignored
    a.ejected_until = b.ejected_until = 0.0
    a.inflight = b.inflight = 2
    assert choose((a, b), 11.0, stale_after=1, max_inflight=2) is None  # saturated: caller queues


def test_table_resolves_aliases_and_states() -> None:
    snap = EndpointTable(
        version=3, generated_at=0.0,
        models=(ModelEntry(name="m", aliases=("alias",), state=ModelState.READY),
                ModelEntry(name="cold", state=ModelState.STARTING)),
        endpoints=(EndpointEntry(endpoint_id=1, model="m", url="http://n:1", node="n", port=1,
                                 endpoint_job_id=1, ready=True),
                   EndpointEntry(endpoint_id=2, model="m", url="http://n:2", node="n", port=2,
                                 endpoint_job_id=2, ready=False)),
    )
    made: dict[object, Backend] = {}
    table = table_from_snapshot(snap, lambda key, host, port: made.setdefault(key, backend(port)))
    route = table.lookup("alias")
    assert route is not None and route is table.lookup("m")
    assert [b.port for b in route.backends] == [1]
    cold = table.lookup("cold")
    assert cold is not None and cold.state == ModelState.STARTING and cold.backends == ()
    assert table.lookup("nope") is None


def test_routing_with_10000_endpoints_is_lookup_plus_candidates() -> None:
    """10,000 endpoints over 1,000 models: a lookup touches only the model's own 10 candidates."""
    eps = tuple(
        EndpointEntry(endpoint_id=i, model=f"m{i % 1000}", url=f"http://n{i}:1", node=f"n{i}", port=1,
                      endpoint_job_id=i, ready=True)
        for i in range(10_000)
    )
    snap = EndpointTable(version=1, generated_at=0.0, endpoints=eps)
    table = table_from_snapshot(snap, lambda key, host, port: backend(int(host[1:])))
    route = table.lookup("m7")
    assert route is not None and len(route.backends) == 10
    assert {b.port for b in route.backends} == {7 + 1000 * k for k in range(10)}
    assert choose(route.backends, 0.0, stale_after=1) in route.backends


# -- auth and admission --------------------------------------------------------------------------
def test_key_index_and_authentication() -> None:
    secret = b"s3cret"
    kt = KeyTable(
        version=5, generated_at=0.0,
        tenants=(TenantEntry(tenant_id=1, name="t1", allowed_models=("m",)),
                 TenantEntry(tenant_id=2, name="off", enabled=False)),
        keys=(ApiKeyEntry(key_hash=hash_api_key(secret, "k1").hex(), prefix="k1", tenant_id=1),
              ApiKeyEntry(key_hash=hash_api_key(secret, "k2").hex(), prefix="k2", tenant_id=2),
              ApiKeyEntry(key_hash=hash_api_key(secret, "k3").hex(), prefix="k3", tenant_id=1,
                          expires_at=time.time() - 1)),
    )
    auth = Authenticator(secret, enabled=True)
    assert auth.offer(index_from_key_table(kt), from_db=False)
    p = auth.authenticate(b"Bearer k1")
    assert p.tenant_id == 1 and p.may_use("m") and not p.may_use("other")
    for header, code in ((None, "missing_api_key"), (b"Basic k1", "invalid_api_key"),
                         (b"Bearer k2", "invalid_api_key"), (b"Bearer nope", "invalid_api_key"),
                         (b"Bearer k3", "expired_api_key")):
        with pytest.raises(ApiError) as err:
            auth.authenticate(header)
        assert (err.value.status, err.value.code) == (401, code)
    older = msgspec.structs.replace(kt, version=4, keys=())
    assert not auth.offer(index_from_key_table(older), from_db=False)
    same_version_from_db = index_from_key_table(msgspec.structs.replace(kt, keys=()))
    assert auth.offer(same_version_from_db, from_db=True)
    with pytest.raises(ApiError):
        auth.authenticate(b"Bearer k1")


def test_static_endpoint_specs() -> None:
    eps = parse_static_endpoints(["m=http://a:1#tok,http://b:2", "n=http://c"])
    assert [(e.model, e.url, e.bearer_token) for e in eps] == [
        ("m", "http://a:1", "tok"), ("m", "http://b:2", None), ("n", "http://c:80", None)]
    for bad in ("m", "=http://a:1", "m=ftp://a", "m=http://a:x"):
        with pytest.raises(SettingsError):
            parse_static_endpoints([bad])


# -- client connection timeouts (protocol driven by a fake transport) ----------------------------
class _FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False
        self.aborted = False
        self.buffered = 0  # bytes the "kernel" has not taken (get_write_buffer_size)

    def get_extra_info(self, name: str) -> None:
        return None

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


async def test_idle_keep_alive_and_non_reading_client_are_cut_by_the_sweep() -> None:
    import asyncio

    from gateway.http_server import HttpConnection, HttpServer
    from gateway.settings import GatewaySettings

    async def never(_req: object, _conn: object) -> None:
        raise AssertionError("no request expected")

    settings = GatewaySettings(static_endpoints=("m=http://h:1",), no_auth=True, keep_alive_timeout_s=5,
                               client_send_timeout_s=60)
    loop = asyncio.get_running_loop()
    server = HttpServer(never, settings, loop)
    idle, stuck, slow = HttpConnection(server), HttpConnection(server), HttpConnection(server)
    t_idle, t_stuck, t_slow = _FakeTransport(), _FakeTransport(), _FakeTransport()
    idle.connection_made(t_idle)  # type: ignore[arg-type]
    stuck.connection_made(t_stuck)  # type: ignore[arg-type]
    slow.connection_made(t_slow)  # type: ignore[arg-type]
    for conn, t in ((stuck, t_stuck), (slow, t_slow)):
        conn.idle_since = 0.0  # as if a response were in progress
        t.buffered = 100_000
        conn.pause_writing()  # its client stopped reading (stuck) or reads a little now and then (slow)
    now = loop.time()
    for conn in (idle, stuck):
        conn.sweep(now + 1, 5, 60)
    assert (t_idle.closed, t_stuck.aborted) == (False, False)
    for conn in (idle, stuck):
        conn.sweep(now + 6, 5, 60)
    assert (t_idle.closed, t_stuck.aborted) == (True, False)
    for second in range(1, 100):  # the slow client takes 1000 bytes every 50 s
        if second % 50 == 0:
            t_slow.buffered -= 1000
        slow.sweep(now + second, 5, 60)
    stuck.sweep(now + 61, 5, 60)
    assert (t_idle.closed, t_stuck.aborted, t_slow.aborted) == (True, True, False)
    slow.sweep(now + 99 + 60, 5, 60)  # then nothing for 60 s: cut
    assert t_slow.aborted


async def test_requests_are_handled_without_a_task_and_a_stream_head_leaves_with_its_first_chunk() -> None:
    import asyncio

    from gateway.http_parse import Request
    from gateway.http_server import HttpConnection, HttpServer
    from gateway.relay import Exchange, Phase
    from gateway.settings import GatewaySettings
    from gateway.sse import SseScanner

    seen: list[bytes] = []
    exchanges: list[Exchange] = []
    loop = asyncio.get_running_loop()

    def handler(req: Request, conn: HttpConnection) -> None:
        seen.append(req.path)
        if req.path == b"/plain":
            conn.send_full(200, b"{}")
            conn.request_done()
        else:  # a stream answered later from (upstream) callbacks
            exchanges.append(Exchange(loop, conn, SseScanner(strip_usage=True), 1 << 20, True))

    settings = GatewaySettings(static_endpoints=("m=http://h:1",), no_auth=True)
    tasks_before = len(asyncio.all_tasks())
    conn = HttpConnection(HttpServer(handler, settings, loop))
    t = _FakeTransport()
    conn.connection_made(t)  # type: ignore[arg-type]
    conn.data_received(b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\nGET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    assert seen == [b"/plain", b"/stream"]  # both answered in data_received: the second after request_done
    assert len(asyncio.all_tasks()) == tasks_before
    assert len(t.written) == 1 and t.written[0].startswith(b"HTTP/1.1 200 OK\r\n")
    ex = exchanges[0]
    ex.on_head(200, {b"content-type": b"text/event-stream"})
    assert ex.phase is Phase.HELD and conn.busy and len(t.written) == 1  # the stream's head is held ...
    assert not conn.response_started
    ex.on_data(b"data: 1\n\n")  # ... and leaves with the first chunk, in one write
    assert ex.phase is Phase.STREAMING and conn.response_started
    assert len(t.written) == 2
    assert t.written[1].startswith(b"HTTP/1.1 200 OK\r\n")
    assert t.written[1].endswith(b"\r\n\r\n9\r\ndata: 1\n\n\r\n")
    ex.on_end(b"")
    assert ex.phase is Phase.DONE
    conn.request_done()
    assert t.written[2] == b"0\r\n\r\n"
    assert not conn.busy


@pytest.mark.parametrize("when", ["held", "streaming", "buffering"])
async def test_an_upstream_failure_before_the_first_byte_leaves_nothing_written_and_is_retryable(
        when: str) -> None:
    """HELD and BUFFERING failures reach the client as nothing (the handler retries or answers
    with an error status); after the first byte, the stream ends with an SSE error event."""
    import asyncio

    from gateway.http_server import HttpConnection, HttpServer
    from gateway.relay import Exchange, Phase
    from gateway.settings import GatewaySettings
    from gateway.sse import SseScanner
    from gateway.upstream_client import UpstreamError

    loop = asyncio.get_running_loop()
    conn = HttpConnection(HttpServer(lambda _r, _c: None, GatewaySettings(no_auth=True), loop))
    t = _FakeTransport()
    conn.connection_made(t)  # type: ignore[arg-type]
    stream = when != "buffering"
    conn.response_headers = b"x-request-id: r1\r\n"  # what the handler sets for the request
    ex = Exchange(loop, conn, SseScanner(strip_usage=True) if stream else None, 1 << 20, stream)
    ex.on_head(200, {b"content-type": b"text/event-stream" if stream else b"application/json"})
    assert ex.phase is (Phase.HELD if stream else Phase.BUFFERING)
    ex.on_data(b"data: {\"choi")  # a partial event (held by the scanner) or part of a JSON body
    if when == "streaming":
        ex.on_data(b"ces\":[]}\n\n")
    ex.on_error(UpstreamError("closed", "upstream closed the connection", False))
    assert ex.phase is Phase.FAILED
    if when == "streaming":
        assert not ex.retryable and ex.client_saw
        out = b"".join(t.written)
        assert out.startswith(b"HTTP/1.1 200 OK\r\n") and b"x-request-id: r1\r\n" in out
        assert b'data: {"error"' in out and out.endswith(b"\r\n0\r\n\r\n")
    else:
        assert ex.retryable and not ex.client_saw and not conn.response_started
        assert t.written == []
    # A final phase stays final: late callbacks change nothing.
    ex.on_end(b"")
    ex.client_lost()
    assert ex.phase is Phase.FAILED
