"""Relaying ``/v1/files`` and ``/v1/batches`` to the control API, both ways as a stream.

The Files and Batch APIs are served by the control API (which owns PostgreSQL and the file
store); clients reach them on the gateway's port with their usual API key. The gateway
authenticates the key from its in-memory table (no database call) and forwards the request
with the tenant's id and the deployment's internal token, which is how the control API knows a
gateway vouched for the tenant. An upload's body is read from the client as it arrives
(:class:`gateway.http_parse.Upload`, reading paused above its high-water mark) and written
upstream with ``drain()``; the answer (a file's content included) is parsed by httptools and
written to the client chunk by chunk with ``drain()``. Neither side is ever buffered whole.

One upstream connection per exchange (``connection: close``): these calls are rare next to
inference and a fresh connection keeps the relay free of pooling state.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httptools

from gateway.errors import ApiError
from gateway.http_parse import Request, Upload
from gateway.http_server import STATUS_LINE, HttpConnection

if TYPE_CHECKING:
    from gateway.auth import Principal
    from gateway.settings import GatewaySettings

_FORWARD_REQUEST = (b"content-type", b"content-length", b"accept", b"x-request-id")
_FORWARD_RESPONSE = frozenset({b"content-type", b"content-disposition", b"retry-after"})
_READ = 256 * 1024
FILES_PATH = b"/v1/files"  # uploads: relayed as they arrive (gateway.http_parse.Upload)
FORM_OVERHEAD = 64 * 1024  # a multipart form's own bytes around the file


class _Response:
    """httptools callbacks: collect the head, then body pieces (taken by the relay after each feed)."""

    __slots__ = ("body", "complete", "head_done", "headers", "parser")

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.body: list[bytes] = []
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class ApiRelay:
    __slots__ = ("host", "port", "timeout", "token")

    def __init__(self, settings: GatewaySettings) -> None:
        parts = urlsplit(settings.batch_api_url or "")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.token = (settings.internal_token or "").encode()
        self.timeout = settings.batch_api_timeout_s

    async def relay(self, req: Request, conn: HttpConnection, principal: Principal) -> None:
        stream = req.upload
        try:
            await self._exchange(req, conn, principal)
        finally:
            if stream is not None and not stream.done:
                conn.keep_alive = False  # the rest of the body is not read: close after this answer

    async def _exchange(self, req: Request, conn: HttpConnection, principal: Principal) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port)
        except (OSError, TimeoutError):
            raise ApiError(
                503, "the batch API is not reachable", "batch_api_unavailable", retry_after=1
            ) from None
        try:
            head = [
                b"%b %b HTTP/1.1\r\nhost: %b:%d\r\nconnection: close\r\n"
                % (req.method, req.path, self.host.encode(), self.port),
                b"x-hpcgate-internal-token: %b\r\nx-hpcgate-tenant-id: %d\r\n"
                % (self.token, principal.tenant_id),
            ]
            chunked = req.upload is not None and b"content-length" not in req.headers
            for name in _FORWARD_REQUEST:
                value = req.headers.get(name)
                if value is not None:
                    head.append(b"%b: %b\r\n" % (name, value))
            if chunked:
                head.append(b"transfer-encoding: chunked\r\n")
            elif req.upload is None and b"content-length" not in req.headers:
                head.append(b"content-length: %d\r\n" % len(req.body))
            head.append(b"\r\n")
            writer.write(b"".join(head))
            if req.upload is None:
                writer.write(req.body)
                await self._answer(reader, conn)
            else:
                # The answer may come before the whole body is sent (413 past a quota, 401): read
                # it while sending, and stop sending when it is complete.
                sender = asyncio.ensure_future(self._send_body(req.upload, writer, chunked))
                try:
                    await self._answer(reader, conn)
                finally:
                    if not sender.done():
                        sender.cancel()
                    elif not sender.cancelled() and sender.exception() is not None:
                        pass  # the upstream stopped reading; its answer (relayed above) says why
        except (OSError, TimeoutError, httptools.HttpParserError) as exc:
            if conn.response_started:
                conn.keep_alive = False
                if conn.transport is not None:
                    conn.transport.abort()
                return
            raise ApiError(502, f"the batch API failed: {exc!r}", "batch_api_error") from None
        finally:
            writer.close()

    async def _send_body(self, stream: Upload, writer: asyncio.StreamWriter, chunked: bool) -> None:
        while chunk := await stream.read():
            writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            async with asyncio.timeout(self.timeout):
                await writer.drain()
        if chunked:
            writer.write(b"0\r\n\r\n")

    async def _answer(self, reader: asyncio.StreamReader, conn: HttpConnection) -> None:
        resp = _Response()
        while not resp.head_done:
            data = await self._read(reader)
            if not data:
                raise OSError("the batch API closed before answering")
            resp.parser.feed_data(data)
        status = resp.parser.get_status_code()
        length: bytes | None = None
        extra = [conn.response_headers]
        ctype = b"application/json"
        for name, value in resp.headers:
            if name == b"content-length":
                length = value
            elif name == b"content-type":
                ctype = value
            elif name in _FORWARD_RESPONSE:
                extra.append(b"%b: %b\r\n" % (name, value))
        framing = (
            b"content-length: %b\r\n" % length if length is not None else b"transfer-encoding: chunked\r\n"
        )
        transport = conn.transport
        if transport is None or conn.closed:
            return
        conn.response_started = True
        transport.write(
            b"".join(
                (
                    STATUS_LINE.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status,
                    b"content-type: ",
                    ctype,
                    b"\r\n",
                    b"" if conn.keep_alive else b"connection: close\r\n",
                    *extra,
                    framing,
                    b"\r\n",
                )
            )
        )
        while True:
            if resp.body:
                data = b"".join(resp.body)
                resp.body.clear()
                transport.write(data if length is not None else b"%x\r\n%b\r\n" % (len(data), data))
                await conn.drain()
            if resp.complete:
                break
            data = await self._read(reader)
            if not data:
                raise OSError("the batch API closed mid-answer")
            resp.parser.feed_data(data)
        if length is None:
            transport.write(b"0\r\n\r\n")

    async def _read(self, reader: asyncio.StreamReader) -> bytes:
        async with asyncio.timeout(self.timeout):
            return await reader.read(_READ)
