"""``hpcgate sim``: serve a simulated vLLM until SIGTERM/SIGINT.

Contract (other components and tests rely on it): once listening, exactly one line is printed
to stdout and flushed, ``{"event":"sim_listening","host":"127.0.0.1","port":12345}``; logs go
to stderr; SIGTERM or SIGINT stops it with exit code 0: it stops accepting connections, lets the
generations in progress finish (up to ``shutdown_timeout_s``, then cuts them); a second SIGTERM or
SIGINT exits at once (:mod:`hpcgate.lifecycle`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import uvloop

from bench.sim.app import SimConfig, run_simulator
from hpcgate.lifecycle import install_stop_signals
from hpcgate.logs import get_logger, setup_logging
from hpcgate.settings import load_settings

log = get_logger("hpcgate.sim")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpcgate sim", description="A vLLM-compatible engine simulator.")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port, 0 for any free one (default 8000)")
    p.add_argument("--model", action="append", help="served model name; repeatable, the first is the default "
                   "(default sim-model)")
    p.add_argument("--profile", choices=["fast", "paced", "gpu-s", "gpu-l"],
                   help="step-cost profile (default fast)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer TOKEN' on /v1/*; a command line is "
                   "visible to every user of the machine, so prefer HPCGATE_SIM_API_KEY")
    p.add_argument("--max-num-seqs", type=int, help="max running sequences (default: the profile's, 256 "
                   "for fast and gpu-s, 1024 for gpu-l)")
    p.add_argument("--max-model-len", type=int, help="context length (default 32768)")
    p.add_argument("--eos-mean-tokens", type=float,
                   help="mean answer length without ignore_eos (default 256)")
    p.add_argument("--legacy-metrics", action="store_true", default=None,
                   help="emit vLLM V0 metric names (vllm:gpu_cache_usage_perc)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="model vLLM's automatic prefix caching (default: on, as vLLM V1)")
    p.add_argument("--fail-after-head-every", type=int, metavar="N",
                   help="fault mode: every Nth streamed request gets its head, then the connection "
                   "closes before the first token (default 0: never)")
    p.add_argument("--scheduling-policy", choices=["fcfs", "priority"],
                   help="vLLM's: 'priority' admits waiting requests by their priority field, lower "
                        "first (default fcfs, which refuses a non-zero priority)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    return p


async def serve(config: SimConfig) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    install_stop_signals(loop, stop.set)
    async with run_simulator(config) as sim:
        ready = {"event": "sim_listening", "host": sim.host, "port": sim.port}
        line = json.dumps(ready, separators=(",", ":"))
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        log.info("sim_started", host=sim.host, port=sim.port, profile=config.profile, models=list(sim.models),
                 max_num_seqs=sim.engine.max_num_seqs, max_model_len=config.max_model_len)
        await stop.wait()
        if sim.server is not None:
            sim.server.close()  # no new connections; the open ones finish what they have
        log.info("sim_stopping", running=len(sim.engine.running), waiting=len(sim.engine.waiting),
                 timeout_s=config.shutdown_timeout_s)
        drained = await sim.drain(config.shutdown_timeout_s)
        if drained:
            sim.close_connections(abort=False)  # what is written still reaches the clients
    log.info("sim_stopped", drained=drained, aborted=sim.aborted, faults=sim.faults)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items()}
    config = load_settings(SimConfig, "sim", overrides=overrides)
    setup_logging(config.log_level)
    try:
        uvloop.run(serve(config))
    except OSError as exc:  # e.g. the port is taken: one line, not a traceback
        print(f"hpcgate sim: error: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    return 0
