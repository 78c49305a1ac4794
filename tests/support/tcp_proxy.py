"""A cuttable TCP proxy for outage tests, after asyncpg's ``TCPFuzzingProxy``.

Put it between a daemon and a shared server (PostgreSQL, Redis) that other test runs use too,
then simulate that server restarting without touching it:

    async with TcpProxy("127.0.0.1", 5432) as proxy:    # listens on 127.0.0.1:proxy.port
        ...                                            # daemon uses proxy.port
        await proxy.cut()        # drop every connection and refuse new ones (connection refused)
        await proxy.restore()    # accept again, on the same port

Invariants: the listening port stays the same across cut/restore (while cut, a bound socket that
does not listen holds it: connections are refused, and no other test can be handed the port);
after ``cut()`` returns, no
byte flows through any connection opened before it; ``connections`` counts live client
connections. Runs on the test's event loop, so never block that loop while traffic must flow.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from types import TracebackType


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = 0
        self._server: asyncio.Server | None = None
        self._held: socket.socket | None = None  # the port while cut: bound, not listening
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.accepted = 0

    @property
    def connections(self) -> int:
        return len(self._pipes)

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        return sock

    async def start(self) -> None:
        sock, self._held = (self._held or self._bind()), None
        self._server = await asyncio.start_server(self._handle, sock=sock)

    async def cut(self) -> None:
        """Refuse new connections and reset every open one."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            self._held = self._bind()
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def restore(self) -> None:
        if self._server is None:
            await self.start()

    async def close(self) -> None:
        await self.cut()
        if self._held is not None:
            self._held.close()
            self._held = None

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.transport.abort()
            return
        self._writers.update((client_w, up_w))
        task = asyncio.current_task()
        assert task is not None
        self._pipes.add(task)
        try:
            await asyncio.gather(self._pipe(client_r, up_w), self._pipe(up_r, client_w))
        except asyncio.CancelledError:
            pass
        finally:
            self._pipes.discard(task)
            for w in (client_w, up_w):
                self._writers.discard(w)
                w.transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.write_eof()
