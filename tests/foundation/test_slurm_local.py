"""The project's single-node Slurm: start, run a job that serves HTTP, cancel it, stop.

Uses a cluster of its own (own directory and ports) so that it can stop it without disturbing
the session's shared cluster that other tests use.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.services import start_slurm, stop_slurm

pytestmark = pytest.mark.slurm


def _pids(directory: Path) -> dict[str, int]:
    return {p.stem: int(p.read_text()) for p in (directory / "run").glob("*.pid")}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_job_serves_http_reached_from_outside(tmp_path: Path) -> None:
    directory = Path("/tmp") / f"hpcgate-slurm-test-{os.getpid()}"
    ports = {"HPCGATE_SLURM_CTLD_PORT": str(_free_port()), "HPCGATE_SLURM_SLURMD_PORT": str(_free_port())}
    exports = start_slurm(directory, ports)
    env = {**os.environ, **exports}
    try:
        pids = _pids(directory)
        assert set(pids) == {"munged", "slurmctld", "slurmd"}
        port = _free_port()
        (tmp_path / "index.html").write_text("hello from slurm")
        script = tmp_path / "serve.sh"
        script.write_text(textwrap.dedent(f"""\
            #!/bin/bash
            #SBATCH --job-name=hpcgate-http-test
            #SBATCH --output={tmp_path}/job.out
            cd {tmp_path} && exec python3 -m http.server {port} --bind 127.0.0.1
            """))
        job_id = subprocess.run(
            ["sbatch", "--parsable", str(script)], env=env, check=True, capture_output=True, text=True
        ).stdout.strip().split(";")[0]
        assert job_id.isdigit()

        deadline = time.monotonic() + 60
        body = b""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=2) as resp:
                    body = resp.read()
                break
            except OSError:
                time.sleep(0.1)
        assert body == b"hello from slurm"
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=env, capture_output=True,
                               text=True).stdout.strip()
        assert state == "RUNNING"

        subprocess.run(["scancel", job_id], env=env, check=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            except OSError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the job's server still answers after scancel")
    finally:
        stop_slurm(directory)
    assert not list((directory / "run").glob("*.pid"))
    assert not any(_alive(pid) for pid in pids.values())
    # the session's shared cluster (other directory) is untouched
    shared = Path("/tmp/hpcgate-slurm/run/slurmctld.pid")
    if shared.exists():
        assert _alive(int(shared.read_text()))
