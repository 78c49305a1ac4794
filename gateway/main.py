"""``hpcgate gateway``: parse flags, load settings, run one worker or fork several.

With ``--workers 1`` the process serves itself. With N > 1 the parent binds the port once
with SO_REUSEPORT but never listens on that socket (it only reserves the port and learns it,
for ``--port 0``); each forked worker binds its own listening SO_REUSEPORT socket on that port,
so the kernel spreads connections evenly. The parent prints one ``gateway_listening`` line once
every worker listens, forwards SIGTERM/SIGINT to them (a second one too: each worker then exits
at once), and restarts a worker that dies; in dynamic mode the restarted worker listens only
once it holds the tables (at most ``restart_table_wait_s``), so while Redis is away its siblings
take the connections, and it writes the usage its predecessor had counted but not written
(:mod:`gateway.usage_spool`). A worker gets SIGTERM when the parent dies, even of SIGKILL
(``PR_SET_PDEATHSIG``): it drains and exits rather than serve on the port unsupervised.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import signal
import sys
import time

import orjson

from gateway.http_server import bind_socket
from gateway.settings import GatewaySettings, load_gateway_settings
from gateway.usage_spool import UsageSpool
from gateway.worker import WorkerFailedError, run_worker
from hpcgate.backoff import ceiling
from hpcgate.lifecycle import is_repeated_death_signal, set_parent_death_signal
from hpcgate.logs import get_logger, setup_logging
from hpcgate.net import port_is_free

log = get_logger("hpcgate.gateway.main")

STABLE_S = 10.0  # a worker that lived this long is restarted at once


def restart_delay(quick_deaths: int) -> float:
    """Seconds before restarting a worker that died ``quick_deaths`` times in a row soon after
    its start: 0 for the first, then 0.5 s doubling to 30 s (no jitter: one parent restarts it)."""
    return 0.0 if quick_deaths <= 1 else ceiling(0.5, 30.0, quick_deaths - 2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpcgate gateway", description="OpenAI-compatible streaming gateway")
    p.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="listen port; 0 picks a free one (default 8000)")
    p.add_argument("--workers", type=int, default=None, help="worker processes sharing the port (default 1)")
    p.add_argument("--static-endpoint", action="append", default=None, metavar="MODEL=URL[#TOKEN][,URL...]",
                   help="serve a fixed endpoint list (repeatable); no Redis/PostgreSQL endpoint table")
    p.add_argument("--no-auth", action="store_true", default=None, help="accept requests without API keys")
    p.add_argument("--config", default=None, help="settings file (TOML); default $HPCGATE_CONFIG")
    return p


def _announce(host: str, port: int) -> None:
    sys.stdout.write(orjson.dumps({"event": "gateway_listening", "host": host, "port": port}).decode() + "\n")
    sys.stdout.flush()


def _new_loop() -> asyncio.AbstractEventLoop:
    import uvloop

    return uvloop.new_event_loop()


def _serve(settings: GatewaySettings, sock: object, index: int, on_ready: object, *,
           table_wait_s: float = 0.0, spool: UsageSpool | None = None) -> None:
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(run_worker(settings, sock, index, on_ready,  # type: ignore[arg-type]
                                           table_wait_s=table_wait_s, spool=spool))
    finally:
        loop.close()


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    overrides = {
        "host": args.host, "port": args.port, "workers": args.workers,
        "static_endpoints": args.static_endpoint, "no_auth": args.no_auth,
    }
    settings = load_gateway_settings(overrides=overrides, config_path=args.config)
    setup_logging(settings.log_level)
    # The workers bind with SO_REUSEPORT, which would silently share a port that another
    # process (an old gateway, the control API) already serves: refuse instead.
    if settings.port and not port_is_free(settings.host, settings.port):
        log.error("gateway_port_in_use", host=settings.host, port=settings.port)
        print(f"hpcgate gateway: error: {settings.host}:{settings.port} is in use", file=sys.stderr)
        return 1
    _raise_descriptor_limit(settings)
    if settings.workers == 1:
        sock = bind_socket(settings.host, settings.port, reuse_port=False)
        try:
            _serve(settings, sock, 0, lambda port: _announce(settings.host, port))
        except WorkerFailedError as exc:  # said in the log (background_task_failed)
            print(f"hpcgate gateway: error: {exc}", file=sys.stderr)
            return 1
        return 0
    return _run_workers(settings)


def descriptors_needed(settings: GatewaySettings) -> int:
    """A worker at ``limit_concurrency`` clients, each streaming from an engine, plus room for
    logs, Redis, PostgreSQL and idle upstream connections."""
    return 2 * settings.limit_concurrency + 1024


def _raise_descriptor_limit(settings: GatewaySettings) -> None:
    """Take the hard ``RLIMIT_NOFILE`` as the soft one (Debian's default soft limit is 1024), and
    say at start when even that cannot hold ``limit_concurrency`` streams: past it, accepts fail
    with EMFILE instead of the clean 503 of the connection cap."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    need = descriptors_needed(settings)
    if soft != resource.RLIM_INFINITY and soft < need:
        log.warning("descriptor_limit_low", nofile=soft, needed=need,
                    limit_concurrency=settings.limit_concurrency,
                    hint="raise the hard limit (ulimit -Hn, LimitNOFILE=) or lower gateway.limit_concurrency")


def _run_workers(settings: GatewaySettings) -> int:
    reserve = bind_socket(settings.host, settings.port, reuse_port=True)  # bound, never listening
    port = reserve.getsockname()[1]
    ready_r, ready_w = os.pipe()
    children: dict[int, int] = {}  # pid -> worker index
    started: dict[int, float] = {}  # worker index -> when it was last spawned
    quick_deaths: dict[int, int] = {}  # worker index -> deaths in a row within STABLE_S of a start
    # per worker slot, shared with its workers: usage a killed worker had not written yet
    spools = {i: UsageSpool() for i in range(settings.workers)} if settings.database_url else {}

    def spawn(index: int, announce: bool) -> None:
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # child
            # A worker whose parent died (even of SIGKILL) drains and exits instead of serving on
            # unsupervised: a new gateway on the port would share it with stale workers.
            if set_parent_death_signal(signal.SIGTERM) and os.getppid() != parent:
                os._exit(1)  # the parent died before the death signal was set
            os.close(ready_r)
            reserve.close()
            code = 0
            try:
                sock = bind_socket(settings.host, port, reuse_port=True)
                ready = (lambda _p: os.write(ready_w, b".")) if announce else (lambda _p: 0)
                # a restarted worker listens once it holds the tables (Redis may be away)
                _serve(settings, sock, index, ready, spool=spools.get(index),
                       table_wait_s=0.0 if announce else settings.restart_table_wait_s)
            except BaseException:  # report and exit the child, never return into the parent's code
                log.exception("worker_crashed", worker=index)
                code = 1
            finally:
                os._exit(code)
        children[pid] = index
        started[index] = time.monotonic()

    for i in range(settings.workers):
        spawn(i, True)
    os.close(ready_w)
    got = 0
    while got < settings.workers:
        chunk = os.read(ready_r, settings.workers - got)
        if not chunk:
            log.error("workers_failed_to_start")
            for pid in children:
                os.kill(pid, signal.SIGTERM)
            return 1
        got += len(chunk)
    _announce(settings.host, port)

    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if stopping and is_repeated_death_signal(signum):
            return  # not a second request: the workers would end at once instead of draining
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    while children:
        try:
            pid, wstatus = os.wait()
        except ChildProcessError:
            break
        index = children.pop(pid, None)
        if index is None:
            continue
        code = os.waitstatus_to_exitcode(wstatus)
        if not stopping:
            quick = time.monotonic() - started[index] < STABLE_S
            quick_deaths[index] = quick_deaths.get(index, 0) + 1 if quick else 0
            delay = restart_delay(quick_deaths[index])
            log.error("worker_died", worker=index, exit_code=code, restart_in_s=delay)
            # A worker that keeps dying at start (a bad setting, no memory, no descriptors) is
            # restarted ever more slowly instead of in a tight loop; signals still stop us.
            time.sleep(delay)
            if not stopping:
                spawn(index, False)
        elif code != 0:
            status = 1
    return status
