"""Local socket checks shared by the daemons and ``hpcgate up`` (standard library only)."""

from __future__ import annotations

import socket


def port_is_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound now. Servers that bind with SO_REUSEPORT (granian, the
    gateway's workers) would otherwise silently share a port another process already serves."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
