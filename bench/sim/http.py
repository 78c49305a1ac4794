"""One asyncio protocol object per HTTP/1.1 connection, parsed by httptools.

Parser callbacks only collect the request; when a message is complete it is handed to the
application's ``dispatch(request, connection)``, which is synchronous: it either answers at
once or registers the connection with the engine, whose loop later writes chunks straight to
the transport. No task per request, no timer per token.

Per connection, one request is served at a time; a pipelined request that arrives meanwhile
is kept (at most :data:`MAX_PIPELINED`) and dispatched when the current response completes.
When the peer goes away, the active request's ``on_disconnect`` runs at once (the simulator
aborts the sequence and frees its slot, as vLLM does).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import cast

import httptools

MAX_BODY = 32 * 1024 * 1024
MAX_PIPELINED = 16
# A client that stops reading while we keep streaming is cut off past this buffered size.
MAX_WRITE_BUFFER = 16 * 1024 * 1024

STATUS_LINE = {s.value: b"HTTP/1.1 %d %b\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}

_date = [0, b""]


def date_header() -> bytes:
    """``date: ...\\r\\n``, rebuilt at most once a second."""
    now = int(time.time())
    if now != _date[0]:
        _date[0], _date[1] = now, b"date: %b\r\n" % formatdate(now, usegmt=True).encode()
    return _date[1]  # type: ignore[return-value]


class Request:
    __slots__ = ("authorization", "body", "content_type", "keep_alive", "method", "path", "request_id")

    def __init__(self) -> None:
        self.method = ""
        self.path = ""
        self.authorization: bytes | None = None
        self.content_type: bytes | None = None
        self.request_id: bytes | None = None
        self.body: list[bytes] = []
        self.keep_alive = True


class Connection(asyncio.Protocol):
    """Owns the transport of one client connection."""

    __slots__ = ("__weakref__", "_body_size", "_dispatch", "_parser", "_pending", "_req", "active", "closed",
                 "on_disconnect", "transport")

    def __init__(self, dispatch: Callable[[Request, Connection], None]) -> None:
        self._dispatch = dispatch
        self._parser = httptools.HttpRequestParser(self)
        self._req = Request()
        self._body_size = 0
        self._pending: deque[Request] = deque()
        self.transport: asyncio.Transport | None = None
        self.active: Request | None = None        # request whose response is in progress
        self.on_disconnect: Callable[[], None] | None = None  # set by streaming handlers
        self.closed = False

    # --- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.send_simple(400, b"upgrades are not supported", close=True)
        except httptools.HttpParserError:
            self.send_simple(400, b"malformed HTTP request", close=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        callback, self.on_disconnect = self.on_disconnect, None
        if callback is not None:
            callback()

    def pause_writing(self) -> None:
        # The engine cannot slow down for one client (nor can vLLM); bound what we buffer.
        if self.transport is not None and self.transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            self.transport.abort()

    def resume_writing(self) -> None:
        pass

    # --- httptools callbacks -------------------------------------------------------------
    def on_url(self, url: bytes) -> None:
        self._req.path += url.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname == b"authorization":
            self._req.authorization = value
        elif lname == b"x-request-id":
            self._req.request_id = value
        elif lname == b"content-type":
            self._req.content_type = value

    def on_headers_complete(self) -> None:
        self._req.method = self._parser.get_method().decode()
        self._req.keep_alive = self._parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if self.closed:
            return
        self._body_size += len(body)
        if self._body_size > MAX_BODY:
            self.send_simple(413, b"request body too large", close=True)
            return
        self._req.body.append(body)

    def on_message_complete(self) -> None:
        req, self._req, self._body_size = self._req, Request(), 0
        if self.closed:
            return
        if self.active is not None:
            if len(self._pending) >= MAX_PIPELINED:
                self.send_simple(429, b"too many pipelined requests", close=True)
                return
            self._pending.append(req)
            return
        self.active = req
        self._dispatch(req, self)

    # --- responses -----------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def send(self, status: int, content_type: bytes, body: bytes, close: bool = False) -> None:
        """A complete response with a body; then the next request (or close)."""
        keep = not close and self.active is not None and self.active.keep_alive
        head = b"%b%bserver: hpcgate-sim\r\ncontent-type: %b\r\ncontent-length: %d\r\n%b\r\n" % (
            STATUS_LINE[status], date_header(), content_type, len(body),
            b"" if keep else b"connection: close\r\n")
        self.write(head + body)
        self.finish(close=not keep)

    def send_simple(self, status: int, message: bytes, close: bool = False) -> None:
        self.send(status, b"text/plain; charset=utf-8", message, close=close)

    def start_stream(self) -> None:
        """Headers of a chunked ``text/event-stream`` response."""
        self.write(b"%b%bserver: hpcgate-sim\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                   b"transfer-encoding: chunked\r\n\r\n" % (STATUS_LINE[200], date_header()))

    def drop(self) -> None:
        """Close the connection mid-response, as a dying engine does (the fault mode)."""
        self.on_disconnect = None
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def finish(self, close: bool = False) -> None:
        """The current response is complete: serve a pipelined request, or close."""
        self.on_disconnect = None
        active, self.active = self.active, None
        if close or (active is not None and not active.keep_alive):
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            return
        if self._pending and not self.closed:
            self.active = self._pending.popleft()
            self._dispatch(self.active, self)
