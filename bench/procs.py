"""Child processes of the benchmarks: simulator, gateway and nginx, with CPU and RSS accounting.

Each child is started on 127.0.0.1 with a free port and is ready when its readiness signal
arrives: the simulator's and the gateway's one stdout line (``sim_listening`` /
``gateway_listening``), nginx's listening socket. A child that does not become ready raises
:class:`TargetUnavailableError` with the reason and the tail of its stderr, so a table can show
"gateway did not start: ..." for one column and still fill the others.

CPU is read per process tree with psutil (utime + stime of the main process and all its
descendants: gateway workers, nginx master and workers), before and after a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil  # type: ignore[import-untyped]

HPCGATE = str(Path(sys.executable).with_name("hpcgate"))
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


class TargetUnavailableError(Exception):
    """A benchmark target could not be started; the message says why."""


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    host: str
    port: int
    errfile: object = None
    workdir: str | None = None
    peak_rss: dict[int, int] = field(default_factory=dict)
    # processes that serve behind this one (the gateways behind a balancer): their CPU and memory
    # count as this target's, and stop() stops them too
    companions: list[Child] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            own = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            own = []
        return own + [p for c in self.companions for p in c.tree()]

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def stderr_text(self) -> str:
        """What the child wrote to stderr so far. Read with ``pread``: the file offset is shared
        with the child, and seeking it would make the child overwrite its own log."""
        try:
            fd = self.errfile.fileno()  # type: ignore[attr-defined]
            return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")
        except (AttributeError, OSError, ValueError):
            return ""

    def sample_rss(self) -> None:
        for p in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                rss = p.memory_info().rss
                if rss > self.peak_rss.get(p.pid, 0):
                    self.peak_rss[p.pid] = rss


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stderr_tail(errfile: object) -> str:
    try:
        errfile.seek(0)  # type: ignore[attr-defined]
        text: str = errfile.read().decode(errors="replace")  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return ""
    return " ".join(text.strip().splitlines()[-3:])[-400:]


async def _start_announcing(name: str, event: str, args: list[str], timeout: float,
                            env: dict[str, str] | None = None) -> Child:
    errfile = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the child; closed in stop()
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("HPCGATE_")}
    clean_env.update(env or {})
    try:
        proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, stderr=errfile,
                                                    env=clean_env, start_new_session=True)
    except OSError as exc:
        errfile.close()
        raise TargetUnavailableError(f"{name} did not start: {exc}") from None
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    except TimeoutError:
        line = b""
    try:
        doc = json.loads(line) if line else {}
    except ValueError:
        doc = {}
    if not isinstance(doc, dict) or doc.get("event") != event:
        child = Child(name, proc, "", 0, errfile)
        await stop(child)
        why = f"exit code {proc.returncode}" if proc.returncode not in (None, -15) else "no readiness line"
        raise TargetUnavailableError(f"{name} did not start: {why}; stderr: {_stderr_tail(errfile)}")
    return Child(name, proc, str(doc["host"]), int(doc["port"]), errfile)


async def start_sim(profile: str, model: str, *extra: str) -> Child:
    return await _start_announcing(
        "simulator", "sim_listening",
        [HPCGATE, "sim", "--host", "127.0.0.1", "--port", "0", "--profile", profile, "--model", model,
         "--log-level", "warning", *extra], timeout=15)


async def start_dynamic_gateway(env: dict[str, str], workers: int = 1) -> Child:
    """A gateway in dynamic mode: tables from Redis, keys from PostgreSQL, as ``env`` (the
    ``HPCGATE_*`` variables of a deployment) says; one of several deployments behind a balancer."""
    args = [HPCGATE, "gateway", "--host", "127.0.0.1", "--port", "0", "--workers", str(workers)]
    return await _start_announcing("gateway", "gateway_listening", args, timeout=20, env=env)


async def start_gateway(model: str, upstream: str, workers: int = 1, *, offload: bool = True,
                        extra_env: dict[str, str] | None = None) -> Child:
    """``offload=False``: every token through the event loop (the target "gateway-loop");
    ``extra_env``: further ``HPCGATE_*`` settings."""
    args = [HPCGATE, "gateway", "--host", "127.0.0.1", "--port", "0", "--no-auth",
            "--static-endpoint", f"{model}={upstream}"]
    if workers != 1:
        args += ["--workers", str(workers)]
    return await _start_announcing("gateway", "gateway_listening", args, timeout=20,
                                   env={"HPCGATE_LOG_LEVEL": "warning",
                                        "HPCGATE_GATEWAY_STREAM_OFFLOAD": str(offload).lower(),
                                        **(extra_env or {})})


NGINX_CONF = """\
worker_processes {workers};
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 8192; }}
http {{
    access_log {dir}/access.log combined buffer=64k;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    upstream backend {{
{servers}
        keepalive 1024;
        keepalive_requests 1000000;
    }}
    server {{
        listen {host}:{port} backlog=4096;
        client_max_body_size 32m;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 3600s;
        }}
    }}
}}
"""


def nginx_config(workdir: str, host: str, port: int, upstreams: Sequence[str], workers: int) -> str:
    """One ``server`` line per ``host:port`` upstream; nginx balances them round robin."""
    servers = "\n".join(f"        server {u};" for u in upstreams)
    return NGINX_CONF.format(dir=workdir, host=host, port=port, servers=servers, workers=workers)


async def start_nginx(upstreams: str | Sequence[str], workers: int = 1) -> Child:
    """nginx as a child (``daemon off``), its config, pid and logs in a temp dir, in front of
    one ``host:port`` upstream or several (round robin)."""
    upstreams = [upstreams] if isinstance(upstreams, str) else list(upstreams)
    if not os.path.exists(NGINX):  # noqa: ASYNC240 - one stat at start-up
        raise TargetUnavailableError(f"nginx did not start: {NGINX} not found")
    workdir = tempfile.mkdtemp(prefix="hpcgate-nginx-")
    port = free_port()
    conf = Path(workdir, "nginx.conf")
    conf.write_text(nginx_config(  # noqa: ASYNC240 - a small local file at start-up
        workdir, "127.0.0.1", port, upstreams, workers))
    errfile = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
    proc = await asyncio.create_subprocess_exec(NGINX, "-p", workdir, "-c", str(conf), "-e",
                                                f"{workdir}/error.log", stdout=asyncio.subprocess.DEVNULL,
                                                stderr=errfile, start_new_session=True)
    child = Child("nginx", proc, "127.0.0.1", port, errfile, workdir)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while loop.time() < deadline:
        if proc.returncode is not None:
            break
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return child
    await stop(child)
    log = Path(workdir, "error.log")
    tail = log.read_text()[-400:] if log.exists() else _stderr_tail(errfile)  # noqa: ASYNC240
    raise TargetUnavailableError(f"nginx did not start: {tail}")


PROXY_TARGETS = ("direct", "gateway", "gateway-loop", "nginx", "lb-gateway-xN")


async def start_proxy(target: str, model: str, sim: Child, workers: int = 1) -> Child | None:
    """The proxy in front of ``sim`` for a benchmark target; None for "direct".

    ``lb-gateway-xN``: nginx (round robin) over N separate gateway deployments of ``workers``
    workers each, as several gateway replicas behind a site's load balancer."""
    if target in ("gateway", "gateway-loop"):
        return await start_gateway(model, sim.url, workers, offload=target == "gateway")
    if target == "nginx":
        return await start_nginx(f"127.0.0.1:{sim.port}", workers)
    if target.startswith("lb-gateway-x") and target[len("lb-gateway-x"):].isdigit():
        gateways: list[Child] = []
        try:
            for _ in range(int(target[len("lb-gateway-x"):])):
                gateways.append(await start_gateway(model, sim.url, workers))
            balancer = await start_nginx([f"127.0.0.1:{g.port}" for g in gateways], 1)
        except BaseException:
            for g in gateways:
                await stop(g)
            raise
        balancer.companions = gateways
        return balancer
    if target == "direct":
        return None
    raise TargetUnavailableError(f"unknown target {target!r} (known: {', '.join(PROXY_TARGETS)})")


async def stop(child: Child) -> None:
    for companion in child.companions:
        await stop(companion)
    proc = child.proc
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: gateway workers, nginx workers
            await proc.wait()
    if child.errfile is not None:
        with contextlib.suppress(AttributeError, OSError):
            child.errfile.close()  # type: ignore[attr-defined]
    if child.workdir:
        shutil.rmtree(child.workdir, ignore_errors=True)


async def sample_rss_until(children: list[Child], done: asyncio.Event, every: float = 0.25) -> None:
    while not done.is_set():
        for c in children:
            c.sample_rss()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), every)
