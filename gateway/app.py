"""The request handler of one gateway worker: dispatch, auth, route, admit, relay, account.

:class:`Gateway` holds the worker's in-memory state (routing table, key index, backends,
limiters, usage buffer, metrics) and answers each request from it, with no database or Redis
call. Per request: one dict lookup for the path, one HMAC and dict lookup for the key, one
decode of the routing fields, one dict lookup for the model, an O(candidates) choice, then the
relay (:mod:`gateway.proxy`, :mod:`gateway.relay`), without a task on the common path.
Tables are swapped in by :meth:`install_table` from outside the
hot path.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import re
import secrets
from collections.abc import Coroutine
from typing import Any
from urllib.parse import unquote

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.access_log import AccessLog
from gateway.admission import ModelQueues
from gateway.api_relay import ApiRelay
from gateway.auth import Authenticator, Principal, index_from_key_table
from gateway.backend import Backend, BackendKey, make_backend
from gateway.client_guard import FailedAuthLimiter
from gateway.cors import Cors
from gateway.errors import ApiError
from gateway.http_parse import Request
from gateway.http_server import HttpConnection
from gateway.metrics import GatewayMetrics, StateView
from gateway.offload import make_offloader
from gateway.openapi import build_document
from gateway.prefix_router import PrefixRouter
from gateway.proxy import ProxyCall
from gateway.routing_table import EMPTY, ModelRoute, RoutingTable, table_from_snapshot
from gateway.scraper import Scraper
from gateway.settings import GatewaySettings, routing_policies
from gateway.tenant_admission import TenantAdmission
from gateway.tenant_limits import TenantLimiter
from gateway.upload import UPLOAD_PATHS, UploadCall
from gateway.usage import UsageRecorder
from hpcgate.logs import get_logger
from hpcgate.schemas import EndpointTable, KeyTable, TribunalEntry

log = get_logger("hpcgate.gateway")

# Every JSON inference path vLLM serves, routed by the body's "model" like chat (the engine
# serves the same path; the body goes unchanged but for an alias replaced by the model's name).
_POST_PATHS = {
    b"/v1/chat/completions": "chat",
    b"/v1/completions": "completions",
    b"/v1/embeddings": "embeddings",
    b"/v1/responses": "responses",
    b"/v1/rerank": "rerank",
    b"/rerank": "rerank",
    b"/v2/rerank": "rerank",
    b"/v1/score": "score",
    b"/score": "score",
    b"/tokenize": "tokenize",
    b"/detokenize": "detokenize",
    b"/pooling": "pooling",
    b"/classify": "classify",
}
_API_ROOTS = frozenset({b"/v1/files", b"/v1/batches"})  # relayed to the control API (gateway.api_relay)
_API_SUBPATHS = (b"/v1/files/", b"/v1/batches/")
_GET_PATHS = frozenset({b"/health", b"/ready", b"/metrics", b"/v1/models", b"/openapi.json"})
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")


class ModelInfo(msgspec.Struct):
    id: str
    state: str
    aliases: tuple[str, ...]
    object: str = "model"
    created: int = 0
    owned_by: str = "hpcgate"
    max_model_len: int | msgspec.UnsetType = msgspec.UNSET  # the context length, where known


def _model_info(r: ModelRoute) -> ModelInfo:
    length = msgspec.UNSET if r.max_model_len is None else r.max_model_len
    return ModelInfo(r.name, str(r.state), r.aliases, max_model_len=length)


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
        self.auth_failures = FailedAuthLimiter(s.auth_failures_per_minute)
        self.tenants = TenantLimiter(s.workers)  # holders: this gateway's workers until Redis says
        self.limits = TenantAdmission(self.tenants)
        self.queues = ModelQueues(loop)
        self.usage = UsageRecorder(None if s.no_auth else s.database_url, s.usage_flush_s)
        self.metrics = GatewayMetrics(str(worker))
        # The C relay writes plain bytes to the client's socket: with TLS the event loop relays.
        self.offloader = make_offloader(loop, s.stream_offload and not s.tls, s.upstream_read_timeout_s,
                                        s.client_send_timeout_s)
        self.stream_relay = "c" if self.offloader is not None else "event-loop"
        self.backends: dict[BackendKey, Backend] = {}
        self.scraper = Scraper(loop, s.scrape_interval_s, max(1.0, s.scrape_interval_s))
        self.stale_after = max(3.0 * s.scrape_interval_s, 2.0)
        self.retry_tokens = 10.0  # retry budget, shared by this worker's requests
        # cache-aware routing (gateway.prefix_router) for the models whose policy says so
        self._policies = routing_policies(s)
        self.cache_aware: frozenset[str] = frozenset()
        self.prefix_router: PrefixRouter | None = None
        if s.routing_policy == "cache-aware" or "cache-aware" in self._policies.values():
            self.prefix_router = PrefixRouter(block_bytes=s.prefix_block_bytes,
                                              kv_saturated=s.prefix_kv_saturated,
                                              max_imbalance=s.prefix_max_imbalance,
                                              prefill_tokens_per_s=s.prefix_prefill_tokens_per_s)
        self.session_header = s.session_header.lower().encode()
        self._rid_prefix = secrets.token_hex(4).encode() + b"-"
        self._rid_n = 0
        self.access_log = AccessLog() if s.access_log else None
        self.cors = Cors(s.cors_allowed_origins) if s.cors_allowed_origins else None
        self._metrics_auth = b"Bearer " + s.metrics_token.encode() if s.metrics_token else None
        self._openapi: bytes | None = None  # GET /openapi.json, built on first request
        self.metrics.add_state(self._state_view)
        self.api_relay = ApiRelay(s) if s.batch_api_url else None
        self._internal_token = s.internal_token.encode() if s.internal_token else None
        # Batch requests leave a share of each endpoint's slots to interactive ones (with a cap).
        cap = s.endpoint_max_inflight
        self.batch_max_inflight = max(1, math.floor(cap * (1.0 - s.batch_headroom))) if cap else 0

    def batch_principal(self, token: bytes, tenant: bytes | None) -> Principal:
        """A batch runner's request: it proves itself with the internal token and names the
        tenant whose line it runs (the request is then booked and limited as that tenant's)."""
        expected = self._internal_token
        if expected is None or not hmac.compare_digest(token, expected):
            raise ApiError(401, "invalid internal token", "invalid_api_key")
        principal = self.auth.index.by_tenant(int(tenant)) if tenant and tenant.isdigit() else None
        if principal is None:
            raise ApiError(401, "unknown or disabled tenant", "invalid_api_key")
        return principal

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
        default = self.settings.routing_policy
        self.cache_aware = frozenset(r.name for r in table.models
                                     if self._policies.get(r.name, default) == "cache-aware")
        if self.prefix_router is not None:
            self.prefix_router.keep(live)
        for b in gone:
            b.pool.close()
        self.scraper.track(live)
        for route in table.models:
            if route.backends and self.queues.length(route.name):
                self.queues.wake_all(route.name)  # held for a model at zero: its instances are here
        log.info("table_installed", version=table.version, models=len(table.models), endpoints=len(live))
        return gone

    def authenticate(self, req: Request, conn: HttpConnection) -> Principal:
        """The request's principal; 429 for an address with too many failed keys of late
        (:mod:`gateway.client_guard`), whose failures are counted here."""
        limiter = self.auth_failures
        if limiter.active:  # somebody failed recently: only then is the address looked at
            address = conn.client_address(req.headers.get(b"x-forwarded-for"))
            wait = limiter.retry_after(address, self.loop.time())
            if wait is not None:
                self.metrics.auth_refused.inc()
                raise ApiError(429, f"too many failed API keys from {address}; retry in {wait} s",
                               "auth_rate_limited", retry_after=wait)
        try:
            return self.auth.authenticate(req.headers.get(b"authorization"))
        except ApiError as exc:
            if exc.code != "missing_api_key":  # a wrong key is a guess; no key at all is not
                limiter.failed(conn.client_address(req.headers.get(b"x-forwarded-for")), self.loop.time())
            raise

    def tick(self) -> None:
        """Once a second (server tick): stalled upstreams, expired failure windows."""
        self.check_stalls()
        self.auth_failures.prune(self.loop.time())

    def check_stalls(self) -> None:
        """Once a second (server tick): fail upstream requests that stopped reading."""
        now = self.loop.time()
        for b in self.backends.values():
            b.pool.check_stalls(now)

    def _state_view(self) -> StateView:
        queues = {r.name: self.queues.length(r.name) for r in self.table.models}
        return StateView(list(self.backends.values()), self.table.version, self.table.generated_at,
                         self.auth.index.version, queues, stream_relay=self.stream_relay,
                         prefix_router=self.prefix_router)

    # -- requests (hot path) ----------------------------------------------------------------------
    def handle(self, req: Request, conn: HttpConnection) -> Coroutine[Any, Any, None] | None:
        """Called from the client protocol; see :data:`gateway.http_server.Handler`."""
        rid = self._request_id(req)
        headers = b"x-request-id: %b\r\n" % rid  # on every response to this request, errors too
        cors = self.cors
        if cors is not None:
            origin = req.headers.get(b"origin")
            if origin is not None and cors.allows(origin):
                headers += cors.response_headers(origin)
                if req.method == b"OPTIONS" and b"access-control-request-method" in req.headers:
                    conn.response_headers = headers
                    conn.send_full(204, b"", extra=cors.preflight_headers(
                        req.headers.get(b"access-control-request-headers")))
                    conn.request_done()
                    return None
        conn.response_headers = headers
        path = req.path
        q = path.find(b"?")
        if q >= 0:
            path = path[:q]
        kind = _POST_PATHS.get(path)  # inference first: the hot path pays one dict lookup
        if kind is not None:
            if req.method != b"POST":
                raise ApiError(405, f"{path.decode()} only accepts POST", "method_not_allowed")
            return ProxyCall(self, conn, path, rid).run(req, kind)
        if path in _API_ROOTS or path.startswith(_API_SUBPATHS):  # a file upload too
            if self.api_relay is None:
                raise ApiError(404, "the Files and Batch APIs are not enabled on this gateway", "unknown_url")
            principal = self.authenticate(req, conn)
            return self.api_relay.relay(req, conn, principal)
        if req.upload is not None:  # a multipart upload (audio): relayed as its body arrives
            return UploadCall(self, conn, path, rid).begin(req)
        if path.startswith(b"/v1/models/") and req.method == b"GET":
            principal = self.authenticate(req, conn)
            conn.send_full(200, self._model_body(principal, path[len(b"/v1/models/"):]))
            conn.request_done()
            return None
        if path not in _GET_PATHS:
            raise ApiError(404, f"no route for {req.method.decode()} {path.decode(errors='replace')}",
                           "unknown_url")
        if req.method != b"GET":
            raise ApiError(405, f"{path.decode()} only accepts GET", "method_not_allowed")
        if path == b"/health":
            conn.send_full(200, b'{"status":"ok"}')
        elif path == b"/ready":
            if self.has_table:
                conn.send_full(200, b'{"status":"ready","table_version":%d,"stream_relay":"%b"}'
                               % (self.table.version, self.stream_relay.encode()))
            else:
                raise ApiError(503, "no endpoint table yet", "not_ready", retry_after=1)
        elif path == b"/openapi.json":
            if self._openapi is None:
                self._openapi = build_document(_POST_PATHS, sorted(_GET_PATHS), sorted(UPLOAD_PATHS))
            conn.send_full(200, self._openapi)
        elif path == b"/metrics":
            token = self._metrics_auth
            if token is not None and not hmac.compare_digest(req.headers.get(b"authorization") or b"", token):
                raise ApiError(401, "/metrics needs the metrics token (Authorization: Bearer ...)",
                               "invalid_metrics_token")
            conn.send_full(200, self.metrics.render(), CONTENT_TYPE_LATEST.encode())
        else:
            principal = self.authenticate(req, conn)
            conn.send_full(200, self._models_body(principal))
        conn.request_done()
        return None

    def _models_body(self, p: Principal) -> bytes:
        table = self.table
        data = [_model_info(r) for r in table.models if p.may_use(r.name, *r.aliases)]
        data += [ModelInfo(t.model, "ready", ()) for t in table.tribunals.values()
                 if self._may_use_tribunal(p, t)]
        return _encode(ModelList(data))

    def _may_use_tribunal(self, p: Principal, t: TribunalEntry) -> bool:
        """A key sees a tribunal it may use, with every model the tribunal calls."""
        if p.allowed is None:
            return True
        if not p.may_use(t.model):
            return False
        for m in t.models:
            route = self.table.lookup(m)
            if not p.may_use(m, *((route.name,) if route is not None else ())):
                return False
        return True

    def install_tribunals(self, tribunals: tuple[TribunalEntry, ...]) -> None:
        """Static mode and tests: the current table with these tribunals (the dynamic mode gets
        them with the endpoint table)."""
        t = self.table
        self.table = RoutingTable(t.version, t.generated_at, t.models, tribunals)

    def _model_body(self, p: Principal, raw_name: bytes) -> bytes:
        """``GET /v1/models/{id}`` (the SDK's ``models.retrieve``): by name or alias."""
        name = unquote(raw_name.decode("utf-8", "replace"))
        route = self.table.lookup(name)
        if route is None:
            tribunal = self.table.tribunals.get(name)
            if tribunal is not None and self._may_use_tribunal(p, tribunal):
                return _encode(ModelInfo(tribunal.model, "ready", ()))
        if route is None or not p.may_use(route.name, name):  # a model the key may not use is not shown
            raise ApiError(404, f"The model '{name}' does not exist", "model_not_found", "model")
        return _encode(_model_info(route))

    def _request_id(self, req: Request) -> bytes:
        given = req.headers.get(b"x-request-id")
        if given is not None and _REQUEST_ID.match(given):
            return given
        self._rid_n += 1
        return self._rid_prefix + b"%d" % self._rid_n

    def release(self, backend: Backend) -> None:
        backend.inflight -= 1
        self.queues.wake(backend.models)  # a slot is free: the oldest waiter (if any) tries again

    def upstream_failed(self, backend: Backend, kind: str) -> None:
        self.metrics.upstream_error(backend.label, kind)
        s = self.settings
        if backend.record_failure(self.loop.time(), s.eject_after_failures, s.eject_base_s):
            self.metrics.ejected(backend.label)
            log.warning("endpoint_ejected", backend=backend.label, until_s=round(backend.ejected_until, 1),
                        reason=kind)
