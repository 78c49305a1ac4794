"""A lean HTTP/1.1 client for the upstream vLLM servers: keep-alive pools, push-style bodies.

One :class:`UpstreamConnection` (an asyncio protocol with an httptools response parser) carries
one request at a time. The response is *pushed* into a :class:`ResponseSink` from the parser
callbacks (head, body pieces, end, error): the relay writes each piece straight to the client
transport without a task switch per chunk, and backpressure is :meth:`pause_reading` on this
transport while the client's is full. Invariants: a connection goes back to its pool only after
a complete response that allows keep-alive; any other ending closes it (an aborted request
frees the engine's slot, because vLLM aborts a request whose connection closed). Every request
has a connect timeout and a per-read timeout, enforced by :meth:`UpstreamPool.check_stalls`
which the owner calls about once a second (a stall is detected up to a second late; no timer
per request); time paused for a slow client does not count, and there is no total timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol, cast

import httptools

from gateway.tcp import nodelay_fd


class UpstreamError(Exception):
    """The upstream failed. ``before_head``: nothing of the response arrived (safe to retry)."""

    def __init__(self, kind: str, message: str, before_head: bool) -> None:
        super().__init__(message)
        self.kind = kind  # connect | closed | timeout | protocol | too_large
        self.before_head = before_head


class ResponseSink(Protocol):
    def on_head(self, status: int, headers: dict[bytes, bytes]) -> None: ...
    def on_data(self, data: bytes) -> None: ...  # the body bytes of one read (all its HTTP chunks)
    # The head and ``body`` (the raw, still chunked rest of that read) came in one read: True if
    # the sink took the connection's reading over (gateway.offload); it then gives it back.
    def take_over(self, body: bytes) -> bool: ...
    def on_end(self, last: bytes) -> None: ...  # ``last``: body bytes of the final read not yet given
    def on_error(self, exc: UpstreamError) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_body",
        "_checked_reads",
        "_head_in_read",
        "_head_seen",
        "_headers",
        "_loop",
        "_parser",
        "_paused",
        "_pool",
        "_reads",
        "_stalled_since",
        "_write_waiter",
        "closed",
        "fd",
        "on_body",
        "reused",
        "sink",
        "transport",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self._headers: dict[bytes, bytes] = {}
        self._body: list[bytes] = []  # body pieces of the read being parsed
        # httptools calls ``on_body`` once per HTTP chunk (per token): binding it to list.append
        # makes that a C-to-C call, with no Python frame per chunk.
        self.on_body: Callable[[bytes], object] = self._body.append
        self._parser = httptools.HttpResponseParser(self)
        self._head_seen = False
        self._head_in_read = False  # the head completed in the read being parsed
        self._paused = False
        self.fd = -1
        self._reads = 0  # reads so far; the read timer compares it instead of taking the time per read
        self._checked_reads = -1
        self._stalled_since = 0.0
        self.transport: asyncio.Transport | None = None
        self.sink: ResponseSink | None = None
        self.closed = False
        self.reused = False
        self._write_waiter: asyncio.Future[None] | None = None  # an upload waits for the engine to read

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement its interface.
        self.transport = cast("asyncio.Transport", transport)
        self.fd = nodelay_fd(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.resume_writing()
        self._not_busy()
        self._pool.forget(self)
        sink, self.sink = self.sink, None
        if sink is not None:
            self._flush_body(sink)
            sink.on_error(UpstreamError("closed", "upstream closed the connection", not self._head_seen))

    def eof_received(self) -> None:
        # The engine closed its side: never hand this connection out again. (The transport is
        # closed now but connection_lost runs a loop iteration later; a request written in
        # between would raise in transport.write.)
        self.closed = True

    def data_received(self, data: bytes) -> None:
        self._reads += 1
        if self.sink is None:  # bytes nobody asked for: the connection is out of sync
            self.abort()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError("protocol", f"malformed upstream response: {exc}", not self._head_seen))
            return
        body = self._body
        if self._head_in_read:
            self._head_in_read = False
            if self.sink is not None and self._offer(data):
                body.clear()
                return
        # One read may hold many HTTP chunks (tokens): the sink gets them as one piece.
        if body:
            sink = self.sink
            if sink is not None:
                data = body[0] if len(body) == 1 else b"".join(body)
                body.clear()
                sink.on_data(data)

    def _offer(self, data: bytes) -> bool:
        """Offer the rest of a response whose whole head is in ``data`` to the sink's relay."""
        end = data.find(b"\r\n\r\n")
        if (end < 0 or not data.startswith(b"HTTP/1.1 200 ") or not self._parser.should_keep_alive()
                or self._headers.get(b"transfer-encoding", b"").lower() != b"chunked"):
            return False  # the head began in an earlier read, an unusual answer (not chunked), no keep-alive
        assert self.sink is not None
        if not self.sink.take_over(data[end + 4:]):
            return False
        self._not_busy()  # the relay enforces the read timeout now
        return True

    def offload_finished(self, reusable: bool) -> None:
        """The relay gave the connection back: pool it after a complete response, else close."""
        self.sink = None
        if reusable and not self.closed and self.transport is not None:
            self._parser = httptools.HttpResponseParser(self)  # the old one stopped mid-body
            self.transport.resume_reading()
            self._pool.release(self)
        else:
            self.abort()

    def _flush_body(self, sink: ResponseSink) -> None:
        body = self._body
        if body:
            data = body[0] if len(body) == 1 else b"".join(body)
            body.clear()
            sink.on_data(data)

    # -- httptools callbacks --------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self._head_seen = True
        self._head_in_read = True
        if self.sink is not None:
            self.sink.on_head(self._parser.get_status_code(), self._headers)

    def on_message_complete(self) -> None:
        self._not_busy()
        sink, self.sink = self.sink, None
        keep = self._parser.should_keep_alive()
        body = self._body
        last = (body[0] if len(body) == 1 else b"".join(body)) if body else b""
        body.clear()
        if sink is not None:
            sink.on_end(last)  # the last data and the end of the response: one write to the client
        if keep and not self.closed:
            self._pool.release(self)
        else:
            self.close()

    # -- use ----------------------------------------------------------------------------------
    def send(self, request: bytes, sink: ResponseSink) -> None:
        assert self.transport is not None
        self.sink = sink
        self._headers = {}
        self._head_seen = False
        self._head_in_read = False
        self._paused = False
        self._checked_reads = -1
        self.transport.write(request)
        self._pool.busy.add(self)  # the pool's sweep watches it for stalls (no timer per request)

    # An upload's body is written piece by piece (gateway.upload): it waits while the engine's
    # socket is full, so a fast client and a slow engine never fill the gateway's memory.
    def pause_writing(self) -> None:
        if self._write_waiter is None:
            self._write_waiter = self._loop.create_future()

    def resume_writing(self) -> None:
        w, self._write_waiter = self._write_waiter, None
        if w is not None and not w.done():
            w.set_result(None)

    async def drain(self) -> None:
        w = self._write_waiter
        if w is not None:
            await w
        if self.closed:
            raise UpstreamError("closed", "upstream closed the connection", not self._head_seen)

    def write(self, data: bytes) -> None:
        """More of the request (an upload's body) after :meth:`send`."""
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def pause_reading(self) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self._checked_reads = -1  # a fresh period starts now
            self.transport.resume_reading()

    def check_stall(self, now: float, limit: float) -> None:
        """Called about once a second while a request is in flight: fail it after ``limit`` s
        without a read (not counting time paused for a slow client)."""
        if self.sink is None or self.closed:
            self._pool.busy.discard(self)
            return
        if self._paused or self._reads != self._checked_reads:
            self._checked_reads = self._reads
            self._stalled_since = now
        elif now - self._stalled_since >= limit:
            self._fail(UpstreamError("timeout", "upstream read timed out", not self._head_seen))

    def _not_busy(self) -> None:
        self._pool.busy.discard(self)

    def _fail(self, exc: UpstreamError) -> None:
        sink, self.sink = self.sink, None
        self._body.clear()
        self.abort()
        if sink is not None:
            sink.on_error(exc)

    def abort(self) -> None:
        """Close at once (RST): the upstream sees the disconnect and aborts the request."""
        self._not_busy()
        self.sink = None
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self._not_busy()
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamPool:
    """Keep-alive connections to one endpoint; at most ``max_idle`` idle ones are kept (LIFO)."""

    __slots__ = ("_idle", "busy", "closed", "connect_timeout", "host", "loop", "max_idle", "open_count",
                 "port", "read_timeout")

    def __init__(
        self, host: str, port: int, *, loop: asyncio.AbstractEventLoop, max_idle: int,
        connect_timeout: float, read_timeout: float,
    ) -> None:
        self.host = host
        self.port = port
        self.loop = loop
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: list[UpstreamConnection] = []
        self.busy: set[UpstreamConnection] = set()  # a request in flight
        self.open_count = 0
        self.closed = False

    def take_idle(self) -> UpstreamConnection | None:
        """An idle keep-alive connection, if any (no coroutine on the common path)."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn.reused = True
                return conn
        return None

    async def acquire(self) -> UpstreamConnection:
        conn = self.take_idle()
        if conn is not None:
            return conn
        return await self.open()

    async def open(self) -> UpstreamConnection:
        """A new connection (an upload takes one: a stale keep-alive one could not be retried)."""
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, proto = await self.loop.create_connection(
                    lambda: UpstreamConnection(self), self.host, self.port
                )
        except TimeoutError:
            raise UpstreamError("connect", "upstream connect timed out", True) from None
        except OSError as exc:
            raise UpstreamError("connect", f"upstream connect failed: {exc.strerror or exc}", True) from None
        self.open_count += 1
        return proto

    def check_stalls(self, now: float) -> None:
        """The per-read timeout, swept once a second by the owner (see UpstreamConnection)."""
        if self.busy:
            limit = self.read_timeout
            for conn in list(self.busy):
                conn.check_stall(now, limit)

    def release(self, conn: UpstreamConnection) -> None:
        if self.closed or len(self._idle) >= self.max_idle:
            conn.close()
        else:
            self._idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        self.open_count -= 1
        # A closed connection left in _idle is skipped by acquire(); removing it here is O(n).

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def close(self) -> None:
        self.closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def build_request(method: bytes, path: bytes, host_header: bytes, auth_line: bytes, body: bytes, *,
                  request_id: bytes) -> bytes:
    """A complete HTTP/1.1 request, in one allocation; ``auth_line`` is b"" or a prebuilt
    ``authorization`` line."""
    return (b"%b %b HTTP/1.1\r\nhost: %b\r\n%bx-request-id: %b\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%b") % (
        method, path, host_header, auth_line, request_id, len(body), body)


def build_upload_head(path: bytes, host_header: bytes, auth_line: bytes, content_type: bytes,
                      content_length: int | None, *, request_id: bytes) -> bytes:
    """The head of an upload relayed as it arrives: the client's Content-Type (its multipart
    boundary), and its Content-Length, or chunked framing when it sent none."""
    length = b"content-length: %d\r\n" % content_length if content_length is not None else (
        b"transfer-encoding: chunked\r\n")
    return (b"POST %b HTTP/1.1\r\nhost: %b\r\n%bx-request-id: %b\r\ncontent-type: %b\r\n%b\r\n") % (
        path, host_header, auth_line, request_id, content_type, length)
