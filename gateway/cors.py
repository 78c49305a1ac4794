"""CORS for browser clients: which origins may call the API, and the headers that say so.

Off unless ``cors_allowed_origins`` is set. Built once from the settings; per request it is one
set lookup of the ``Origin`` header and prebuilt header lines, no allocation for a request
without ``Origin``. A preflight (``OPTIONS`` with ``Access-Control-Request-Method``) from an
allowed origin is answered 204 with the methods and headers the API accepts; a request from an
origin not allowed gets no CORS header, so the browser refuses it (the gateway itself does not:
CORS protects the browser's user, not the server).
"""

from __future__ import annotations

import re

_METHODS = b"GET, POST, OPTIONS"
_DEFAULT_HEADERS = b"authorization, content-type, x-request-id"
_HEADER_LIST = re.compile(rb"^[A-Za-z0-9-]+(?:\s*,\s*[A-Za-z0-9-]+)*$")
_MAX_AGE_S = 600


class Cors:
    __slots__ = ("_any", "_origins")

    def __init__(self, origins: tuple[str, ...]) -> None:
        self._any = "*" in origins
        self._origins = frozenset(o.encode() for o in origins if o != "*")

    def allows(self, origin: bytes) -> bool:
        return self._any or origin in self._origins

    @staticmethod
    def response_headers(origin: bytes) -> bytes:
        """Header lines for a response to an allowed origin (its own value: credentials work)."""
        return (b"access-control-allow-origin: %b\r\nvary: origin\r\n"
                b"access-control-expose-headers: x-request-id, retry-after\r\n" % origin)

    @staticmethod
    def preflight_headers(requested: bytes | None) -> bytes:
        """Header lines of the 204 answer to a preflight; ``requested``: its
        ``Access-Control-Request-Headers`` (echoed when it is a plain list of names)."""
        allowed = requested if requested and _HEADER_LIST.match(requested) else _DEFAULT_HEADERS
        return (b"access-control-allow-methods: %b\r\naccess-control-allow-headers: %b\r\n"
                b"access-control-max-age: %d\r\n" % (_METHODS, allowed, _MAX_AGE_S))
