"""A lean asyncio HTTP/1.1 server: one protocol object per connection, no task per request.

Shape after uvicorn's httptools protocol: the parser (:mod:`gateway.http_parse`) only collects;
each complete request is handed to the handler *synchronously* from ``data_received``, one at a
time per connection (pipelined requests wait in a short deque). The handler either answers
and/or continues in callbacks (it returns None and calls :meth:`HttpConnection.request_done`
exactly once when the response is complete; the proxy's common path), or returns a coroutine
for the rare slow paths, which then runs in a task (``request_done`` follows it). A task per
request, with its creation and wake-ups, was the largest per-request cost of the relay.
 Status lines are prebuilt, the ``date`` header is rebuilt once a
second. Flow control: when the client's transport buffer passes its high-water mark
(``pause_writing``) the connection tells its :class:`WriteListener` (the relay pauses reading
upstream) and :meth:`HttpConnection.drain` blocks until ``resume_writing``.

Timeouts: an idle keep-alive connection is closed after ``keep_alive_timeout_s`` (checked by
the once-a-second tick, so up to a second later; no timer per request); a request whose
headers and body do not arrive within ``request_read_timeout_s`` gets 408 and the connection
is closed (slowloris); a client whose transport stays full (it reads nothing) for
``client_send_timeout_s`` is cut, like nginx's ``send_timeout``. Beyond ``limit_concurrency``
open connections a new one gets 503 and is closed. A disconnecting client cancels its handler
task at once, or tells the callback-driven request through :meth:`WriteListener.client_lost`.
"""

from __future__ import annotations

import asyncio
import email.utils
import socket
import time
from collections import deque
from collections.abc import Callable, Coroutine
from http import HTTPStatus
from typing import Any, Protocol, cast

from gateway.client_guard import ConnectionCounter, TrustedProxies, forwarded_client, parse_networks
from gateway.errors import ApiError, error_body
from gateway.http_parse import FramingError, Request, RequestFramer, Upload
from gateway.settings import GatewaySettings
from gateway.tcp import nodelay_fd
from gateway.tls import server_context
from hpcgate.logs import get_logger

log = get_logger("hpcgate.gateway.http")

STATUS_LINE: dict[int, bytes] = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus
}
_JSON = b"application/json"
_MAX_PIPELINE = 16
LINGER_S = 2.0  # a rejected connection drops what the client still sends for this long ...
LINGER_BYTES = 8 * 1024 * 1024  # ... or this much, then closes (see HttpConnection._reject)


class _Clock:
    """The ``date`` header line, refreshed once a second by the server's tick."""

    line = b""

    @classmethod
    def refresh(cls) -> None:
        cls.line = b"date: " + email.utils.formatdate(time.time(), usegmt=True).encode() + b"\r\n"


_Clock.refresh()


class WriteListener(Protocol):
    def client_paused(self) -> None: ...
    def client_resumed(self) -> None: ...
    def client_lost(self) -> None: ...


# None: the handler finished or continues in callbacks and calls ``conn.request_done()`` once;
# a coroutine: run in a task, ``request_done`` follows it. ApiError raised: answered here.
Handler = Callable[[Request, "HttpConnection"], "Coroutine[Any, Any, None] | None"]


