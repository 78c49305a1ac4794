"""How many requests a draining endpoint still holds: vLLM's ``/metrics``, running + waiting.

``in_flight_from_metrics`` is pure (Prometheus text in, a count or None out). ``scrape_in_flight``
does one bounded HTTP/1.1 GET (connect and read timeouts, a size cap) with the endpoint's bearer
token; any failure gives None ("unknown"), which the plan treats as "not yet drained" so a
flaky probe delays a cancel until the drain deadline rather than cutting requests off.
"""

from __future__ import annotations

import asyncio
import re

_SAMPLE_RE = re.compile(r"^(vllm:num_requests_(?:running|waiting))(?:\{[^}]*\})?\s+(\S+)", re.MULTILINE)
_MAX_BYTES = 4 << 20


def in_flight_from_metrics(text: str) -> int | None:
    """Sum of ``vllm:num_requests_running`` and ``vllm:num_requests_waiting`` over all label
    sets; None if neither metric is present."""
    total = 0.0
    seen = False
    for match in _SAMPLE_RE.finditer(text):
        try:
            total += float(match.group(2))
        except ValueError:
            return None
        seen = True
    return round(total) if seen else None


async def scrape_in_flight(host: str, port: int, bearer_token: str | None,
                           timeout_s: float = 2.0) -> int | None:
    try:
        return await asyncio.wait_for(_scrape(host, port, bearer_token), timeout_s)
    except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
        return None


async def _scrape(host: str, port: int, bearer_token: str | None) -> int | None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        auth = f"Authorization: Bearer {bearer_token}\r\n" if bearer_token else ""
        request = f"GET /metrics HTTP/1.1\r\nHost: {host}:{port}\r\n{auth}Connection: close\r\n\r\n"
        writer.write(request.encode())
        await writer.drain()
        data = await reader.read(_MAX_BYTES)
        while len(data) < _MAX_BYTES:
            chunk = await reader.read(_MAX_BYTES - len(data))
            if not chunk:
                break
            data += chunk
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)
    if len(status) < 2 or status[1] != b"200":
        return None
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return in_flight_from_metrics(body.decode("utf-8", "replace"))


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    rest = body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        rest = rest[size + 2:]
    return bytes(out)
