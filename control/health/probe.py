"""One ``GET /health`` probe of an endpoint, over a fresh connection, with one deadline.

The status-line parser is sans-IO (:func:`parse_status`); :func:`probe` only does the socket
work. A probe never raises: every failure is a :class:`ProbeResult` with ``ok=False`` and a
short reason, so one bad endpoint cannot disturb a probe round.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

MAX_STATUS_LINE = 1024


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    status: int | None = None
    error: str | None = None


def build_request(host: str, port: int, bearer_token: str | None) -> bytes:
    lines = [
        "GET /health HTTP/1.1",
        f"Host: {host}:{port}",
        "Connection: close",
        "User-Agent: hpcgate-health",
    ]
    if bearer_token:
        lines.append(f"Authorization: Bearer {bearer_token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def parse_status(line: bytes) -> int | None:
    """The status code of an HTTP/1.x status line, or None if it is not one."""
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3 or not parts[1].isdigit():
        return None
    return int(parts[1])


async def probe(host: str, port: int, bearer_token: str | None, timeout_s: float) -> ProbeResult:
    try:
        return await asyncio.wait_for(_probe(host, port, bearer_token), timeout=timeout_s)
    except TimeoutError:
        return ProbeResult(ok=False, error="timeout")
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        return ProbeResult(ok=False, error=type(exc).__name__)


async def _probe(host: str, port: int, bearer_token: str | None) -> ProbeResult:
    reader, writer = await asyncio.open_connection(host, port, limit=MAX_STATUS_LINE)
    try:
        writer.write(build_request(host, port, bearer_token))
        await writer.drain()
        status = parse_status(await reader.readuntil(b"\r\n"))
    finally:
        writer.close()
    if status is None:
        return ProbeResult(ok=False, error="not_http")
    return ProbeResult(ok=status == 200, status=status, error=None if status == 200 else f"status_{status}")