class HttpConnection(asyncio.Protocol):
    __slots__ = (
        "_busy", "_drain_waiter", "_framer", "_linger_left", "_pipeline", "_read_timer", "_server", "_task",
        "_upload", "closed", "counted", "fd", "idle_since", "keep_alive", "listener", "paused_since",
        "paused_size", "peer", "response_headers", "response_started", "transport", "write_paused",
    )

    def __init__(self, server: HttpServer) -> None:
        s = server.settings
        self._server = server
        self._framer = RequestFramer(s.max_body_bytes, s.max_header_count, s.max_header_bytes,
                                     upload_paths=server.upload_paths, max_upload_bytes=s.max_upload_bytes)
        self._upload: Upload | None = None  # the body of the request being answered, if an upload
        self._pipeline: deque[Request] = deque()
        self._task: asyncio.Task[None] | None = None  # only for a request on a slow path
        self._busy = False  # a request is being answered (in a task or in callbacks)
        self.idle_since = 0.0  # when the connection became idle (0: not idle); see sweep
        self.paused_since = 0.0  # since when a paused client's transport has made no progress
        self.paused_size = 0  # its write buffer's size then (the sweep sees progress as a smaller one)
        self._read_timer: asyncio.TimerHandle | None = None  # request read deadline, or the linger's end
        self._linger_left = -1  # >= 0: rejected, bytes still read and dropped before closing
        self._drain_waiter: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None
        self.fd = -1  # the socket's descriptor (the C relay writes to it; see gateway.offload)
        self.peer = ""  # the client's address (a proxy's, behind one: see client_address)
        self.counted = False  # counted in the server's per-address connection counter
        self.closed = False
        self.write_paused = False
        self.keep_alive = True
        self.response_started = False  # some byte of the current response was written (or handed
        # to the C relay, which writes the head it was given; see gateway.relay)
        self.response_headers = b""  # header lines every response to the current request carries
        self.listener: WriteListener | None = None  # the relay streaming on this connection

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement its interface.
        self.transport = cast("asyncio.Transport", transport)
        self.fd = nodelay_fd(transport)
        server = self._server
        server.connections.add(self)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) and peer else ""
        if len(server.connections) > server.settings.limit_concurrency or server.shutting_down:
            self._refuse("gateway is at its connection limit")
            return
        if self.peer not in server.trusted_proxies:
            if not server.per_address.admit(self.peer):
                self._refuse(f"too many open connections from {self.peer}")
                return
            self.counted = True
        self._arm_idle()

    def _refuse(self, message: str) -> None:
        self.keep_alive = False
        self.send_full(503, error_body(503, message, "overloaded"), extra=b"retry-after: 1\r\n")
        assert self.transport is not None
        self.transport.close()  # after the buffered answer is written

    def client_address(self, forwarded_for: bytes | None) -> str:
        """The client's address: the peer's, or behind a trusted proxy the one it forwarded."""
        if self.peer in self._server.trusted_proxies:
            return forwarded_client(self.peer, forwarded_for)
        return self.peer

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._server.connections.discard(self)
        if self.counted:
            self.counted = False
            self._server.per_address.release(self.peer)
        self._cancel_timers()
        listener = self.listener
        if listener is not None:
            self.listener = None
            listener.client_lost()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._upload is not None and not self._upload.done:
            self._upload.fail(ConnectionResetError("client disconnected during the upload"))
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("client disconnected"))

    def data_received(self, data: bytes) -> None:
        if self._linger_left >= 0:  # rejected: drop what the client is still sending (see _reject)
            self._linger_left -= len(data)
            if self._linger_left < 0 and self.transport is not None:
                self.transport.close()
            return
        self.idle_since = 0.0
        try:
            requests = self._framer.feed(data)
        except FramingError as exc:
            self._reject(exc.status, str(exc))
            return
        if requests:
            for r in requests:
                if r.upload is not None:  # its body is still arriving: read it at the handler's pace
                    r.upload.pause, r.upload.resume = self._pause_reading, self._resume_reading
                    r.upload.check_pause()
        if self._framer.uploading:  # no deadline for a whole upload; the handler times each read
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None
        elif self._framer.in_message:
            if self._read_timer is None:
                self._read_timer = self._server.loop.call_later(
                    self._server.settings.request_read_timeout_s, self._read_timeout
                )
        elif self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        if requests:
            self._pipeline.extend(requests)
            if len(self._pipeline) > _MAX_PIPELINE:
                self._reject(400, "too many pipelined requests")
                return
            if not self._busy:
                self._start_next()

    def _pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.paused_since = self._server.loop.time()
        self.paused_size = self.transport.get_write_buffer_size() if self.transport is not None else 0
        if self.listener is not None:
            self.listener.client_paused()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.listener is not None:
            self.listener.client_resumed()
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- request cycle ------------------------------------------------------------------------
    def _start_next(self) -> None:
        request = self._pipeline.popleft()
        self._upload = request.upload
        self.keep_alive = request.keep_alive and not self._server.shutting_down
        self.response_started = False
        self.response_headers = b""
        self._busy = True
        try:
            slow = self._server.handler(request, self)
        except ApiError as exc:
            self.send_error(exc)
            self.request_done()
            return
        except Exception:
            log.exception("handler_failed")
            self._internal_error()
            self.request_done()
            return
        if slow is not None:
            self._task = self._server.loop.create_task(self._run(slow))

    def run_slow(self, coro: Coroutine[Any, Any, None]) -> None:
        """Continue the request in progress in a task (a slow path that must wait); the
        connection calls :meth:`request_done` when it ends and cancels it if the client leaves."""
        self._task = self._server.loop.create_task(self._run(coro))

    def _internal_error(self) -> None:
        if not self.response_started:
            self.keep_alive = False
            self.send_full(500, error_body(500, "internal gateway error", "internal_error"))
        elif self.transport is not None:
            self.transport.abort()

    async def _run(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except ApiError as exc:
            if not self.response_started:
                self.send_error(exc)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("handler_failed")
            self._internal_error()
        finally:
            self._task = None
            self.request_done()

    def request_done(self) -> None:
        """The response in progress is complete (or abandoned): next request, idle, or close."""
        self._busy = False
        upload = self._upload
        if upload is not None:
            self._upload = None
            if not upload.done:  # answered before its body ended: the rest is read and dropped
                upload.discard()
        self.response_headers = b""
        self.listener = None
        if not self.closed:
            if not self.keep_alive:
                if self.transport is not None:
                    self.transport.close()
            elif self._pipeline:
                self._start_next()
            else:
                self._arm_idle()

    def _arm_idle(self) -> None:
        if self._server.shutting_down:
            if self.transport is not None:
                self.transport.close()
            return
        # No timer per request: the server's once-a-second tick closes connections idle too long.
        self.idle_since = self._server.loop.time()

    def sweep(self, now: float, idle_limit: float, send_limit: float) -> None:
        """Once a second: close a keep-alive connection idle too long; cut a client that has not
        read anything for ``send_limit`` seconds (its stream would hold an engine slot forever).
        Like nginx's ``send_timeout`` the limit is between two reads of the client: a smaller
        write buffer than at the last look is progress and starts the time again."""
        since = self.idle_since
        transport = self.transport
        if transport is None:
            return
        if since and now - since >= idle_limit and not self._busy:
            transport.close()
        elif self.write_paused:
            size = transport.get_write_buffer_size()
            if size < self.paused_size:
                self.paused_since = now
            self.paused_size = size
            if now - self.paused_since >= send_limit:
                transport.abort()

    def _read_timeout(self) -> None:
        self._read_timer = None
        if not self._busy:
            self._reject(408, "request not received in time")
        elif self.transport is not None:
            self.keep_alive = False  # a pipelined request stalled: finish the current one, then close

    def _reject(self, status: int, message: str) -> None:
        """Answer a request that cannot be served (bad framing, too large, too slow) and close.

        Like nginx's lingering close: when the answer is ours to give, it is followed by a FIN
        and the connection keeps reading, and dropping, what the client still sends (a body it
        started before reading the answer) for up to ``LINGER_S`` or ``LINGER_BYTES``. Closing
        at once would make the kernel answer those bytes with a reset, which destroys the
        answer in the client's receive buffer before it reads it.
        """
        self._pipeline.clear()
        self.keep_alive = False
        transport = self.transport
        if transport is None:
            return
        if self._busy or self.response_started or not transport.can_write_eof():
            transport.close()
            return
        self.send_full(status, error_body(status, message))
        transport.write_eof()
        self._cancel_timers()
        self._linger_left = LINGER_BYTES
        self._read_timer = self._server.loop.call_later(LINGER_S, transport.close)

    def _cancel_timers(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def close_when_idle(self) -> None:
        """Shutdown: close now if idle, else after the response in progress."""
        self.keep_alive = False
        if not self._busy and self.transport is not None:
            self.transport.close()

    # -- responses ---------------------------------------------------------------------------
    def _head(self, status: int, content_type: bytes, extra: bytes) -> bytes:
        """A response head up to its last header line; no side effect (see chunked_head)."""
        return b"".join((
            STATUS_LINE.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status,
            b"content-type: ", content_type, b"\r\n",
            _Clock.line,
            b"" if self.keep_alive else b"connection: close\r\n",
            self.response_headers,
            extra,
        ))

    def send_full(self, status: int, body: bytes, content_type: bytes = _JSON, extra: bytes = b"") -> None:
        """A complete response with content-length, in one write."""
        if self.transport is None or self.closed:
            return
        self.response_started = True
        head = self._head(status, content_type, extra)
        self.transport.write(b"%bcontent-length: %d\r\n\r\n%b" % (head, len(body), body))

    def send_error(self, exc: ApiError, extra: bytes = b"") -> None:
        if exc.retry_after is not None:
            extra += b"retry-after: %d\r\n" % exc.retry_after
        self.send_full(exc.status, exc.body(), _JSON, extra)

    def chunked_head(self, status: int, content_type: bytes, extra: bytes = b"") -> bytes:
        """The head of a chunked response, not written: the relay (gateway.relay) holds it until
        the first chunk and writes both at once, and sets ``response_started`` then. A head alone
        tells a streaming client nothing, and its own write (a syscall, and a wake-up of the
        client) was the costliest single step of a short stream."""
        return self._head(status, content_type, extra) + b"transfer-encoding: chunked\r\n\r\n"

    async def drain(self) -> None:
        """Wait while the client's transport is over its high-water mark (backpressure)."""
        if self.closed:
            raise ConnectionResetError("client disconnected")
        if not self.write_paused:
            return
        if self._drain_waiter is None:
            self._drain_waiter = self._server.loop.create_future()
        await self._drain_waiter

    @property
    def busy(self) -> bool:
        return self._busy


class HttpServer:
    """Owns the listening socket, the open connections and the once-a-second tick."""

    def __init__(self, handler: Handler, settings: GatewaySettings, loop: asyncio.AbstractEventLoop,
                 upload_paths: frozenset[bytes] = frozenset()) -> None:
        self.handler = handler
        self.settings = settings
        self.upload_paths = upload_paths  # requests whose body is relayed as it arrives (multipart)
        self.loop = loop
        self.connections: set[HttpConnection] = set()
        self.per_address = ConnectionCounter(settings.max_connections_per_address)
        self.trusted_proxies = TrustedProxies(parse_networks(settings.trusted_proxies))
        self.shutting_down = False
        self._server: asyncio.Server | None = None
        self._tick: asyncio.TimerHandle | None = None
        self.on_tick: list[Callable[[], None]] = []  # once-a-second hooks (e.g. flush the access log)

    async def start(self, sock: socket.socket) -> None:
        s = self.settings
        tls = server_context(s.tls_cert_file, s.tls_key_file) if s.tls_cert_file and s.tls_key_file else None
        self._server = await self.loop.create_server(
            lambda: HttpConnection(self), sock=sock, backlog=2048, ssl=tls,
            ssl_handshake_timeout=s.request_read_timeout_s if tls else None,
        )
        self._on_tick()

    def _on_tick(self) -> None:
        _Clock.refresh()
        now = self.loop.time()
        idle_limit = self.settings.keep_alive_timeout_s
        send_limit = self.settings.client_send_timeout_s
        for conn in list(self.connections):
            conn.sweep(now, idle_limit, send_limit)
        for hook in self.on_tick:
            hook()
        self._tick = self.loop.call_later(1.0, self._on_tick)

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def shutdown(self, timeout: float,
                       before_cut: Callable[[], Coroutine[Any, Any, None]] | None = None) -> None:
        """Stop accepting, let responses in progress finish up to ``timeout``, then cut the rest
        (``before_cut`` first: streams the C relay holds must be given back before)."""
        self.shutting_down = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close_when_idle()
        deadline = self.loop.time() + timeout
        while any(c.busy for c in self.connections) and self.loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # shutdown only: polling a handful of connections is fine
        if before_cut is not None:
            await before_cut()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self._tick is not None:
            self._tick.cancel()
        await asyncio.sleep(0)  # let connection_lost callbacks run


def bind_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock
