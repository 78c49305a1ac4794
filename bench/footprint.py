"""``hpcgate bench footprint``: what an install of hpcgate costs: packages, disk, import and start time.

Installs a source tree (default: this checkout) into a fresh virtual environment with pip and
the tree's ``constraints.txt``, without extras (the base install: what the gateway's container
image and a compute node carry), then measures with that environment:

- ``packages``: the entries of ``pip list`` (pip itself included); ``size_mib``: ``du`` of the
  whole environment, the interpreter's links included;
- ``import_ms``: the cumulative time of ``gateway.main`` in ``python -X importtime -c 'import
  gateway.main'``, median of ``--repeats`` runs;
- ``start_ms``: from launching ``hpcgate gateway --no-auth --static-endpoint m=http://127.0.0.1:9``
  to its port accepting a connection, median of ``--repeats`` runs.

``--venv DIR`` measures an existing environment instead of installing one. Standard library
only: it runs in the base install.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_START_TIMEOUT_S = 30.0


def install(source: Path, venv: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                    "-c", str(source / "constraints.txt"), str(source)], check=True)


def packages(venv: Path) -> int:
    argv = [str(venv / "bin" / "pip"), "list", "--disable-pip-version-check", "--format=freeze"]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return len(out.splitlines())


def size_mib(venv: Path) -> float:
    out = subprocess.run(["du", "-sk", str(venv)], check=True, capture_output=True, text=True).stdout
    return round(int(out.split()[0]) / 1024, 1)


def import_ms(venv: Path, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        err = subprocess.run([str(venv / "bin" / "python"), "-X", "importtime", "-c", "import gateway.main"],
                             check=True, capture_output=True, text=True, cwd=tempfile.gettempdir()).stderr
        line = next(ln for ln in reversed(err.splitlines()) if ln.rstrip().endswith("| gateway.main"))
        runs.append(int(line.split("|")[1]) / 1000)  # "import time: self [us] | cumulative | name"
    return round(statistics.median(runs), 1)


def start_ms(venv: Path, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        port = _free_port()
        argv = [str(venv / "bin" / "hpcgate"), "gateway", "--no-auth", "--port", str(port),
                "--static-endpoint", "m=http://127.0.0.1:9"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("HPCGATE_")}
        started = time.monotonic()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                cwd=tempfile.gettempdir())
        try:
            while not _accepts(port):
                if proc.poll() is not None or time.monotonic() - started > _START_TIMEOUT_S:
                    raise RuntimeError(f"the gateway did not start (exit status {proc.returncode})")
                time.sleep(0.002)
            runs.append((time.monotonic() - started) * 1000)
        finally:
            proc.terminate()
            proc.wait(10)
    return round(statistics.median(runs), 1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def measure(venv: Path, repeats: int) -> dict[str, object]:
    return {"venv": str(venv), "packages": packages(venv), "size_mib": size_mib(venv),
            "import_ms": import_ms(venv, repeats), "start_ms": start_ms(venv, repeats)}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("footprint", help="the base install's size, the gateway's import and start time")
    p.add_argument("--source", default=str(ROOT), help="source tree to install (default: this checkout)")
    p.add_argument("--venv", help="measure this existing environment instead of installing a fresh one")
    p.add_argument("--repeats", type=int, default=5, help="timings per measure; the median is reported")


def cmd_footprint(args: argparse.Namespace) -> int:
    if args.venv:
        doc = measure(Path(args.venv).absolute(), args.repeats)
    else:
        with tempfile.TemporaryDirectory(prefix="hpcgate-footprint-") as tmp:
            venv = Path(tmp) / "venv"
            install(Path(args.source), venv)
            doc = {**measure(venv, args.repeats), "venv": f"fresh, from {args.source}"}
    print(json.dumps(doc))
    return 0
