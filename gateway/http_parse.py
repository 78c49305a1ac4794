"""Sans-IO framing of client HTTP/1.1 requests on top of httptools, with limits.

:class:`RequestFramer` takes bytes and returns complete :class:`Request` objects; it never
touches a socket, so it is unit-tested by feeding bytes. Limits are enforced while parsing, not
after buffering: a header flood is cut at ``max_header_count`` headers or ``max_header_bytes``
(431), a body at ``max_body_bytes`` (413, from Content-Length before any body byte is read, or
while a chunked body arrives). Invariants: the body is joined once from its pieces (never grown
with ``+=``); a :class:`FramingError` leaves the framer unusable (the connection is closed).

Streamed requests: a POST whose path starts with one of ``stream_prefixes`` (file uploads,
relayed to the control API) is handed out when its headers are complete, with its body in a
:class:`BodyStream` that the framer fills as bytes arrive (limit ``stream_max_bytes``); the
connection pauses reading while the stream holds more than its high-water mark, so such a
body is never buffered whole.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

import httptools


class FramingError(Exception):
    """The client's bytes are not an acceptable request; answer ``status`` and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class BodyStream:
    """The body of a streamed request, as it arrives; read with :meth:`read` (b"" at its end)."""

    __slots__ = ("_chunks", "_size", "_waiter", "done", "on_pressure", "received")
    HIGH = 1 << 20  # buffered bytes above which the connection stops reading ...
    LOW = 1 << 18  # ... and below which it reads again

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self.done = False
        self.received = 0
        self.on_pressure: Callable[[bool], None] | None = None  # True: pause reading, False: resume

    def feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._size += len(chunk)
        self.received += len(chunk)
        self._wake()
        if self._size > self.HIGH and self.on_pressure is not None:
            self.on_pressure(True)

    def end(self) -> None:
        self.done = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read(self) -> bytes:
        while not self._chunks:
            if self.done:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunk = self._chunks.popleft()
        self._size -= len(chunk)
        if self._size < self.LOW and self.on_pressure is not None:
            self.on_pressure(False)
        return chunk


class Request:
    __slots__ = ("body", "headers", "keep_alive", "method", "path", "stream")

    def __init__(
        self, method: bytes, path: bytes, headers: dict[bytes, bytes], body: bytes, *, keep_alive: bool,
        stream: BodyStream | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self.headers = headers  # lower-case names; a repeated header keeps its last value
        self.body = body
        self.keep_alive = keep_alive
        self.stream = stream  # set for a streamed request (body is then b"")


class RequestFramer:
    __slots__ = (
        "_body", "_body_size", "_done", "_error", "_header_bytes", "_headers", "_in_message",
        "_max_body", "_max_header_bytes", "_max_headers", "_max_stream", "_parser", "_stream",
        "_stream_prefixes", "_url",
    )

    def __init__(self, max_body_bytes: int, max_header_count: int, max_header_bytes: int, *,
                 stream_prefixes: tuple[bytes, ...] = (), stream_max_bytes: int = 0) -> None:
        self._max_body = max_body_bytes
        self._stream_prefixes = stream_prefixes
        self._max_stream = stream_max_bytes
        self._stream: BodyStream | None = None
        self._max_headers = max_header_count
        self._max_header_bytes = max_header_bytes
        self._parser = httptools.HttpRequestParser(self)
        self._done: list[Request] = []
        self._error: FramingError | None = None
        self._in_message = False
        self._reset()

    def _reset(self) -> None:
        self._url: list[bytes] = []
        self._headers: dict[bytes, bytes] = {}
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_size = 0

    @property
    def in_message(self) -> bool:
        """True between the first byte of a request and its last (the read timeout runs then)."""
        return self._in_message

    def feed(self, data: bytes) -> list[Request]:
        """Parse ``data``; return the requests it completed. Raises FramingError."""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise FramingError(400, "protocol upgrades are not supported") from None
        except httptools.HttpParserError as exc:
            if self._error is not None:
                raise self._error from None
            raise FramingError(400, f"malformed HTTP request: {exc}") from None
        if self._done:
            done, self._done = self._done, []
            return done
        return []

    # httptools callbacks: they only collect and check limits.
    def on_message_begin(self) -> None:
        self._in_message = True
        self._reset()

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._header_bytes += len(url)
        if self._header_bytes > self._max_header_bytes:
            self._fail(414, "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if len(self._headers) >= self._max_headers:
            self._fail(431, f"too many request headers (limit {self._max_headers})")
        if self._header_bytes > self._max_header_bytes:
            self._fail(431, f"request headers too large (limit {self._max_header_bytes} bytes)")
        self._headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        length = self._headers.get(b"content-length")
        limit = self._max_body
        path = self._url[0] if len(self._url) == 1 else b"".join(self._url)
        streamed = bool(self._stream_prefixes) and path.startswith(self._stream_prefixes) \
            and self._parser.get_method() == b"POST"
        if streamed:
            limit = self._max_stream
        if length is not None and length.isdigit() and int(length) > limit:
            self._fail(413, f"request body too large (limit {limit} bytes)")
        if streamed:
            self._stream = BodyStream()
            self._done.append(Request(b"POST", path, self._headers, b"",
                                      keep_alive=self._parser.should_keep_alive(), stream=self._stream))

    def on_body(self, body: bytes) -> None:
        stream = self._stream
        if stream is not None:
            if stream.received + len(body) > self._max_stream:
                self._fail(413, f"request body too large (limit {self._max_stream} bytes)")
            stream.feed(body)
            return
        self._body_size += len(body)
        if self._body_size > self._max_body:
            self._fail(413, f"request body too large (limit {self._max_body} bytes)")
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._stream is not None:
            self._stream.end()
            self._stream = None
            self._in_message = False
            self._reset()
            return
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        path = self._url[0] if len(self._url) == 1 else b"".join(self._url)
        self._done.append(
            Request(self._parser.get_method(), path, self._headers, body,
                    keep_alive=self._parser.should_keep_alive())
        )
        self._in_message = False
        self._reset()

    def _fail(self, status: int, message: str) -> None:
        self._error = FramingError(status, message)
        raise self._error
