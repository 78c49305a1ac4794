"""One ``GET /health`` probe of an endpoint, over a fresh connection, with one deadline.

:func:`probe` never raises: every failure is a :class:`ProbeResult` with ``ok=False`` and a
short reason (``timeout``, ``status_503``, or the name of the transport error), so one bad
endpoint cannot disturb a probe round. Only the status line matters: the body is never read.
The Endpoint Worker opens one client per round (:func:`probe_client`) with keep-alive off, so
every probe sees whether the port still accepts connections.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx

from control.http_client import daemon_client, node_url


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    status: int | None = None
    error: str | None = None


def probe_client(timeout_s: float, max_concurrent: int) -> httpx.AsyncClient:
    return daemon_client(timeout_s, max_connections=max_concurrent, keep_alive=False)


async def probe(client: httpx.AsyncClient, host: str, port: int, bearer_token: str | None,
                timeout_s: float) -> ProbeResult:
    try:
        status = await asyncio.wait_for(_status(client, host, port, bearer_token), timeout=timeout_s)
    except (TimeoutError, httpx.TimeoutException):
        return ProbeResult(ok=False, error="timeout")
    except httpx.HTTPError as exc:
        return ProbeResult(ok=False, error=type(exc).__name__)
    return ProbeResult(ok=status == 200, status=status, error=None if status == 200 else f"status_{status}")


async def _status(client: httpx.AsyncClient, host: str, port: int, bearer_token: str | None) -> int:
    headers = {"authorization": f"Bearer {bearer_token}"} if bearer_token else {}
    async with client.stream("GET", node_url(host, port, "/health"), headers=headers) as response:
        return response.status_code
