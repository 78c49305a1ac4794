"""The request handler of one gateway worker: dispatch, auth, route, admit, relay, account.

:class:`Gateway` holds the worker's in-memory state (routing table, key index, backends,
limiters, usage buffer, metrics) and answers each request from it, with no database or Redis
call. Per request: one dict lookup for the path, one HMAC and dict lookup for the key, one
decode of the routing fields, one dict lookup for the model, an O(candidates) choice, then the
relay (:mod:`gateway.relay`). Tables are swapped in by :meth:`install_table` from outside the
hot path.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.access_log import AccessLog
from gateway.admission import ModelQueues, TenantLimiter
from gateway.auth import Authenticator, Principal, index_from_key_table
from gateway.backend import Backend, BackendKey, make_backend
from gateway.balancer import choose
from gateway.errors import ApiError
from gateway.http_parse import Request
from gateway.http_server import HttpConnection
from gateway.metrics import GatewayMetrics, StateView
from gateway.relay import Exchange
from gateway.request_view import parse_view
from gateway.routing_table import (
    EMPTY,
    RETRY_AFTER_STARTING,
    RETRY_AFTER_STOPPED,
    ModelRoute,
    RoutingTable,
    table_from_snapshot,
)
from gateway.schemas import EndpointTable, KeyTable, ModelState
from gateway.scraper import Scraper
from gateway.settings import GatewaySettings
from gateway.sse import SseScanner, inject_include_usage, usage_of
from gateway.upstream_client import UpstreamError, build_request
from gateway.usage import UsageRecorder
from hpcgate.logs import get_logger

log = get_logger("hpcgate.gateway")

_POST_PATHS = {
    b"/v1/chat/completions": "chat",
    b"/v1/completions": "completions",
    b"/v1/embeddings": "embeddings",
}
_GET_PATHS = frozenset({b"/health", b"/ready", b"/metrics", b"/v1/models"})
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
_RETRY_BUDGET_CAP = 100.0


class ModelInfo(msgspec.Struct):
    id: str
    state: str
    aliases: tuple[str, ...]
    object: str = "model"
    created: int = 0
    owned_by: str = "hpcgate"


class ModelList(msgspec.Struct):
    data: list[ModelInfo]
    object: str = "list"


_encode = msgspec.json.Encoder().encode


class Gateway:
    def __init__(self, settings: GatewaySettings, loop: asyncio.AbstractEventLoop, worker: int = 0) -> None:
        s = settings
        self.settings = s
        self.loop = loop
        self.table: RoutingTable = EMPTY
        self.has_table = False
        secret = s.key_hash_secret.encode() if s.key_hash_secret else None
        self.auth = Authenticator(secret, enabled=not s.no_auth)
        self.tenants = TenantLimiter(s.workers)
        self.queues = ModelQueues(loop)
        self.usage = UsageRecorder(None if s.no_auth else s.database_url, s.usage_flush_s)
        self.metrics = GatewayMetrics(str(worker))
        self.backends: dict[BackendKey, Backend] = {}
        self.scraper = Scraper(loop, s.scrape_interval_s, max(1.0, s.scrape_interval_s))
        self._stale_after = max(3.0 * s.scrape_interval_s, 2.0)
        self._retry_tokens = 10.0
        self._rid_prefix = secrets.token_hex(4).encode() + b"-"
        self._rid_n = 0
        self.access_log = AccessLog() if s.access_log else None
        self.metrics.add_state(self._state_view)

    # -- tables (control path) --------------------------------------------------------------------
    def backend_for(self, key: BackendKey, host: str, port: int) -> Backend:
        b = self.backends.get(key)
        if b is None:
            s = self.settings
            b = make_backend(key[0], host, port, key[1], loop=self.loop, max_idle=s.upstream_max_idle,
                             connect_timeout=s.upstream_connect_timeout_s,
                             read_timeout=s.upstream_read_timeout_s)
            self.backends[key] = b
        b.models = frozenset()  # recomputed by the table being built
        return b

    def install_endpoints(self, snap: EndpointTable) -> int:
        """A published snapshot: install it if newer; returns the version held."""
        if not self.has_table or snap.version > self.table.version:
            self.install_table(table_from_snapshot(snap, self.backend_for))
        return self.table.version

    def install_keys(self, table: KeyTable, from_db: bool = False) -> int:
        if self.auth.offer(index_from_key_table(table), from_db):
            log.info("key_table_installed", version=table.version, keys=len(table.keys), from_db=from_db)
        return self.auth.index.version

    def install_table(self, table: RoutingTable) -> list[Backend]:
        """Swap in ``table``; returns the backends it no longer uses (their pools are closed)."""
        self.metrics.prepare_models([r.name for r in table.models])
        live = table.backends
        gone = [b for b in self.backends.values() if b not in live]
        self.backends = {k: b for k, b in self.backends.items() if b in live}
        self.table = table
        self.has_table = True
        for b in gone:
            b.pool.close()
        self.scraper.track(live)
        log.info("table_installed", version=table.version, models=len(table.models), endpoints=len(live))
        return gone

    def check_stalls(self) -> None:
        """Once a second (server tick): fail upstream requests that stopped reading."""
        now = self.loop.time()
        for b in self.backends.values():
            b.pool.check_stalls(now)

    def _state_view(self) -> StateView:
        queues = {r.name: self.queues.length(r.name) for r in self.table.models}
        return StateView(list(self.backends.values()), self.table.version, self.table.generated_at,
                         self.auth.index.version, queues)

    # -- requests (hot path) ----------------------------------------------------------------------
    async def handle(self, req: Request, conn: HttpConnection) -> None:
        path = req.path
        q = path.find(b"?")
        if q >= 0:
            path = path[:q]
        kind = _POST_PATHS.get(path)
        if kind is not None:
            if req.method != b"POST":
                raise ApiError(405, f"{path.decode()} only accepts POST", "method_not_allowed")
            await self._proxy(req, conn, kind, path)
            return
        if path not in _GET_PATHS:
            raise ApiError(404, f"no route for {req.method.decode()} {path.decode(errors='replace')}",
                           "unknown_url")
        if req.method != b"GET":
            raise ApiError(405, f"{path.decode()} only accepts GET", "method_not_allowed")
        if path == b"/health":
            conn.send_full(200, b'{"status":"ok"}')
        elif path == b"/ready":
            if self.has_table:
                conn.send_full(200, b'{"status":"ready","table_version":%d}' % self.table.version)
            else:
                raise ApiError(503, "no endpoint table yet", "not_ready", retry_after=1)
        elif path == b"/metrics":
            conn.send_full(200, self.metrics.render(), CONTENT_TYPE_LATEST.encode())
        else:
            principal = self.auth.authenticate(req.headers.get(b"authorization"))
            conn.send_full(200, self._models_body(principal))

    def _models_body(self, p: Principal) -> bytes:
        data = [ModelInfo(r.name, str(r.state), r.aliases) for r in self.table.models
                if p.may_use(r.name, *r.aliases)]
        return _encode(ModelList(data))

    def _request_id(self, req: Request) -> bytes:
        given = req.headers.get(b"x-request-id")
        if given is not None and _REQUEST_ID.match(given):
            return given
        self._rid_n += 1
        return self._rid_prefix + b"%d" % self._rid_n

    async def _proxy(self, req: Request, conn: HttpConnection, kind: str, path: bytes) -> None:
        start = time.perf_counter()
        rid = self._request_id(req)
        tenant = "-"
        tenant_id = 0
        model = "-"
        backend: Backend | None = None
        exchange: Exchange | None = None
        scanner: SseScanner | None = None
        tstate = None
        status = 499  # if the client goes away first
        prompt = completion = 0
        error: str | None = None
        try:
            principal = self.auth.authenticate(req.headers.get(b"authorization"))
            tenant, tenant_id = principal.name, principal.tenant_id
            ctype = req.headers.get(b"content-type")
            if ctype is None or ctype.partition(b";")[0].strip().lower() != b"application/json":
                raise ApiError(415, "Content-Type must be application/json", "unsupported_media_type")
            view = parse_view(kind, req.body)
            route = self.table.lookup(view.model)
            if route is None:
                raise ApiError(404, f"The model '{view.model}' does not exist", "model_not_found", "model")
            model = route.name
            if not principal.may_use(route.name, view.model):
                raise ApiError(403, f"this API key may not use model '{view.model}'", "model_not_allowed",
                               "model")
            if not route.backends:
                raise _no_instance(route)
            tstate = self.tenants.enter(principal, self.loop.time())
            body = req.body if view.model == route.name else _with_model(req.body, route.name)
            stream = bool(view.stream)
            if stream:
                strip = view.stream_options is None
                if strip:
                    body = inject_include_usage(body)
                scanner = SseScanner(strip_usage=strip)
            extra = b"x-request-id: %b\r\n" % rid
            exchange, backend = await self._forward(route, path, body, conn, scanner=scanner,
                                                    stream_headers=extra if stream else None)
            status = exchange.status
            if stream and status == 200:
                if not exchange.committed:
                    exchange.commit_stream(extra)
                await exchange.wait_done()
                assert scanner is not None
                if scanner.usage is not None:
                    prompt, completion = scanner.usage.prompt_tokens, scanner.usage.completion_tokens
                else:
                    completion = scanner.content_events
                if exchange.error is not None:
                    error = str(exchange.error)
                    self._upstream_failed(backend, exchange.error.kind)
            else:
                await exchange.wait_done()
                if exchange.error is not None:
                    self._upstream_failed(backend, exchange.error.kind)
                    raise _upstream_error(exchange.error)
                out = exchange.body
                if status == 200:
                    u = usage_of(out)
                    if u is not None:
                        prompt, completion = u.prompt_tokens, u.completion_tokens
                exchange.first_byte_at = time.perf_counter()
                conn.send_full(status, out, exchange.headers.get(b"content-type", b"application/json"), extra)
        except ApiError as exc:
            status = exc.status
            error = exc.message
            conn.send_error(exc)
        finally:
            if exchange is not None:
                exchange.abort()
            if backend is not None:
                self._release(backend)
            if tstate is not None:
                TenantLimiter.leave(tstate, prompt + completion)
            end = time.perf_counter()
            ttft = exchange.first_byte_at - start if exchange is not None and exchange.first_byte_at else None
            ok = status < 400 and error is None
            self.metrics.observe(model, status, ttft, end - start, prompt=prompt, completion=completion)
            if tenant_id:
                self.usage.add(tenant_id, model, time.time(), ok=ok, prompt=prompt, completion=completion)
            if self.access_log is not None:
                self.access_log.write({
                    "request_id": rid.decode(), "tenant": tenant, "model": model,
                    "backend": backend.label if backend is not None else None, "status": status,
                    "ttft_ms": round(ttft * 1000, 3) if ttft is not None else None,
                    "duration_ms": round((end - start) * 1000, 3), "prompt_tokens": prompt,
                    "completion_tokens": completion, "error": error,
                })

    async def _forward(self, route: ModelRoute, path: bytes, body: bytes, conn: HttpConnection, *,
                       scanner: SseScanner | None, stream_headers: bytes | None) -> tuple[Exchange, Backend]:
        """Send to the best backend; retry connect errors and 5xx before the first byte elsewhere.

        On return the backend's in-flight count includes this request (the caller releases it).
        """
        s = self.settings
        loop = self.loop
        tried: list[Backend] = []
        stale_retried = False
        last: UpstreamError | str = "no endpoint available"
        self._retry_tokens = min(_RETRY_BUDGET_CAP, self._retry_tokens + s.retry_budget_ratio)
        while True:
            backend = choose(route.backends, loop.time(), stale_after=self._stale_after,
                             max_inflight=s.endpoint_max_inflight, exclude=tried)
            if backend is None:
                if tried:
                    raise _upstream_error(last)
                await self.queues.wait(route.name, s.queue_max, s.queue_timeout_s)
                continue
            backend.inflight += 1
            backend.since_scrape += 1
            exchange = Exchange(loop, conn, scanner, s.max_response_bytes, stream_headers)
            reused = False
            try:
                up = backend.pool.take_idle() or await backend.pool.acquire()
                reused = up.reused
                exchange.upstream = up
                conn.listener = exchange
                up.send(build_request(b"POST", path, backend.host_header, backend.auth_line, body), exchange)
                await exchange.wait_head()  # for a committed stream: its end
                err = exchange.error
                if exchange.committed or (err is None and exchange.status < 500):
                    backend.record_success()
                    return exchange, backend
            except UpstreamError as exc:
                err = exc
            except BaseException:
                exchange.abort()
                self._release(backend)
                raise
            exchange.abort()
            conn.listener = None
            self._release(backend)
            if err is not None and err.kind == "closed" and err.before_head and reused and not stale_retried:
                stale_retried = True  # a keep-alive connection the engine had closed: not its fault
                continue
            last = err if err is not None else f"{backend.label} answered {exchange.status}"
            self._upstream_failed(backend, err.kind if err is not None else f"http_{exchange.status}")
            tried.append(backend)
            if len(tried) > s.max_retries or self._retry_tokens < 1.0:
                raise _upstream_error(last)
            self._retry_tokens -= 1.0
            self.metrics.retry(route.name)

    def _release(self, backend: Backend) -> None:
        backend.inflight -= 1
        self.queues.wake(backend.models)  # a slot is free: the oldest waiter (if any) tries again

    def _upstream_failed(self, backend: Backend, kind: str) -> None:
        self.metrics.upstream_error(backend.label, kind)
        s = self.settings
        if backend.record_failure(self.loop.time(), s.eject_after_failures, s.eject_base_s):
            self.metrics.ejected(backend.label)
            log.warning("endpoint_ejected", backend=backend.label, until_s=round(backend.ejected_until, 1),
                        reason=kind)


_decode_object = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode


def _with_model(body: bytes, name: str) -> bytes:
    """The body with ``model`` set to the canonical name (requests by alias only).

    The engine serves the canonical name; only the top level is decoded, other values stay raw.
    """
    doc = _decode_object(body)
    doc["model"] = msgspec.Raw(_encode(name))
    return _encode(doc)


def _no_instance(route: ModelRoute) -> ApiError:
    if route.state == ModelState.STARTING:
        return ApiError(503, f"model '{route.name}' is starting: no ready instance yet", "model_starting",
                        retry_after=RETRY_AFTER_STARTING)
    reason = f" ({route.reason})" if route.reason else ""
    return ApiError(503, f"model '{route.name}' has no ready instance ({route.state}){reason}",
                    "model_unavailable", retry_after=RETRY_AFTER_STOPPED)


def _upstream_error(err: UpstreamError | str) -> ApiError:
    if isinstance(err, UpstreamError) and err.kind == "timeout":
        return ApiError(504, f"upstream timed out: {err}", "upstream_timeout")
    return ApiError(502, f"upstream failed: {err}", "upstream_error")
