"""One upstream exchange: receives the pushed response and relays it to the client.

:class:`Exchange` is both the upstream connection's :class:`ResponseSink` and the client
connection's :class:`WriteListener`. Its life is one :class:`Phase` at a time; every transition
is a method here, and in each phase one party owns the response head and each socket:

============  ====================================  ==============================  ===============
phase         meaning                               the client's response head      both sockets
============  ====================================  ==============================  ===============
SENT          request written, nothing back yet     not made                        the event loop
BUFFERING     a head not streamed (non-200, or not  not made (the handler answers)  the event loop
              a stream): the body is collected
HELD          a 200 stream; nothing written yet     the exchange, unwritten         the event loop
STREAMING     the head is out; the loop relays      written                         the event loop
OFFLOADED     the C relay thread relays             the relay (written with the     the relay
                                                    first data)
DONE          the answer ended and was written or   written (streams)               the event loop
              buffered
FAILED        the upstream failed                   ``client_saw``: written or not  the event loop
CLIENT_GONE   the client left; upstream aborted     -                               the event loop
============  ====================================  ==============================  ===============

SENT → BUFFERING | HELD | FAILED | CLIENT_GONE; BUFFERING → DONE | FAILED | CLIENT_GONE;
HELD → STREAMING | OFFLOADED | DONE | FAILED | CLIENT_GONE; STREAMING → DONE | FAILED |
CLIENT_GONE; OFFLOADED → DONE | FAILED | CLIENT_GONE (only through :meth:`offload_finished`,
which also hands the head back when the relay did not write it). DONE, FAILED and CLIENT_GONE
are final and tell the owner once.

A failure in HELD (the engine died, stalled or broke its framing after its head but before its
first token, the usual way an engine fails) reaches the client as nothing at all: the owner
retries it on another instance, exactly like a connect error, or answers with an error status
(:attr:`Exchange.retryable`). After the head is out, a failure ends the stream with an SSE error
event and a proper last chunk: the client never hangs and never gets a broken response.

Relaying: each upstream read of a stream leaves as one HTTP chunk in one write, from the
protocol callback, with no task switch; the held head leaves with the first chunk. A full
client transport pauses reading upstream, so the kernel's socket buffers push back on the
engine. A client that goes away aborts the upstream connection at once (the engine frees the
slot). A stream whose head came whole in one upstream read usually goes to the C relay thread
(:mod:`gateway.offload`) in HELD and comes back through :meth:`Exchange.offload_finished`.

The handler learns of progress in one of two ways: an :class:`ExchangeOwner` is called from the
callbacks (the task-free common path: ``exchange_head`` on entering BUFFERING, ``exchange_done``
once on reaching a final phase), or, without an owner, a task awaits :meth:`wait_head` /
:meth:`wait_done` (futures made only then).
"""

from __future__ import annotations

import asyncio
import enum
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


class Phase(enum.Enum):
    SENT = "sent"
    BUFFERING = "buffering"
    HELD = "held"
    STREAMING = "streaming"
    OFFLOADED = "offloaded"
    DONE = "done"
    FAILED = "failed"
    CLIENT_GONE = "client_gone"


# Module constants: the hot path compares identities without an attribute lookup on the enum.
SENT, BUFFERING, HELD, STREAMING, OFFLOADED, DONE, FAILED, CLIENT_GONE = Phase
FINAL = frozenset({DONE, FAILED, CLIENT_GONE})
_NEXT: dict[Phase, frozenset[Phase]] = {
    SENT: frozenset({BUFFERING, HELD, FAILED, CLIENT_GONE}),
    BUFFERING: frozenset({DONE, FAILED, CLIENT_GONE}),
    HELD: frozenset({STREAMING, OFFLOADED, DONE, FAILED, CLIENT_GONE}),
    STREAMING: frozenset({DONE, FAILED, CLIENT_GONE}),
    OFFLOADED: frozenset({DONE, FAILED, CLIENT_GONE}),
    DONE: frozenset(), FAILED: frozenset(), CLIENT_GONE: frozenset(),
}

# The relay's upstream failure outcomes, worded as the event-loop path words them.
_RELAY_FAILURES = {"closed": "upstream closed the connection", "timeout": "upstream read timed out",
                   "protocol": "malformed upstream response", "internal": "the stream relay failed"}
_CLIENT_CUT = frozenset({"client_gone", "client_timeout", "cancelled"})
_LAST_CHUNK = b"0\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


