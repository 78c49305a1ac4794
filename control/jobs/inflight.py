"""An engine's load from its vLLM ``/metrics``: how many requests a draining endpoint still holds
(running + waiting), and the load the operator page shows.

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
from hpcgate.metrics_text import EngineLoad, parse_engine_load

_MAX_BYTES = 4 << 20


def in_flight_from_metrics(text: bytes) -> int | None:
    """Sum of ``vllm:num_requests_running`` and ``vllm:num_requests_waiting`` over all label
    sets; None if neither metric is present."""
    return _count(parse_engine_load(text))


def _count(load: EngineLoad | None) -> int | None:
    queue = None if load is None else load.queue
    return None if queue is None else round(queue)


async def scrape_in_flight(client: httpx.AsyncClient, host: str, port: int, bearer_token: str | None,
                           timeout_s: float = 2.0) -> int | None:
    return _count(await scrape_engine_load(client, host, port, bearer_token, timeout_s))


async def scrape_engine_load(client: httpx.AsyncClient, host: str, port: int, bearer_token: str | None,
                             timeout_s: float = 2.0) -> EngineLoad | None:
    """The engine's load, or None when it cannot be read (refused, slow, oversized, not 200)."""
    try:
        return await asyncio.wait_for(_scrape(client, host, port, bearer_token), timeout_s)
    except (httpx.HTTPError, BodyTooLargeError, TimeoutError):
        return None


async def _scrape(client: httpx.AsyncClient, host: str, port: int,
                  bearer_token: str | None) -> EngineLoad | None:
    headers = {"authorization": f"Bearer {bearer_token}"} if bearer_token else {}
    async with client.stream("GET", node_url(host, port, "/metrics"), headers=headers) as response:
        if response.status_code != 200:
            return None
        return parse_engine_load(await read_capped(response, _MAX_BYTES))
