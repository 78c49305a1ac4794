"""The control plane's HTTP client: httpx, set up one way, and the two helpers its callers share.

Every control-side HTTP call (Endpoint Worker health probes, the Job Worker's drain probe,
slurmrestd, job registration, ``hpcgate admin``, ``hpcgate up``'s readiness check) uses httpx;
nothing in ``control`` frames or de-chunks HTTP by hand. The data plane keeps its own measured
client (``gateway/upstream_client.py``): that one is the hot path, these calls are not.

Invariants: every client has connect and read timeouts and follows no redirects; the daemons'
clients ignore proxy variables (they talk to compute nodes and slurmrestd directly) and read a
response body only up to a cap (:func:`read_capped`), so a broken or hostile peer cannot make a
daemon buffer without bound. The one-shot commands' clients (:func:`tool_client`) read the
control API's own answers whole.
"""

from __future__ import annotations

import httpx

USER_AGENT = "hpcgate-control"


class BodyTooLargeError(Exception):
    """A response body above the caller's cap."""


def node_url(host: str, port: int, path: str) -> str:
    """``http://host:port/path`` for a node name or address (IPv6 literals get brackets)."""
    return f"http://[{host}]:{port}{path}" if ":" in host else f"http://{host}:{port}{path}"


def daemon_client(timeout_s: float, *, max_connections: int = 100, keep_alive: bool = True,
                  transport: httpx.AsyncBaseTransport | None = None,
                  base_url: str = "") -> httpx.AsyncClient:
    """An async client for a daemon: ``timeout_s`` bounds connect, each read, each write."""
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=httpx.Timeout(timeout_s),
        limits=httpx.Limits(max_connections=max_connections,
                            max_keepalive_connections=max_connections if keep_alive else 0),
        headers={"user-agent": USER_AGENT},
        transport=transport,
        trust_env=False,
    )


def tool_client(timeout_s: float) -> httpx.Client:
    """A synchronous client for a one-shot command (job registration, ``hpcgate admin``): one
    request at a time, proxy variables honoured as a user's tools do."""
    return httpx.Client(timeout=httpx.Timeout(timeout_s), headers={"user-agent": USER_AGENT})


async def read_capped(response: httpx.Response, limit: int) -> bytes:
    """The body of a streamed response, raising :class:`BodyTooLargeError` past ``limit`` bytes."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLargeError(f"response body of {declared} bytes (limit {limit})")
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            raise BodyTooLargeError(f"response body larger than {limit} bytes")
    return bytes(body)
