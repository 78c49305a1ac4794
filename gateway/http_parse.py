"""Sans-IO framing of client HTTP/1.1 requests on top of httptools, with limits.

:class:`RequestFramer` takes bytes and returns complete :class:`Request` objects; it never
touches a socket, so it is unit-tested by feeding bytes. Limits are enforced while parsing, not
after buffering: a header flood is cut at ``max_header_count`` headers or ``max_header_bytes``
(431), a body at ``max_body_bytes`` (413, from Content-Length before any body byte is read, or
while a chunked body arrives). Invariants: the body is joined once from its pieces (never grown
with ``+=``); a :class:`FramingError` leaves the framer unusable (the connection is closed).

Uploads (``upload_paths``, the multipart audio endpoints) are not buffered: their request is
handed out as soon as its head is complete, with an empty ``body`` and an :class:`Upload` that
receives the body's pieces as they arrive (limit ``max_upload_bytes``); the connection reads
from it, pausing the client while it holds more than :data:`Upload.HIGH` bytes.
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


class Upload:
    """The body of an upload, piece by piece as it arrives: bounded, with backpressure.

    The framer feeds it; one reader awaits :meth:`read`. Past :data:`HIGH` bytes held the
    ``pause`` callback stops reading the client; below :data:`LOW` ``resume`` starts it again.
    :meth:`discard` (the reader gave up) drops what comes and lets the client go on sending.
    """

    HIGH = 256 * 1024
    LOW = 64 * 1024

    __slots__ = ("_error", "_held", "_pieces", "_waiter", "discarding", "done", "pause", "paused", "received",
                 "resume")

    def __init__(self) -> None:
        self._pieces: deque[bytes] = deque()
        self._held = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self.received = 0
        self.done = False  # the whole body has arrived
        self.discarding = False
        self.paused = False
        self.pause: Callable[[], None] | None = None  # set by the connection
        self.resume: Callable[[], None] | None = None

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        if self.discarding:
            return
        self._pieces.append(data)
        self._held += len(data)
        if self._held > self.HIGH:
            self._pause()
        self._wake()

    def finish(self) -> None:
        self.done = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        """The client went away: the reader gets ``exc``."""
        self._error = exc
        self._wake()

    def check_pause(self) -> None:
        """Called once the callbacks are set (the first pieces may have come with the head)."""
        if self._held > self.HIGH:
            self._pause()

    async def read(self) -> bytes:
        """The pieces held now, joined; b"" at the end of the body."""
        while not self._pieces:
            if self._error is not None:
                raise self._error
            if self.done:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        pieces = self._pieces
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        self._held = 0
        if self.paused:
            self.paused = False
            if self.resume is not None:
                self.resume()
        return data

    def discard(self) -> None:
        self.discarding = True
        self._pieces.clear()
        self._held = 0
        if self.paused:
            self.paused = False
            if self.resume is not None:
                self.resume()

    def _pause(self) -> None:
        if not self.paused and self.pause is not None:
            self.paused = True
            self.pause()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)


class Request:
    __slots__ = ("body", "headers", "keep_alive", "method", "path", "upload")

    def __init__(
        self, method: bytes, path: bytes, headers: dict[bytes, bytes], body: bytes, *, keep_alive: bool,
        upload: Upload | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self.headers = headers  # lower-case names; a repeated header keeps its last value
        self.body = body
        self.keep_alive = keep_alive
        self.upload = upload  # an upload's body, arriving (then ``body`` is empty)


class RequestFramer:
    __slots__ = (
        "_body", "_body_size", "_done", "_error", "_header_bytes", "_headers", "_in_message",
        "_max_body", "_max_header_bytes", "_max_headers", "_max_upload", "_parser", "_upload",
        "_upload_paths", "_url",
    )

    def __init__(self, max_body_bytes: int, max_header_count: int, max_header_bytes: int, *,
                 upload_paths: frozenset[bytes] = frozenset(), max_upload_bytes: int = 0) -> None:
        self._max_body = max_body_bytes
        self._max_headers = max_header_count
        self._max_header_bytes = max_header_bytes
        self._upload_paths = upload_paths
        self._max_upload = max_upload_bytes
        self._upload: Upload | None = None
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

    @property
    def uploading(self) -> bool:
        """An upload's body is arriving (its request is already handed out)."""
        return self._upload is not None

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
        limit = self._max_body
        uploads = self._upload_paths
        if uploads:
            path = self._url[0] if len(self._url) == 1 else b"".join(self._url)
            if (path in uploads or (b"?" in path and path.partition(b"?")[0] in uploads)) and \
                    self._parser.get_method() == b"POST":
                limit = self._max_upload
                self._upload = Upload()
                self._done.append(Request(b"POST", path, self._headers, b"",
                                          keep_alive=self._parser.should_keep_alive(), upload=self._upload))
        length = self._headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            self._fail(413, f"request body too large (limit {limit} bytes)")

    def on_body(self, body: bytes) -> None:
        upload = self._upload
        if upload is not None:
            if upload.received + len(body) > self._max_upload:
                self._fail(413, f"request body too large (limit {self._max_upload} bytes)")
            upload.feed(body)
            return
        self._body_size += len(body)
        if self._body_size > self._max_body:
            self._fail(413, f"request body too large (limit {self._max_body} bytes)")
        self._body.append(body)

    def on_message_complete(self) -> None:
        upload = self._upload
        if upload is not None:  # its request went out with the head
            self._upload = None
            upload.finish()
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
