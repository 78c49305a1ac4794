"""Socket set-up shared by the client and upstream protocols."""

from __future__ import annotations

import asyncio
import contextlib
import socket


def nodelay_fd(transport: asyncio.BaseTransport) -> int:
    """Set TCP_NODELAY on the transport's socket and return its descriptor (-1 if none).

    Why NODELAY: small SSE chunks must leave at once; Nagle would hold them for the ACK. The
    descriptor is what the C relay (gateway.offload) reads and writes.
    """
    sock = transport.get_extra_info("socket")
    if sock is None:
        return -1
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    fd: int = sock.fileno()
    return fd
