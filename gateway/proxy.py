"""One proxied request: prelude, a task-free first attempt, slow paths in a task, bookkeeping.

The common path creates no task and no future. :meth:`ProxyCall.run` is called from the client
protocol's ``data_received``: the prelude (auth, content type, routing view, route, tenant
admission) raises :class:`ApiError` for bad input; then the first attempt takes an idle
keep-alive connection of the chosen backend and writes the upstream request at once. The
response is relayed by the :class:`Exchange` from the upstream protocol's callbacks, and this
object, as its :class:`ExchangeOwner`, finishes the request there (``exchange_done``).

The rare paths that must wait run the same steps in a task (:meth:`ProxyCall._slow`, started
through ``HttpConnection.run_slow``): no idle connection (connect), every backend saturated
(the model's FIFO queue), and a retry after a failure before the first byte.

Invariants: :meth:`_finish` runs exactly once (bookkeeping, then ``request_done`` unless a task
owns the end); the backend's in-flight count includes this request exactly while
``self.backend`` is set; the tenant's admission is left exactly once.
"""

from __future__ import annotations

from collections.abc import Collection, Coroutine
from time import perf_counter, time
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.auth import Principal
from gateway.backend import Backend
from gateway.balancer import choose
from gateway.errors import ApiError
from gateway.http_parse import Request
from gateway.http_server import HttpConnection
from gateway.prefix_router import PromptKey
from gateway.relay import CLIENT_GONE, Exchange
from gateway.request_view import GENERATES, ask_for_usage, parse_view, with_model, with_priority
from gateway.routing_table import RETRY_AFTER_STARTING, ModelRoute
from gateway.sse import SseScanner, usage_of
from gateway.tenant_admission import Admission
from gateway.tenant_limits import estimate_tokens
from gateway.tribunal import TribunalHandoff, tribunal_call
from gateway.upstream_client import UpstreamConnection, UpstreamError, build_request
from hpcgate.logs import get_logger
from hpcgate.schemas import ModelState

if TYPE_CHECKING:
    from gateway.app import Gateway

log = get_logger("hpcgate.gateway.proxy")

RETRY_BUDGET_CAP = 100.0
_JSON = b"application/json"
_POST = b"POST"


