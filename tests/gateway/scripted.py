"""A scripted engine for relay tests: an asyncio server that answers every request with a script.

The script writes raw upstream bytes (heads, chunks, broken framing, stalls, closes), so a test
can put the gateway's relays in front of any upstream behaviour, byte for byte. The building
blocks of a vLLM stream (its head, events, chunked framing) are here too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

CHUNK = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
USAGE = (b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,'
         b'"total_tokens":10}}\n\n')
DONE = b"data: [DONE]\n\n"
STREAM_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
               b"connection: keep-alive\r\n\r\n")

Script = Callable[[asyncio.StreamWriter], Awaitable[None]]


def chunked(*events: bytes, ext: bool = False, trailer: bool = False) -> bytes:
    """``events`` as a complete chunked body (with chunk extensions and a trailer if asked)."""
    out = b"".join(b"%x%b\r\n%b\r\n" % (len(e), b";x=y" if ext else b"", e) for e in events)
    return out + (b"0\r\nx-trailer: 1\r\n\r\n" if trailer else b"0\r\n\r\n")


def one_chunk(event: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(event), event)


@asynccontextmanager
async def scripted_upstream(script: Script) -> AsyncIterator[tuple[list[int], int]]:
    """An engine that answers every request with ``script``; yields the requests per connection
    and the port."""
    per_conn: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = len(per_conn)
        per_conn.append(0)
        try:
            while True:  # until the gateway closes the connection (or the test ends: cancelled)
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"POST "):
                    continue  # the gateway's /metrics scrape: left unanswered (load unknown)
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                per_conn[index] += 1
                await script(writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield per_conn, server.sockets[0].getsockname()[1]
    finally:
        server.close()
