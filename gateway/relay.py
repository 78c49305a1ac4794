"""One upstream exchange: receives the pushed response and relays it to the client.

:class:`Exchange` is both the upstream connection's :class:`ResponseSink` and the client
connection's :class:`WriteListener`. Before the handler *commits* (decides the response is a
success worth streaming) body pieces are buffered; after commit each upstream read is written
to the client from the protocol callback: the body of one upstream read (often several tokens)
leaves as one HTTP chunk in one write, with no task switch and no queue per token.
Backpressure: a full client transport pauses reading upstream; the kernel's socket buffers
then push back on the engine. A client that goes away aborts the upstream connection at once
(the engine frees the slot). An upstream failure after commit ends the stream with an SSE
error event and a proper last chunk: the client never hangs.

A committed stream whose head came whole in one upstream read is usually not relayed here at
all: :meth:`Exchange.take_over` hands its rest to the C relay thread (:mod:`gateway.offload`),
and :meth:`Exchange.offload_finished` takes it back at its end, with the same outcomes (end,
upstream failure with an SSE error event, client gone) as the paths here.

The handler learns of progress in one of two ways: an :class:`ExchangeOwner` is called from the
callbacks (the task-free common path: ``exchange_head`` for a head not committed as a stream,
``exchange_done`` once when the exchange ends, fails or the client leaves), or, without an
owner, a task awaits :meth:`wait_head` / :meth:`wait_done` (futures made only then).
"""

from __future__ import annotations

import asyncio
from time import perf_counter
from typing import TYPE_CHECKING, Protocol

import msgspec

from gateway.errors import sse_error_event
from gateway.http_server import HttpConnection
from gateway.sse import SseScanner, decode_usage_view
from gateway.upstream_client import UpstreamConnection, UpstreamError

if TYPE_CHECKING:
    from gateway._crelay import RelayResult
    from gateway.offload import Offloader


# The relay's upstream failure outcomes, worded as the event-loop path words them.
_RELAY_FAILURES = {"closed": "upstream closed the connection", "timeout": "upstream read timed out",
                   "protocol": "malformed upstream response"}


class ExchangeOwner(Protocol):
    def exchange_head(self, exchange: Exchange) -> None: ...  # a head that was not committed
    def exchange_done(self, exchange: Exchange) -> None: ...  # ended, failed or client gone; once


