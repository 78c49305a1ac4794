"""How many requests a draining endpoint still holds: vLLM's ``/metrics``, running + waiting.

``in_flight_from_metrics`` is pure (Prometheus text in, a count or None out) and reads the text
with the project's one metrics parser (:mod:`hpcgate.metrics_text`). ``scrape_in_flight`` does
one bounded GET (connect and read timeouts, a total deadline, a size cap) with the endpoint's
bearer token; any failure gives None ("unknown"), which the plan treats as "not yet drained" so
a flaky probe delays a cancel until the drain deadline rather than cutting requests off.
"""

from __future__ import annotations

import asyncio

import httpx

from control.http_client import BodyTooLargeError, node_url, read_capped
from hpcgate.metrics_text import parse_engine_load

_MAX_BYTES = 4 << 20


def in_flight_from_metrics(text: bytes) -> int | None:
    """Sum of ``vllm:num_requests_running`` and ``vllm:num_requests_waiting`` over all label
    sets; None if neither metric is present."""
    queue = parse_engine_load(text).queue
    return None if queue is None else round(queue)


async def scrape_in_flight(client: httpx.AsyncClient, host: str, port: int, bearer_token: str | None,
                           timeout_s: float = 2.0) -> int | None:
    try:
        return await asyncio.wait_for(_scrape(client, host, port, bearer_token), timeout_s)
    except (httpx.HTTPError, BodyTooLargeError, TimeoutError):
        return None


async def _scrape(client: httpx.AsyncClient, host: str, port: int, bearer_token: str | None) -> int | None:
    headers = {"authorization": f"Bearer {bearer_token}"} if bearer_token else {}
    async with client.stream("GET", node_url(host, port, "/metrics"), headers=headers) as response:
        if response.status_code != 200:
            return None
        return in_flight_from_metrics(await read_capped(response, _MAX_BYTES))