class ExchangeOwner(Protocol):
    def exchange_head(self, exchange: Exchange) -> None: ...  # entered BUFFERING
    def exchange_done(self, exchange: Exchange) -> None: ...  # reached a final phase; once


class Exchange:
    __slots__ = (
        "_buffer", "_done", "_head", "_limit", "_loop", "_size", "client", "client_saw", "error",
        "first_byte_at", "headers", "offloader", "owner", "phase", "scanner", "status", "stream", "upstream",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, client: HttpConnection,
                 scanner: SseScanner | None, limit: int, stream: bool = False, *,
                 owner: ExchangeOwner | None = None, offloader: Offloader | None = None) -> None:
        """``stream``: a 200 answer is to be streamed (then ``scanner`` is given too);
        ``offloader``: the C relay thread that may take it over."""
        self._loop = loop
        self.client = client
        self.scanner = scanner
        self.owner = owner
        self._limit = limit
        self._buffer: list[bytes] = []
        self._size = 0
        self._head: asyncio.Future[None] | None = None  # made by wait_head, if a task waits
        self._done: asyncio.Future[None] | None = None
        self.phase = SENT
        self.upstream: UpstreamConnection | None = None
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.client_saw = False  # some byte of this exchange's response was written to the client
        self.error: UpstreamError | None = None
        self.first_byte_at = 0.0
        self.stream = stream
        self.offloader = offloader

    @property
    def streamed(self) -> bool:
        """A 200 stream: the head was committed (HELD was entered)."""
        return self.stream and self.status == 200

    @property
    def retryable(self) -> bool:
        """Failed before the client saw anything, in a way another instance may not repeat."""
        err = self.error
        return (self.phase is FAILED and not self.client_saw and err is not None and err.kind != "too_large"
                and self.status in (0, 200))

    def _move(self, new: Phase) -> None:
        assert new in _NEXT[self.phase], f"exchange: {self.phase.value} -> {new.value}"
        self.phase = new

    # -- ResponseSink (called from the upstream protocol) -----------------------------------------
    def on_head(self, status: int, headers: dict[bytes, bytes]) -> None:
        if self.phase is not SENT:
            return
        self.status = status
        self.headers = headers
        if status == 200 and self.stream:
            # Committed right here: the first token leaves in the loop iteration that received it,
            # and the handler's next wake-up is the end of the stream.
            self._move(HELD)
            return
        self._move(BUFFERING)
        owner = self.owner
        if owner is not None:
            owner.exchange_head(self)
        elif self._head is not None and not self._head.done():
            self._head.set_result(None)

    def on_data(self, data: bytes) -> None:
        phase = self.phase
        if phase is STREAMING:  # the hot path: once per upstream read of a stream
            data = self.scanner.feed(data)  # type: ignore[union-attr]
            if data:
                client = self.client
                if not client.closed:
                    client.transport.write(b"%x\r\n%b\r\n" % (len(data), data))  # type: ignore[union-attr]
        elif phase is HELD:
            data = self.scanner.feed(data)  # type: ignore[union-attr]
            if data:  # the first byte for the client: the held head leaves with it
                self._move(STREAMING)
                self._write(self._client_head() + _chunk(data), head=True)
        elif phase is BUFFERING:
            self._size += len(data)
            if self._size > self._limit:
                upstream = self.upstream
                if upstream is not None:
                    self.upstream = None
                    upstream.abort()
                self.on_error(UpstreamError("too_large", "upstream response too large", False))
                return
            self._buffer.append(data)

    def take_over(self, body: bytes) -> bool:
        """The upstream head and ``body`` (the raw rest of that read) arrived together: hand the
        rest of a held stream to the C relay. False: the event loop relays it."""
        off = self.offloader
        scanner = self.scanner
        if (off is None or self.phase is not HELD or self.upstream is None or self.client.closed
                or scanner is None or not scanner.pristine):
            return False
        if not off.start(self, self.upstream, self._client_head(), body, strip_usage=scanner.strip_usage):
            return False
        self.client.response_started = True  # the relay writes the head with the first data
        self._move(OFFLOADED)
        return True

    def offload_finished(self, result: RelayResult) -> None:
        """The relay gave the stream back (see gateway/offload.py for the outcomes)."""
        _, outcome, pending, usage, events, first_byte, reusable, head_sent = result
        up, self.upstream = self.upstream, None
        if self.phase is not OFFLOADED:  # the client was cut meanwhile (shutdown): nothing to finish
            if up is not None:
                up.offload_finished(False)
            return
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
        self.client_saw = head_sent
        client = self.client
        if outcome in _CLIENT_CUT:
            if up is not None:
                up.offload_finished(False)
            self._cut_client()
            return
        if up is not None:
            up.offload_finished(reusable)
        if client.transport is not None:
            client.transport.resume_reading()
        if outcome == "done":
            self._settle(DONE)
            return
        err = UpstreamError(outcome, _RELAY_FAILURES.get(outcome, "relay failed"), False)
        if not head_sent:  # nothing reached the client: the head is ours again, unwritten
            client.response_started = False
            self._fail(err)
        else:  # what the client has not taken yet, then the error event
            if pending:
                self._write(pending)
            self._fail(err)

    def on_end(self, last: bytes) -> None:
        phase = self.phase
        if phase is STREAMING or phase is HELD:
            scanner = self.scanner
            assert scanner is not None
            last = scanner.feed(last) + scanner.flush() if last else scanner.flush()
            out = _chunk(last) + _LAST_CHUNK if last else _LAST_CHUNK
            if phase is HELD:
                self._write(self._client_head() + out, head=True)
            else:
                self._write(out)
        elif phase is BUFFERING:
            if last:
                self._buffer.append(last)
        else:
            return
        self._settle(DONE)

    def on_error(self, exc: UpstreamError) -> None:
        if self.phase is not OFFLOADED:  # the relay reports its own failures
            self._fail(exc)

    def _fail(self, exc: UpstreamError) -> None:
        if self.phase in FINAL:
            return
        self.error = exc
        if self.client_saw:  # the head is out: end the stream properly, with the reason
            self._write(_chunk(sse_error_event(f"upstream failed mid-stream: {exc}", exc.kind)) + _LAST_CHUNK)
        self._settle(FAILED)

    def _settle(self, final: Phase) -> None:
        self._move(final)
        owner = self.owner
        if owner is not None:
            self.owner = None
            owner.exchange_done(self)
            return
        if self._head is not None and not self._head.done():
            self._head.set_result(None)
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    # -- writing to the client ---------------------------------------------------------------------
    def _client_head(self) -> bytes:
        """The stream's response head (made when it is about to leave, or to go to the relay)."""
        ctype = self.headers.get(b"content-type", b"text/event-stream")
        return self.client.chunked_head(self.status, ctype)

    def _write(self, data: bytes, head: bool = False) -> None:
        client = self.client
        if head:
            self.client_saw = client.response_started = True
        if not self.first_byte_at:
            self.first_byte_at = perf_counter()
        if not client.closed and client.transport is not None:
            client.transport.write(data)

    def _cut_client(self) -> None:
        """The client is cut; its connection_lost tells this exchange (client_lost)."""
        client = self.client
        client.keep_alive = False
        if client.transport is not None and not client.closed:
            client.transport.abort()
        else:
            self.client_lost()

    # -- WriteListener (called from the client protocol) ----------------------------------------
    def client_paused(self) -> None:
        if self.upstream is not None and self.phase is not OFFLOADED:
            self.upstream.pause_reading()

    def client_resumed(self) -> None:
        if self.upstream is not None and self.phase is not OFFLOADED:
            self.upstream.resume_reading()

    def client_lost(self) -> None:
        if self.phase in FINAL:
            return
        self.abort()
        self._settle(CLIENT_GONE)

    # -- used by the handler ----------------------------------------------------------------------
    async def wait_head(self) -> None:
        """Until a head not streamed (BUFFERING) or the end: a stream is awaited to its end."""
        if self.phase is not BUFFERING and self.phase not in FINAL:
            if self._head is None:
                self._head = self._loop.create_future()
            await self._head

    async def wait_done(self) -> None:
        if self.phase not in FINAL:
            if self._done is None:
                self._done = self._loop.create_future()
            await self._done

    @property
    def body(self) -> bytes:
        return b"".join(self._buffer)

    def abort(self) -> None:
        """Drop the upstream request now (client gone, or the handler gave up). While the relay
        holds the stream its sockets are not ours: it gives the connection back when it ends."""
        upstream = self.upstream
        if upstream is not None and self.phase is not DONE and self.phase is not OFFLOADED:
            self.upstream = None
            upstream.abort()
