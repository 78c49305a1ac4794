"""A small HTTP/1.1 client for the runner's requests to the gateway: keep-alive, no pooling logic.

Why not httpx (the control plane's usual client): measured on this project's 2-core machine,
httpx sent 50-54 requests/s at 64 concurrent requests to a simulator whose capacity was 327
requests/s (9 ms of client CPU per request and requests queued in its pool), so it, not the
engines, bounded a batch; a plain asyncio connection per request in flight reached the 327.
This client keeps idle connections in a stack and parses answers with httptools (the data
plane's parser). Invariants: a connection is reused only after a complete answer that allows
keep-alive; any error closes it; a reused connection the server had closed before answering
(its keep-alive timeout) is retried once on a fresh one, since the request was never read.
"""

from __future__ import annotations

import asyncio

import httptools


class Http1Error(Exception):
    """No (complete) answer: connect error, reset, timeout, malformed answer."""


class _Answer:
    __slots__ = ("body", "complete", "headers", "parser")

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class Http1Client:
    __slots__ = ("_host_line", "_idle", "connect_timeout", "host", "max_idle", "port")

    def __init__(self, host: str, port: int, *, max_idle: int = 512, connect_timeout: float = 5.0) -> None:
        self.host = host
        self.port = port
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self._host_line = b"host: %b:%d\r\n" % (host.encode(), port)
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, body: bytes, headers: dict[str, str],
                   timeout: float) -> tuple[int, dict[bytes, bytes], bytes]:
        head = b"".join((b"POST %b HTTP/1.1\r\n" % path.encode(), self._host_line,
                         b"content-length: %d\r\n" % len(body),
                         *(b"%b: %b\r\n" % (k.encode(), v.encode()) for k, v in headers.items()), b"\r\n"))
        for _ in range(2):
            reused = bool(self._idle)
            conn = self._idle.pop() if reused else await self._connect()
            try:
                async with asyncio.timeout(timeout):
                    return await self._exchange(conn, head + body)
            except _StaleError:
                if reused:
                    continue  # the server closed it while idle; it never read this request
                raise Http1Error("the server closed the connection before answering") from None
            except (OSError, TimeoutError, httptools.HttpParserError) as exc:
                conn[1].close()
                raise Http1Error(f"{type(exc).__name__}: {exc}") from None
        raise Http1Error("the server closed the connection before answering")

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            async with asyncio.timeout(self.connect_timeout):
                return await asyncio.open_connection(self.host, self.port)
        except (OSError, TimeoutError) as exc:
            raise Http1Error(f"cannot connect to {self.host}:{self.port}: {exc!r}") from None

    async def _exchange(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                        data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        reader, writer = conn
        writer.write(data)
        answer = _Answer()
        first = True
        while not answer.complete:
            chunk = await reader.read(65536)
            if not chunk:
                writer.close()
                if first:
                    raise _StaleError
                raise Http1Error("the server closed the connection mid-answer")
            first = False
            answer.parser.feed_data(chunk)
        if answer.parser.should_keep_alive() and len(self._idle) < self.max_idle:
            self._idle.append(conn)
        else:
            writer.close()
        return answer.parser.get_status_code(), answer.headers, b"".join(answer.body)

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


class _StaleError(Exception):
    pass
