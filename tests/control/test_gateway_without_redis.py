"""A gateway worker that starts while Redis is away: it never tells a client that a served model
does not exist.

Found by ``hpcgate bench chaos`` (fault ``kill_gateway_worker_redis_down``): a worker its parent
restarted while Redis was down listened at once, without an endpoint table, and answered 404
"model does not exist" to its share of the clients while its sibling served the model. Now a
restarted worker listens only once it holds the tables (its siblings take the connections
meanwhile), and a worker without an endpoint table answers 503 with ``Retry-After``, not 404.
Redis "goes away" through a :class:`TcpProxy` the test cuts; the shared server keeps running.
"""

from __future__ import annotations

import asyncio
import json
import signal
from contextlib import AsyncExitStack

import psutil  # type: ignore[import-untyped]

from bench.procs import start_dynamic_gateway, stop
from tests.control.conftest import Stack
from tests.control.daemons import Daemon, chat, start_health
from tests.control.test_two_gateways import new_key, serve_model
from tests.support.procs import wait_until
from tests.support.tcp_proxy import TcpProxy

MODEL = "noredis/model"


def listening(parent: int) -> int:
    """How many of the gateway's workers listen on a socket."""
    return sum(any(c.status == psutil.CONN_LISTEN for c in w.net_connections("tcp"))
               for w in psutil.Process(parent).children())


async def statuses(port: int, key: str, n: int) -> list[int]:
    """Chat completions on ``n`` fresh connections (each lands on the worker the kernel picks)."""
    return [await chat(port, key, MODEL) for _ in range(n)]


async def test_a_worker_restarted_while_redis_is_away_leaves_the_clients_to_its_sibling(
        stack: Stack, api: Daemon) -> None:
    async with AsyncExitStack() as exits, TcpProxy("127.0.0.1", 6379) as redis:
        health = await start_health(stack.env, stack.tmp)
        exits.push_async_callback(health.stop)
        await serve_model(stack, exits, MODEL)
        key, _ = await new_key(stack, "noredis")
        env = {**stack.env, "HPCGATE_LOG_LEVEL": "info", "HPCGATE_GATEWAY_ACCESS_LOG": "false",
               "HPCGATE_REDIS_URL": f"redis://127.0.0.1:{redis.port}/0",
               "HPCGATE_GATEWAY_REDIS_BACKOFF_MAX_S": "0.2"}
        gateway = await start_dynamic_gateway(env, workers=2)
        exits.push_async_callback(stop, gateway)

        async def served() -> bool:
            return await statuses(gateway.port, key, 8) == [200] * 8

        await wait_until(served, 15, "both workers to serve the model")

        await redis.cut()
        victim = psutil.Process(gateway.proc.pid).children()[0]
        victim.send_signal(signal.SIGKILL)

        def restarted() -> bool:
            workers = psutil.Process(gateway.proc.pid).children()
            return len(workers) == 2 and victim.pid not in [w.pid for w in workers]

        await wait_until(restarted, 10, "the parent to restart the worker")
        # the new worker has no tables while Redis is away: it does not listen, every answer
        # comes from its sibling
        assert await statuses(gateway.port, key, 24) == [200] * 24
        assert listening(gateway.proc.pid) == 1

        await redis.restore()
        await wait_until(lambda: listening(gateway.proc.pid) == 2, 15, "the restarted worker to listen")
        assert await statuses(gateway.port, key, 16) == [200] * 16
        assert "worker_listening_without_tables" not in gateway.stderr_text()


async def test_a_worker_without_an_endpoint_table_answers_503_not_404(stack: Stack, api: Daemon) -> None:
    """Redis away from the start: keys come from PostgreSQL, the endpoint table from nowhere."""
    async with AsyncExitStack() as exits, TcpProxy("127.0.0.1", 6379) as redis:
        await redis.cut()
        key, _ = await new_key(stack, "notable")
        env = {**stack.env, "HPCGATE_LOG_LEVEL": "warning",
               "HPCGATE_REDIS_URL": f"redis://127.0.0.1:{redis.port}/0"}
        gateway = await start_dynamic_gateway(env)
        exits.push_async_callback(stop, gateway)
        body = json.dumps({"model": "anything", "messages": [{"role": "user", "content": "hi"}]}).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
                     b"Content-Type: application/json\r\nAuthorization: Bearer " + key.encode()
                     + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        head, _, payload = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), raw
        assert b"\r\nretry-after: 1" in head.lower()
        assert json.loads(payload)["error"]["code"] == "not_ready"
