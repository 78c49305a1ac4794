"""A lean streaming HTTP/1.1 client for the load driver: asyncio protocol + httptools.

Why not aiohttp or the openai SDK: the driver must run 1000 concurrent streams on one core
and never be the bottleneck. Each connection is one protocol object; response bytes go
through httptools, SSE events are split on ``\\n\\n`` and only the two fields the
measurement needs (``choices`` non-empty, ``usage.completion_tokens``) are decoded with a
msgspec view. Times are ``time.perf_counter()`` read once per ``data_received``.

Measurement follows vLLM's ``endpoint_request_func`` (see stats.py for aggregation):
completions: TTFT at the first message with non-empty ``choices``; each later ``choices``
message appends a gap to ITL; E2EL at the last ``choices`` message; success needs at least
one ``choices`` message. Chat: the role-only first delta counts as the first token, the
usage-only chunk also advances the last timestamp, and any 200 response is a success.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import cast

import httptools
import msgspec

from bench.sim.textgen import count_tokens
from bench.stats import RequestRecord

MAX_EVENT = 1024 * 1024  # an SSE event larger than this is a protocol error


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    text: str | None = None
    delta: _Delta | None = None


class _Usage(msgspec.Struct):
    completion_tokens: int | None = None


class _ChunkView(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None


_decode_chunk = msgspec.json.Decoder(_ChunkView).decode


class ClientError(Exception):
    pass


class _Conn(asyncio.Protocol):
    """One keep-alive connection; at most one request in flight."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._parser = httptools.HttpResponseParser(self)
        self._rec: RequestRecord | None = None
        self._done: asyncio.Future[None] | None = None
        self._buf = b""
        self._status = 0
        self._chat = False
        self._st = 0.0
        self._last = 0.0
        self._text: list[str] = []
        self._usage_tokens: int | None = None
        self._got_choices = False
        self._error_body: list[bytes] = []
        self.keep_alive = True

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"malformed HTTP response: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._done is not None and not self._done.done():
            self._fail("connection closed before the response completed")

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        self.keep_alive = self._parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if self._status != 200:
            if sum(map(len, self._error_body)) < 4096:
                self._error_body.append(body)
            return
        now = time.perf_counter()
        buf = self._buf + body if self._buf else body
        start = 0
        while True:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            self._event(buf[start:end], now)
            start = end + 2
        self._buf = buf[start:]
        if len(self._buf) > MAX_EVENT:
            self._fail("SSE event too large")

    def on_message_complete(self) -> None:
        rec, done = self._rec, self._done
        if rec is None or done is None or done.done():
            return
        if self._status != 200:
            rec.error = f"HTTP {self._status}: {b''.join(self._error_body)[:300].decode(errors='replace')}"
        elif self._chat or self._got_choices:
            rec.success = True
            rec.latency = self._last - self._st
            if self._usage_tokens:
                rec.output_tokens = self._usage_tokens
            else:  # vLLM re-tokenizes the text; the simulator's rule is one token per word
                rec.output_tokens = count_tokens("".join(self._text))
        else:
            rec.error = "no choices in the stream"
        done.set_result(None)

    # SSE
    def _event(self, raw: bytes, now: float) -> None:
        rec = self._rec
        if rec is None:
            return
        for line in raw.split(b"\n"):
            if not line.startswith(b"data:"):
                continue  # comments (":") and other fields
            payload = line[5:].strip()
            if payload == b"[DONE]":
                continue
            try:
                chunk = _decode_chunk(payload)
            except msgspec.DecodeError:
                self._fail("undecodable SSE data")
                return
            if chunk.choices:
                if not self._got_choices:
                    self._got_choices = True
                    rec.ttft = now - self._st
                else:
                    rec.itl.append(now - self._last)
                self._last = now
                for ch in chunk.choices:
                    part = ch.text if ch.delta is None else ch.delta.content
                    if part:
                        self._text.append(part)
            elif chunk.usage is not None:
                self._usage_tokens = chunk.usage.completion_tokens
                if self._chat:
                    self._last = now

    def _fail(self, why: str) -> None:
        if self._rec is not None and not self._rec.error:
            self._rec.error = why
        if self._done is not None and not self._done.done():
            self._done.set_result(None)
        if self.transport is not None:
            self.transport.abort()
        self.closed = True

    # request
    def start(self, request: bytes, rec: RequestRecord, chat: bool, st: float) -> asyncio.Future[None]:
        self._parser = httptools.HttpResponseParser(self)
        self._rec, self._chat, self._st, self._last = rec, chat, st, st
        self._buf, self._status, self._text, self._usage_tokens = b"", 0, [], None
        self._got_choices, self._error_body = False, []
        self._done = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(request)
        return self._done


class StreamClient:
    """POSTs streaming requests to one ``host:port`` over a pool of keep-alive connections."""

    def __init__(self, host: str, port: int, *, api_key: str | None = None,
                 extra_headers: dict[str, str] | None = None) -> None:
        self.host, self.port = host, port
        self._idle: deque[_Conn] = deque()
        headers = {"host": f"{host}:{port}", "content-type": "application/json",
                   "authorization": f"Bearer {api_key}", **(extra_headers or {})}
        self._headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode()
        self._all: set[_Conn] = set()

    async def _acquire(self) -> _Conn:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(_Conn, self.host, self.port)
        self._all.add(proto)
        return proto

    async def post_stream(self, path: str, body: bytes, rec: RequestRecord, *, chat: bool,
                          request_id: str | None = None, timeout: float | None = None) -> None:
        """Send one request and fill ``rec``; never raises for request failures."""
        st = time.perf_counter()
        conn: _Conn | None = None
        try:
            conn = await self._acquire()
            head = b"POST %b HTTP/1.1\r\n%bcontent-length: %d\r\n" % (path.encode(), self._headers, len(body))
            if request_id is not None:
                head += b"x-request-id: %b\r\n" % request_id.encode()
            done = conn.start(head + b"\r\n" + body, rec, chat, st)
            await asyncio.wait_for(done, timeout) if timeout else await done
        except (OSError, TimeoutError) as exc:
            rec.error = rec.error or f"{type(exc).__name__}: {exc}"
            if conn is not None and conn.transport is not None:
                conn.transport.abort()
                conn.closed = True
        finally:
            if conn is not None and not conn.closed and conn.keep_alive and rec.success:
                self._idle.append(conn)
            elif conn is not None and conn.transport is not None and not conn.closed:
                conn.transport.close()

    def close(self) -> None:
        for conn in self._all:
            if conn.transport is not None and not conn.closed:
                conn.transport.close()
        self._all.clear()
        self._idle.clear()