class ProxyCall:
    __slots__ = (
        "backend", "batch", "body", "completion", "conn", "error", "exchange", "finished", "gw", "in_task",
        "kind", "last", "model", "path", "pkey", "prefill_est", "prompt", "rid", "route", "stale_retried",
        "start", "status", "stream", "strip_usage", "tenant", "tenant_id", "tried", "tstate",
    )

    def __init__(self, gw: Gateway, conn: HttpConnection, path: bytes, rid: bytes) -> None:
        self.gw = gw
        self.conn = conn
        self.path = path
        self.rid = rid
        self.start = perf_counter()
        self.tenant = "-"
        self.tenant_id = 0
        self.batch = False  # a batch runner's request: admitted behind interactive ones
        self.model = "-"
        self.route: ModelRoute | None = None
        self.pkey: PromptKey | None = None  # set for a model routed cache-aware
        self.prefill_est = 0.0  # its estimated uncached tokens, in the backend's prefill_inflight
        self.body = b""
        self.kind = "chat"
        self.stream = False
        self.strip_usage = False  # a stream for which the gateway asked the engine for usage
        self.tstate: Admission | None = None  # the tenant's budgets this request holds
        self.backend: Backend | None = None  # set while counted in the backend's in-flight
        self.exchange: Exchange | None = None
        self.status = 499  # if the client goes away first
        self.prompt = 0
        self.completion = 0
        self.error: str | None = None
        self.tried: list[Backend] = []
        self.stale_retried = False
        self.last: UpstreamError | str = "no endpoint available"
        self.in_task = False  # a task owns the end (it calls request_done)
        self.finished = False

    # -- the common path, in callbacks ------------------------------------------------------------
    def run(self, req: Request, kind: str) -> Coroutine[Any, Any, None] | None:
        """Start the request; a coroutine when it must continue in a task."""
        try:
            self._prelude(req, kind)
            if self._first_attempt():
                return None
        except ApiError as exc:
            self._reply_error(exc)
            self._finish()
            return None
        except TribunalHandoff as handoff:  # a virtual model: gateway.tribunal owns the request
            self.finished = self.in_task = True  # nothing of this call to account
            return tribunal_call(self.gw, self.conn, self.rid, handoff, req.body)
        except BaseException:
            self.in_task = True  # the connection answers 500 and calls request_done
            self._finish()
            raise
        self.in_task = True
        return self._slow()

    def _prelude(self, req: Request, kind: str) -> None:
        gw = self.gw
        headers = req.headers
        internal = headers.get(b"x-hpcgate-internal-token")
        if internal is None:
            principal = gw.authenticate(req, self.conn)
        else:
            principal = gw.batch_principal(internal, headers.get(b"x-hpcgate-tenant-id"))
            self.batch = True
        self.tenant, self.tenant_id = principal.name, principal.tenant_id
        ctype = headers.get(b"content-type")
        if ctype != _JSON and (ctype is None or ctype.partition(b";")[0].strip().lower() != _JSON):
            raise ApiError(415, "Content-Type must be application/json", "unsupported_media_type")
        view = parse_view(kind, req.body)
        route = self._route(principal, view.model, kind)
        if gw.prefix_router is not None and route.name in gw.cache_aware:
            raw = view.messages if view.messages is not msgspec.UNSET else view.prompt
            if raw is not msgspec.UNSET:
                self.pkey = gw.prefix_router.key(memoryview(raw), route.name, principal.tenant_id,
                                                 headers.get(gw.session_header))
        if principal.limited:
            default = gw.settings.tpm_completion_estimate if kind in GENERATES else 0
            estimate = estimate_tokens(view.payload_bytes(), view.completion_cap(), default,
                                       route.max_model_len)
            self.tstate = gw.limits.admit(principal, route.name, gw.loop.time(), estimate)
        body = req.body if view.model == route.name else with_model(req.body, route.name)
        self.kind = kind
        if view.stream and kind == "responses":
            self.stream = True  # usage comes in response.completed, whatever the client asked
        elif view.stream:
            self.stream = True
            opts = view.stream_options
            # The client did not ask for usage: ask the engine anyway (every request is booked
            # with its exact tokens) and strip the usage event from the client's stream.
            self.strip_usage = not (opts and opts.include_usage)
            if self.strip_usage:
                body = ask_for_usage(body, opts is not msgspec.UNSET)
        self.body = body

    def _route(self, principal: Principal, name: str, kind: str) -> ModelRoute:
        """The route of model ``name`` (or alias) for ``principal``; 404, 403 or 503 otherwise,
        and :class:`TribunalHandoff` for a tribunal's name on a chat request."""
        route = self.gw.table.lookup(name)
        if route is None:
            tribunal = self.gw.table.tribunals.get(name)  # only after a miss: free for real models
            if tribunal is not None:
                if kind != "chat":
                    raise ApiError(400, f"'{name}' is a tribunal: it serves /v1/chat/completions only",
                                   "invalid_model_for_endpoint", "model")
                raise TribunalHandoff(tribunal, principal)
            if not self.gw.has_table:  # no endpoint table yet (Redis away at start): it may well exist
                raise ApiError(503, "the gateway has no endpoint table yet; retry shortly", "not_ready",
                               retry_after=1)
            raise ApiError(404, f"The model '{name}' does not exist", "model_not_found", "model")
        self.model = route.name
        if not principal.may_use(route.name, name):
            raise ApiError(403, f"this API key may not use model '{name}'", "model_not_allowed", "model")
        if not route.backends and not (route.scale_from_zero and route.state in _HOLDABLE):
            raise _no_instance(route)
        self.route = route
        return route

    def _pick(self, route: ModelRoute, exclude: Collection[Backend] = ()) -> Backend | None:
        """The backend for this request now (least-queue, or cache-aware for its model); None when
        all are saturated, or for a batch request while interactive ones wait for the model."""
        gw = self.gw
        if self.batch and gw.queues.length(route.name):
            return None  # interactive requests wait for this model: they go first
        cap = gw.batch_max_inflight if self.batch else gw.settings.endpoint_max_inflight
        pkey, router = self.pkey, gw.prefix_router
        if pkey is not None and router is not None:
            return router.choose(route.backends, pkey, gw.loop.time(), stale_after=gw.stale_after,
                                 max_inflight=cap, exclude=exclude)
        return choose(route.backends, gw.loop.time(), stale_after=gw.stale_after, max_inflight=cap,
                      exclude=exclude)

    def _first_attempt(self) -> bool:
        """Send on an idle connection now; False if that needs waiting (connect, queue)."""
        gw = self.gw
        s = gw.settings
        gw.retry_tokens = min(RETRY_BUDGET_CAP, gw.retry_tokens + s.retry_budget_ratio)
        assert self.route is not None
        backend = self._pick(self.route)
        if backend is None:
            return False
        up = backend.pool.take_idle()
        if up is None:
            return False
        self._count(backend)
        self._send(up)
        return True

    def _count(self, backend: Backend) -> None:
        backend.inflight += 1
        backend.since_scrape += 1
        self.backend = backend
        if self.pkey is not None:
            self.prefill_est = self.gw.prefix_router.record(  # type: ignore[union-attr]
                backend, self.pkey, self.gw.loop.time())
            backend.prefill_inflight += self.prefill_est

    def _release(self, backend: Backend) -> None:
        """The backend no longer carries this request (finished, or the attempt failed)."""
        if self.prefill_est:
            backend.prefill_inflight -= self.prefill_est
            self.prefill_est = 0.0
        self.gw.release(backend)

    def _send(self, up: UpstreamConnection) -> Exchange:
        backend = self.backend
        assert backend is not None
        gw = self.gw
        stream = self.stream
        # Each attempt scans its own stream: a retry must not inherit a partial event of the last.
        scanner = SseScanner(strip_usage=self.strip_usage) if stream else None
        ex = Exchange(gw.loop, self.conn, scanner, gw.settings.max_response_bytes,
                      stream, owner=None if self.in_task else self,
                      offloader=gw.offloader if stream and self.kind != "responses" else None)
        self.exchange = ex
        ex.upstream = up
        self.conn.listener = ex
        # The request id goes to the engine too: one id follows a request through gateway and engine logs.
        body = self.body
        if self.batch and backend.priority:  # backfill: the engine schedules it after interactive work
            body = with_priority(body, gw.settings.batch_priority)
        up.send(build_request(_POST, self.path, backend.host_header, backend.auth_line, body,
                              request_id=self.rid), ex)
        return ex

    # ExchangeOwner: called from the upstream (or client) protocol's callbacks.
    def exchange_head(self, ex: Exchange) -> None:
        if ex.status < 500:
            assert self.backend is not None
            self.backend.record_success()  # the body follows; exchange_done answers
            return
        try:  # 5xx before the first byte: try another endpoint, in a task
            self._attempt_failed(None, ex.status, reused=True)
        except ApiError as exc:
            self._reply_error(exc)
            self._finish()
            return
        self._continue_in_task()

    def exchange_done(self, ex: Exchange) -> None:
        try:
            if ex.phase is CLIENT_GONE:
                pass  # 499
            elif ex.retryable:  # the client saw nothing of it: try another endpoint, in a task
                self._attempt_failed(ex.error, 0, reused=True)
                self._continue_in_task()
                return
            elif ex.streamed:
                self.backend.record_success()  # type: ignore[union-attr]
                self._stream_ended(ex)
            else:
                self._respond(ex)
        except ApiError as exc:
            self._reply_error(exc)
        except Exception:
            log.exception("proxy_failed")
            self.status, self.error = 500, "internal gateway error"
            self.conn.keep_alive = False
            if self.conn.transport is not None:
                self.conn.transport.abort()
        self._finish()

    def _continue_in_task(self) -> None:
        if self.conn.closed:
            self._finish()
            return
        self.in_task = True
        self.conn.run_slow(self._slow())

    # -- shared by both paths ---------------------------------------------------------------------
    def _attempt_failed(self, err: UpstreamError | None, status: int, reused: bool) -> None:
        """The attempt failed before the first byte: return to try again, or raise ApiError."""
        gw = self.gw
        backend = self.backend
        assert backend is not None and self.route is not None
        ex = self.exchange
        if ex is not None:
            ex.owner = None
            ex.abort()
            self.exchange = None
        self.conn.listener = None
        self.backend = None
        self._release(backend)
        if err is not None and err.kind == "closed" and err.before_head and reused and not self.stale_retried:
            self.stale_retried = True  # a keep-alive connection the engine had closed: not its fault
            return
        self.last = err if err is not None else f"{backend.label} answered {status}"
        gw.upstream_failed(backend, err.kind if err is not None else f"http_{status}")
        self.tried.append(backend)
        if len(self.tried) > gw.settings.max_retries or gw.retry_tokens < 1.0:
            raise upstream_error(self.last)
        gw.retry_tokens -= 1.0
        gw.metrics.retry(self.route.name)

    def _stream_ended(self, ex: Exchange) -> None:
        self.status = ex.status
        scanner = ex.scanner
        assert scanner is not None
        if scanner.usage is not None:
            self.prompt, self.completion = scanner.usage.counts()
        else:
            self.completion = scanner.content_events
        if ex.error is not None:
            self.error = str(ex.error)
            self.gw.upstream_failed(self.backend, ex.error.kind)  # type: ignore[arg-type]

    def _respond(self, ex: Exchange) -> None:
        """A complete (not streamed) answer: relay it with its status."""
        self.status = ex.status
        if ex.error is not None:
            self.gw.upstream_failed(self.backend, ex.error.kind)  # type: ignore[arg-type]
            raise upstream_error(ex.error)
        out = ex.body
        if ex.status == 200:
            u = usage_of(out)
            if u is not None:
                self.prompt, self.completion = u.counts()
        ex.first_byte_at = perf_counter()
        self.conn.send_full(ex.status, out, ex.headers.get(b"content-type", _JSON))

    def _reply_error(self, exc: ApiError) -> None:
        self.status = exc.status
        self.error = exc.message
        self.conn.send_error(exc)

    # -- the slow path, in a task -----------------------------------------------------------------
    async def _slow(self) -> None:
        try:
            ex = await self._forward()
            await ex.wait_done()
            if ex.streamed:
                self._stream_ended(ex)
            else:
                self._respond(ex)
        except ApiError as exc:
            self._reply_error(exc)
        finally:
            self._finish()

    async def _forward(self) -> Exchange:
        """Send to the best backend; retry connect errors and 5xx before the first byte elsewhere."""
        gw = self.gw
        s = gw.settings
        route = self.route
        assert route is not None
        while True:
            backend = self._pick(route, self.tried)
            if backend is None:
                if self.tried:
                    raise upstream_error(self.last)
                if not route.backends:  # scaled to zero: held until an instance is ready
                    route = self.route = await self._hold(route)
                    continue
                await gw.queues.wait(route.name, s.queue_max, s.queue_timeout_s, batch=self.batch)
                continue
            self._count(backend)
            reused = False
            try:
                up = backend.pool.take_idle() or await backend.pool.acquire()
                reused = up.reused
                ex = self._send(up)
                await ex.wait_head()  # for a stream: its end
                err = ex.error
                if not ex.retryable and (ex.streamed or (err is None and ex.status < 500)):
                    backend.record_success()
                    return ex
                status = ex.status
            except UpstreamError as exc:
                err, status = exc, 0
            self._attempt_failed(err, status, reused)

    async def _hold(self, route: ModelRoute) -> ModelRoute:
        """Wait in the model's queue (announced as demand) until a table routes the model; 503 with
        Retry-After past the hold limit. Returns the route of the table that has instances."""
        gw = self.gw
        limit = route.hold_s or gw.settings.scale_from_zero_hold_s
        name = route.name
        while True:
            left = limit - (perf_counter() - self.start)
            if left <= 0:
                raise ApiError(503, f"model '{name}' is scaled to zero and no instance was ready within "
                               f"{limit:g}s; it is starting", "model_starting",
                               retry_after=RETRY_AFTER_STARTING)
            held = gw.queues.batch_length(name) if self.batch else gw.queues.length(name)
            if held >= gw.settings.queue_max:
                raise ApiError(503, f"model '{name}' is starting and holds as many requests as it may",
                               "model_starting", retry_after=RETRY_AFTER_STARTING)
            try:
                await gw.queues.wait(name, gw.settings.queue_max, left, batch=self.batch)
            except ApiError:
                continue  # the wait passed the hold limit: answered at the top
            current = gw.table.lookup(name)
            if current is None:
                raise ApiError(404, f"The model '{name}' does not exist", "model_not_found", "model")
            if current.backends:
                return current
            if not current.scale_from_zero:
                raise _no_instance(current)

    # -- the end ----------------------------------------------------------------------------------
    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        gw = self.gw
        ex = self.exchange
        if ex is not None:
            ex.owner = None
            ex.abort()
        backend = self.backend
        if backend is not None:
            self.backend = None
            self._release(backend)
        prompt, completion = self.prompt, self.completion
        if self.tstate is not None:
            self.tstate.leave(prompt + completion)
        duration = perf_counter() - self.start
        ttft = ex.first_byte_at - self.start if ex is not None and ex.first_byte_at else None
        status = self.status
        gw.metrics.observe(self.model, status, ttft, duration, prompt=prompt, completion=completion)
        if self.tenant_id:
            gw.usage.add(self.tenant_id, self.model, time(), ok=status < 400 and self.error is None,
                         prompt=prompt, completion=completion)
        if gw.access_log is not None:
            gw.access_log.access(self.rid, tenant=self.tenant, model=self.model,
                                 backend=backend.label if backend else None, status=status, ttft_s=ttft,
                                 duration_s=duration, prompt=prompt, completion=completion, error=self.error)
        if not self.in_task:
            self.conn.request_done()


