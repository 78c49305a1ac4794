"""Committed streams relayed by a C thread (:mod:`gateway._crelay`), off the event loop.

Why: at a paced engine every token of a stream is its own upstream read, and through uvloop
each read costs a loop event, a ``bytes`` object and a Python call, about 9 us more per token
than nginx (docs/benchmarks.md, "Gateway overhead"). Once a 200 stream is committed nothing of
its rest needs Python: the :class:`Offloader` hands both sockets to a C thread with its own
epoll set, which de-chunks, scans for the usage event (the rules of :mod:`gateway.sse`),
re-chunks and writes, one client write per upstream read, with backpressure, per-read and
client-send timeouts, and gives the stream back when it ends. Everything before the commit
(auth, routing, retries, non-streaming answers) and after it (bookkeeping, errors to the
client, the connection's next request) stays in Python.

Invariants: a stream is handed over in the exchange's HELD phase (nothing written to the client
yet) with the client's response head, which the relay writes with the first data. While a
stream is offloaded both transports have reading paused and empty write buffers, and Python
neither writes to, reads from nor closes either socket; the relay never closes a socket. Each
offloaded exchange gets exactly one :meth:`Exchange.offload_finished` call, from
:meth:`Offloader._collect` on the loop thread; it says whether the head was written, so a
stream that failed before its first byte can still be retried or answered with an error.
Shutdown cancels the streams still in flight (:meth:`Offloader.cancel_all`) before any
transport is aborted.

Without the compiled extension, or with ``HPCGATE_GATEWAY_STREAM_OFFLOAD=false``, streams are
relayed by the event loop (:mod:`gateway.relay`), with the same behaviour.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from hpcgate.logs import get_logger

if TYPE_CHECKING:
    from gateway.relay import Exchange
    from gateway.upstream_client import UpstreamConnection

log = get_logger("hpcgate.gateway.offload")


class Offloader:
    """One relay thread per worker; started with the worker, closed when it stops."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float, send_timeout: float) -> None:
        from gateway import _crelay

        self._loop = loop
        self._crelay = _crelay
        self._relay = _crelay.Relay(read_timeout, send_timeout)
        self._fd = self._relay.fileno()
        self._syscall_errors = _crelay.syscall_errors()[0]
        self.active = 0  # streams handed over and not yet given back
        self.started = 0  # streams handed over since start (the tests read it)
        loop.add_reader(self._fd, self._collect)

    def start(self, ex: Exchange, up: UpstreamConnection, head: bytes, body: bytes, *,
              strip_usage: bool) -> bool:
        """Hand the rest of ``ex``'s stream to the relay: ``head``, the client's response head
        (written with the first data), ``body``, the upstream body bytes read with the upstream
        head (raw, still chunked). False: not taken, nothing was written, the loop relays it."""
        client = ex.client
        ct, ut = client.transport, up.transport
        if ct is None or ut is None or client.fd < 0 or up.fd < 0 or ct.get_write_buffer_size():
            return False
        ct.pause_reading()
        ut.pause_reading()
        try:
            self._relay.start(client.fd, up.fd, head, body, strip_usage, ex)
        except (OSError, ValueError, RuntimeError, MemoryError) as exc:
            log.warning("offload_failed", error=str(exc))
            ct.resume_reading()
            ut.resume_reading()
            return False
        self.active += 1
        self.started += 1
        return True

    def _collect(self) -> None:
        for result in self._relay.collect():
            self.active -= 1
            ex = result[0]
            try:
                ex.offload_finished(result)
            except Exception:  # one stream's failure must not strand the others of the batch
                log.exception("offload_finish_failed")
                transport = ex.client.transport
                if transport is not None:
                    transport.abort()  # the client is cut; its connection_lost settles the exchange
        errors, call, errno = self._crelay.syscall_errors()
        if errors != self._syscall_errors:
            self._syscall_errors = errors
            log.error("relay_syscall_failed", call=call, errno=errno, total=errors)

    def cancel_all(self) -> None:
        """End every stream in flight (shutdown past its deadline); each is given back."""
        self._relay.cancel_all()

    async def drain(self, timeout: float = 2.0) -> None:
        """Shutdown: cancel what is still in flight and wait until it has been given back."""
        if self.active:
            self.cancel_all()
            deadline = self._loop.time() + timeout
            while self.active and self._loop.time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # shutdown only; the relay answers within a loop turn

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
        self._relay.close()
        self._collect()  # streams cancelled by close() are given back now


def make_offloader(loop: asyncio.AbstractEventLoop, enabled: bool, read_timeout: float,
                   send_timeout: float) -> Offloader | None:
    if not enabled:
        return None
    try:
        return Offloader(loop, read_timeout, send_timeout)
    except (ImportError, OSError, RuntimeError, MemoryError) as exc:
        # Not built, or no thread / descriptors to be had: the event loop relays every stream.
        log.warning("stream_offload_unavailable", error=str(exc))
        return None