class Exchange:
    __slots__ = (
        "_buffer", "_done", "_head", "_head_seen", "_limit", "_loop", "_settled", "_size", "client",
        "client_gone", "committed", "ended", "error", "first_byte_at", "headers", "offloader", "owner",
        "scanner", "status", "stream_headers", "upstream",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, client: HttpConnection,
                 scanner: SseScanner | None, limit: int, stream_headers: bytes | None = None, *,
                 owner: ExchangeOwner | None = None, offloader: Offloader | None = None) -> None:
        """``stream_headers``: extra response headers if a 200 answer is to be streamed;
        ``offloader``: the C relay thread that may take a committed stream over."""
        self._loop = loop
        self.client = client
        self.scanner = scanner
        self.owner = owner
        self._limit = limit
        self._buffer: list[bytes] = []
        self._size = 0
        self._head: asyncio.Future[None] | None = None  # made by wait_head, if a task waits
        self._done: asyncio.Future[None] | None = None
        self._head_seen = False  # wait_head may return
        self._settled = False  # wait_done may return
        self.upstream: UpstreamConnection | None = None
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.committed = False
        self.ended = False
        self.client_gone = False
        self.error: UpstreamError | None = None
        self.first_byte_at = 0.0
        self.stream_headers = stream_headers
        self.offloader = offloader

    # -- ResponseSink (called from the upstream protocol) -----------------------------------------
    def on_head(self, status: int, headers: dict[bytes, bytes]) -> None:
        self.status = status
        self.headers = headers
        if status == 200 and self.stream_headers is not None:
            # A successful stream is committed right here, not after a task switch: the first
            # token leaves in the same loop iteration that received it, and the handler's next
            # wake-up is the end of the stream (wait_head resolves then).
            self.commit_stream(self.stream_headers)
            return
        self._head_seen = True
        owner = self.owner
        if owner is not None:
            owner.exchange_head(self)
        elif self._head is not None and not self._head.done():
            self._head.set_result(None)

    def on_data(self, data: bytes) -> None:
        if self.committed:  # the hot path: once per upstream read of a stream
            scanner = self.scanner
            if scanner is not None:
                data = scanner.feed(data)
            if data:
                if not self.first_byte_at:
                    self.first_byte_at = perf_counter()
                client = self.client
                if not client.closed:
                    head = client.pending_head  # the held head leaves with the first chunk
                    if head:
                        client.pending_head = b""
                    client.transport.write(b"%b%x\r\n%b\r\n" % (head, len(data), data))  # type: ignore[union-attr]
            return
        self._size += len(data)
        if self._size > self._limit:
            upstream = self.upstream
            if upstream is not None:
                upstream.abort()
            self.on_error(UpstreamError("too_large", "upstream response too large", False))
            return
        self._buffer.append(data)

    def take_over(self, body: bytes) -> bool:
        """The upstream head and ``body`` (the raw rest of that read) arrived together: hand the
        rest of a committed stream to the C relay. False: the event loop relays it."""
        off = self.offloader
        scanner = self.scanner
        if (off is None or not self.committed or self._buffer or self.ended or self.error is not None
                or scanner is None or not scanner.pristine or self.upstream is None or self.client.closed):
            return False
        return off.start(self, self.upstream, body, strip_usage=scanner.strip_usage)

    def offload_finished(self, result: RelayResult) -> None:
        """The relay gave the stream back (see gateway/offload.py for the outcomes)."""
        _, outcome, pending, usage, events, first_byte, reusable = result
        scanner = self.scanner
        assert scanner is not None
        scanner.data_events += events
        if usage is not None:
            try:
                view = decode_usage_view(usage)
            except msgspec.DecodeError:
                view = None
            if view is not None and view.usage is not None:
                scanner.usage = view.usage
        if first_byte and not self.first_byte_at:
            self.first_byte_at = first_byte
        client, up = self.client, self.upstream
        if outcome == "done":
            self.ended = True
            if up is not None:
                self.upstream = None
                up.offload_finished(reusable)
            if client.transport is not None:
                client.transport.resume_reading()
            self._resolve()
        elif outcome in ("client_gone", "client_timeout", "cancelled"):
            # The client is cut; its connection_lost tells this exchange (client_lost), which
            # aborts the upstream request and settles the exchange.
            client.keep_alive = False
            if client.transport is not None:
                client.transport.abort()
            else:
                self.client_lost()
        else:  # the upstream failed mid-stream: what the client has not taken, then the error event
            if up is not None:
                up.offload_finished(False)
            if client.transport is not None:
                client.transport.resume_reading()
                if pending:
                    client.transport.write(pending)
            self.on_error(UpstreamError(outcome, _RELAY_FAILURES.get(outcome, "relay failed"), False))

    def _take_buffered(self) -> bytes:
        buffered = self._buffer
        data = buffered[0] if len(buffered) == 1 else b"".join(buffered)
        buffered.clear()
        if self.scanner is not None:
            data = self.scanner.feed(data)
        if data and not self.first_byte_at:
            self.first_byte_at = perf_counter()
        return data

    def on_end(self, last: bytes) -> None:
        self.ended = True
        if self.committed:
            scanner = self.scanner
            if scanner is not None:
                last = scanner.feed(last) + scanner.flush() if last else scanner.flush()
            if last and not self.first_byte_at:
                self.first_byte_at = perf_counter()
            self.client.end_chunked(last)
        elif last:
            self._buffer.append(last)
        self._resolve()

    def on_error(self, exc: UpstreamError) -> None:
        if self.ended or self.error is not None:
            return
        self.error = exc
        if self.committed:
            self.client.end_chunked(sse_error_event(f"upstream failed mid-stream: {exc}", exc.kind))
        self._resolve()

    def _resolve(self) -> None:
        self._head_seen = self._settled = True
        owner = self.owner
        if owner is not None:
            self.owner = None
            owner.exchange_done(self)
            return
        if self._head is not None and not self._head.done():
            self._head.set_result(None)
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    # -- WriteListener (called from the client protocol) ----------------------------------------
    def client_paused(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def client_resumed(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    def client_lost(self) -> None:
        self.client_gone = True
        self.abort()
        self._resolve()

    # -- used by the handler ----------------------------------------------------------------------
    async def wait_head(self) -> None:
        if not self._head_seen:
            if self._head is None:
                self._head = self._loop.create_future()
            await self._head

    async def wait_done(self) -> None:
        if not self._settled:
            if self._done is None:
                self._done = self._loop.create_future()
            await self._done

    @property
    def body(self) -> bytes:
        return b"".join(self._buffer)

    def commit_stream(self, extra_headers: bytes) -> None:
        """Start the client's chunked response with what arrived before the commit (one write)."""
        client = self.client
        ctype = self.headers.get(b"content-type", b"text/event-stream")
        self.committed = True
        first = self._take_buffered() if self._buffer else b""
        if self.ended:
            if self.scanner is not None:
                first += self.scanner.flush()
            client.start_chunked(self.status, ctype, extra_headers, first)
            client.end_chunked()
        else:
            client.start_chunked(self.status, ctype, extra_headers, first)
            if self.error is not None:
                err = self.error
                client.end_chunked(sse_error_event(f"upstream failed mid-stream: {err}", err.kind))
        if client.write_paused:
            self.client_paused()

    def abort(self) -> None:
        """Drop the upstream request now (client gone, or the handler gave up)."""
        upstream = self.upstream
        if upstream is not None and not self.ended:
            self.upstream = None
            upstream.abort()
