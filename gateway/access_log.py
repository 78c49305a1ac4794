"""The access log: one JSON line per request, buffered like nginx's ``access_log ... buffer=64k``.

Lines have the shape of every other hpcgate log line (``ts``, ``level``, ``logger``, ``event``
= "access", then the fields) but bypass the ``logging`` machinery, which costs more per record
than the rest of a request's bookkeeping. The buffer is written when it passes 64 KiB, once a
second, and at shutdown. Written when ``access_log`` is on, whatever the log level.
"""

from __future__ import annotations

import os
import time
from typing import Any

import orjson

_FLUSH_AT = 64 * 1024
_CONSTANT = b'"level":"info","logger":"hpcgate.gateway.access","event":"access",'


class AccessLog:
    __slots__ = ("_buf", "_fd")

    def __init__(self, fd: int = 2) -> None:
        self._fd = fd
        self._buf = bytearray()

    def access(self, rid: bytes, *, tenant: str, model: str, backend: str | None, status: int,
               ttft_s: float | None, duration_s: float, prompt: int, completion: int,
               error: str | None) -> None:
        """The access line of one request (``rid`` is a safe token: no JSON escaping needed)."""
        buf = self._buf
        buf += b'{"ts":%.6f,%b"request_id":"%b",' % (time.time(), _CONSTANT, rid)
        buf += orjson.dumps({
            "tenant": tenant, "model": model, "backend": backend, "status": status,
            "ttft_ms": None if ttft_s is None else round(ttft_s * 1000, 3),
            "duration_ms": round(duration_s * 1000, 3), "prompt_tokens": prompt,
            "completion_tokens": completion, "error": error,
        })[1:]
        buf += b"\n"
        if len(buf) >= _FLUSH_AT:
            self.flush()

    def write(self, fields: dict[str, Any]) -> None:
        buf = self._buf
        buf += b'{"ts":%.6f,%b' % (time.time(), _CONSTANT)
        buf += orjson.dumps(fields)[1:]  # the fields' object without its "{"
        buf += b"\n"
        if len(buf) >= _FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        buf = self._buf
        view = memoryview(buf)
        done = 0
        try:
            while done < len(buf):
                done += os.write(self._fd, view[done:])
        except OSError:
            pass  # stderr closed: the log is best effort, requests are not
        finally:
            view.release()
            del buf[:]
