"""A TCP proxy a test can cut, after asyncpg's ``TCPFuzzingProxy``: 'PostgreSQL is down'.

Two request faults for an HTTP upstream behind it: ``drop_next`` drops the connection on the
next N requests (a keep-alive connection the engine closed), ``answer_reused`` answers every
request after the first of a connection with those bytes instead of forwarding it (a 5xx
from a reused connection). Requests are told apart by a read starting with ``POST``.
"""

from __future__ import annotations

import asyncio
import contextlib


class CuttableProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.refused = 0
        self.cut_off = False
        self.port = 0
        self.drop_next = 0
        self.dropped = 0
        self.answer_reused: bytes | None = None
        self.answered = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_off:
            self.refused += 1
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        pumps = [asyncio.ensure_future(self._requests(reader, writer, up_writer)),
                 asyncio.ensure_future(self._pump(up_reader, writer))]
        self._tasks.update(pumps)
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pumps:
            task.cancel()
        for w in (writer, up_writer):
            w.close()
            self._writers.discard(w)

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        up_writer: asyncio.StreamWriter) -> None:
        seen = 0
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                if data.startswith(b"POST "):
                    seen += 1
                    if self.drop_next > 0:
                        self.drop_next -= 1
                        self.dropped += 1
                        writer.transport.abort()
                        up_writer.transport.abort()
                        return
                    if self.answer_reused is not None and seen > 1:
                        self.answered += 1
                        writer.write(self.answer_reused)
                        continue
                up_writer.write(data)
                await up_writer.drain()

    def cut(self) -> None:
        """Drop every open connection and refuse new ones."""
        self.cut_off = True
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self.cut_off = False

    async def close(self) -> None:
        self.cut()
        for task in self._tasks:
            task.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