_HOLDABLE = frozenset({ModelState.STOPPED, ModelState.STARTING})


def _no_instance(route: ModelRoute) -> ApiError:
    """503 for a model without a routable instance; Retry-After only if one is on its way."""
    if route.state == ModelState.STARTING:
        return ApiError(503, f"model '{route.name}' is starting: no ready instance yet", "model_starting",
                        retry_after=RETRY_AFTER_STARTING)
    if route.state == ModelState.READY:  # its instances are draining or missed probes right now
        return ApiError(503, f"model '{route.name}' has no routable instance right now",
                        "model_unavailable", retry_after=RETRY_AFTER_STARTING)
    why = f": {route.reason}" if route.reason else ""
    if route.state == ModelState.FAILED:
        return ApiError(503, f"model '{route.name}' failed{why}; no instance will start until an operator "
                        "fixes it", "model_failed")
    return ApiError(503, f"model '{route.name}' is stopped{why}; no instance will start until an operator "
                    "scales it up", "model_stopped")


def upstream_error(err: UpstreamError | str) -> ApiError:
    if isinstance(err, UpstreamError) and err.kind == "timeout":
        return ApiError(504, f"upstream timed out: {err}", "upstream_timeout")
    return ApiError(502, f"upstream failed: {err}", "upstream_error")
