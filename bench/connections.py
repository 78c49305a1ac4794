"""``hpcgate bench connections``: a gateway worker's memory per idle keep-alive connection and
per concurrent stream.

Starts a simulator and a one-worker gateway (static mode, no auth, the per-address cap off and
the keep-alive timeout raised: every client here is 127.0.0.1 and must stay connected), then:

1. ``--idle N`` connections each send one ``GET /health``, read the answer and stay open;
2. on a fresh gateway (so memory freed by step 1 cannot hide what step 2 needs), ``--streams S``
   streaming chat requests are opened and held until every one has received its first chunk.

The gateway's resident memory (its whole process tree) is read with psutil after a warm-up and
again once the step is complete; the result is the difference per connection and per stream,
printed as a table and written as JSON. A memory figure, not a timing: the machine's load does
not change it much, but the number of connections the client side can open does (each end holds
a descriptor: ``ulimit -n`` must exceed the counts).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # bench.procs needs psutil (the bench extra): imported when a run starts
    from bench.procs import Child

MODEL = "conn-bench"
Load = Callable[[int, int, list[asyncio.StreamWriter], bool], Awaitable[None]]
_CHAT = json.dumps({"model": MODEL, "stream": True, "max_tokens": 4000, "ignore_eos": True,
                    "messages": [{"role": "user", "content": "hello"}]}).encode()


def _rss_mib(child: Child) -> float:
    total = 0
    for p in child.tree():
        with contextlib.suppress(Exception):
            total += p.memory_info().rss
    return total / (1 << 20)


async def _settled_rss(child: Child) -> float:
    """RSS once it stops moving (allocations of the step just finished are done)."""
    last = _rss_mib(child)
    for _ in range(20):
        await asyncio.sleep(0.25)
        now = _rss_mib(child)
        if abs(now - last) < 0.05:
            return now
        last = now
    return last


async def _idle(port: int, n: int, held: list[asyncio.StreamWriter], progress: bool) -> None:
    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        held.append(writer)
        writer.write(b"GET /health HTTP/1.1\r\nHost: b\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"idle connection answered {head[:40]!r}")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)

    for start in range(0, n, 500):  # in waves: the listen backlog, and a progress line per wave
        await asyncio.gather(*(one() for _ in range(min(500, n - start))))
        if progress:
            print(f"  idle connections open: {len(held)}/{n}", flush=True)


async def _streams(port: int, n: int, held: list[asyncio.StreamWriter], progress: bool) -> None:
    started = 0

    async def one() -> None:
        nonlocal started
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        held.append(writer)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%b" % (len(_CHAT), _CHAT))
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"stream answered {head[:60]!r}")
        await reader.readuntil(b"data: ")  # the first chunk: the stream is relayed
        started += 1

    for start in range(0, n, 250):
        await asyncio.gather(*(one() for _ in range(min(250, n - start))))
        if progress:
            print(f"  streams relaying: {started}/{n}", flush=True)


async def _step(count: int, load: Load, progress: bool) -> tuple[float, float]:
    """On a fresh simulator and gateway: the gateway's RSS warm, then with ``count`` of ``load``."""
    from bench.procs import start_gateway, start_sim, stop

    sim = await start_sim("paced", MODEL, "--max-num-seqs", str(max(256, count + 16)))
    gateway = await start_gateway(MODEL, sim.url, extra_env={
        "HPCGATE_GATEWAY_KEEP_ALIVE_TIMEOUT_S": "3600",
        "HPCGATE_GATEWAY_MAX_CONNECTIONS_PER_ADDRESS": "0",
        "HPCGATE_GATEWAY_LIMIT_CONCURRENCY": str(count + 100),
    })
    held: list[asyncio.StreamWriter] = []
    try:
        await _streams(gateway.port, 8, held, progress=False)  # warm: pools, relay thread, caches
        for w in held:
            w.close()
        held.clear()
        base = await _settled_rss(gateway)
        await load(gateway.port, count, held, progress)
        return base, await _settled_rss(gateway)
    finally:
        for w in held:
            w.close()
        await stop(gateway)
        await stop(sim)


async def measure(idle: int, streams: int, progress: bool = True) -> dict[str, object]:
    base, with_idle = await _step(idle, _idle, progress)
    base_streams, with_streams = await _step(streams, _streams, progress)
    return {
        "idle_connections": idle, "streams": streams,
        "rss_mib": {"before_idle": round(base, 1), "with_idle": round(with_idle, 1),
                    "before_streams": round(base_streams, 1), "with_streams": round(with_streams, 1)},
        "kib_per_idle_connection": round((with_idle - base) * 1024 / max(idle, 1), 2),
        "kib_per_stream": round((with_streams - base_streams) * 1024 / max(streams, 1), 2),
    }


def format_table(doc: dict[str, object]) -> str:
    rss = doc["rss_mib"]
    assert isinstance(rss, dict)
    return "\n".join([
        "| load | gateway RSS (MiB) | added per connection (KiB) |",
        "|---|---|---|",
        f"| none (warm) | {rss['before_idle']} | |",
        f"| {doc['idle_connections']} idle keep-alive connections | {rss['with_idle']} | "
        f"{doc['kib_per_idle_connection']} |",
        f"| {doc['streams']} concurrent streams | {rss['with_streams']} | {doc['kib_per_stream']} |",
    ])


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("connections", help="a gateway worker's memory per idle connection and per stream")
    p.add_argument("--idle", type=int, default=10_000, help="idle keep-alive connections (default 10000)")
    p.add_argument("--streams", type=int, default=2_000, help="concurrent streams (default 2000)")
    p.add_argument("--out", help="JSON result file (default: RESULTS_DIR/connections-TIME.json)")


def cmd_connections(args: argparse.Namespace, results_dir: str) -> int:
    import uvloop

    if args.idle < 0 or args.streams < 1:
        print("hpcgate bench connections: error: --idle must be >= 0 and --streams >= 1", file=sys.stderr)
        return 2
    print(f"gateway memory: {args.idle} idle connections, then {args.streams} streams")
    doc = uvloop.run(measure(args.idle, args.streams))
    print(format_table(doc))
    path = Path(args.out or Path(results_dir) / f"connections-{time.strftime('%Y%m%dT%H%M%S')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    print(f"results: {path}")
    return 0
