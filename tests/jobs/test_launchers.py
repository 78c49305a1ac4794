"""The launchers against the real thing: bash process groups (local) and the single-node Slurm
(CLI); slurmrestd's request/response mapping on recorded shapes, and its launcher against a
loopback server that answers in chunks as slurmrestd does; the in-flight parser."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from control.jobs.inflight import in_flight_from_metrics
from control.launchers.base import (
    JobSpec,
    JobState,
    Launcher,
    LauncherError,
    ObservedJob,
    Outcome,
    SubmitRejectedError,
)
from control.launchers.local import LocalLauncher
from control.launchers.slurm_cli import SlurmCliLauncher, classify_sbatch_error
from control.launchers.slurm_rest import SlurmRestLauncher
from control.launchers.slurm_rest_map import (
    cancel_ok,
    parse_jobs_response,
    parse_submit_response,
    sbatch_directives,
    submit_body,
)
from tests.support.services import start_slurm

FIX = Path(__file__).parent / "fixtures"


async def _until(launcher: Launcher, prefix: str, pred: Callable[[list[ObservedJob]], bool],
                 timeout: float = 20.0) -> list[ObservedJob]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = await launcher.observe(prefix)
        if pred(jobs):
            return jobs
        assert time.monotonic() < deadline, f"timed out; last {jobs}"
        await asyncio.sleep(0.1)


def _spec(tmp: Path, name: str, body: str, secret_env: dict[str, str] | None = None,
          time_limit_s: int | None = None) -> JobSpec:
    script = f"#!/bin/bash\n#SBATCH --job-name={name}\n#SBATCH --output={tmp}/{name}.out\n{body}\n"
    return JobSpec(name=name, script=script, output_path=f"{tmp}/{name}.out", workdir=str(tmp),
                   secret_env=secret_env or {}, time_limit_s=time_limit_s)


async def test_local_launcher_lifecycle(tmp_path: Path) -> None:
    launcher = LocalLauncher(tmp_path / "state", kill_wait_s=0.5)
    a = await launcher.submit(_spec(tmp_path, "lt-a", 'echo "tok=$TOK id=$HPCG_LOCAL_JOB_ID"; sleep 60',
                                    secret_env={"TOK": "s3cret"}))
    b = await launcher.submit(_spec(tmp_path, "lt-b", "echo boom >&2; exit 3"))
    c = await launcher.submit(_spec(tmp_path, "lt-c", "sleep 60", time_limit_s=1))
    assert "s3cret" not in (tmp_path / "state" / f"{a}.sh").read_text()  # secrets never in the script
    jobs = await _until(launcher, "lt-", lambda js: any(j.launcher_job_id == b and not j.alive for j in js))
    failed = next(j for j in jobs if j.launcher_job_id == b)
    assert (failed.outcome, failed.exit_code) == (Outcome.FAILED, 3)
    assert "boom" in (await launcher.read_output(failed) or "")
    running = next(j for j in jobs if j.launcher_job_id == a)
    for _ in range(200):  # a busy machine may not have run its first line yet: cancel after it
        if "tok=" in (await launcher.read_output(running) or ""):
            break
        await asyncio.sleep(0.05)
    await launcher.cancel(a)
    await launcher.cancel(a)  # idempotent
    await launcher.cancel("local-ffffffffffff")  # unknown: no error
    # a fresh launcher (a restarted worker) sees the same jobs through the state files
    again = LocalLauncher(tmp_path / "state", kill_wait_s=0.5)
    jobs = await _until(again, "lt-", lambda js: all(not j.alive for j in js) and len(js) == 3)
    by_id = {j.launcher_job_id: j for j in jobs}
    assert by_id[a].outcome is Outcome.CANCELLED
    assert by_id[c].outcome is Outcome.TIMEOUT and by_id[c].reason == "TimeLimit"
    out = await again.read_output(by_id[a])
    assert out is not None and f"tok=s3cret id={a}" in out


@pytest.fixture(scope="module")
def slurm_conf() -> Iterator[str]:
    conf = start_slurm()["SLURM_CONF"]
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf  # the launcher's commands inherit it, as under `hpcgate up`
    yield conf
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


@pytest.mark.slurm
@pytest.mark.parametrize("use_json", [True, False])
async def test_slurm_cli_launcher(slurm_conf: str, tmp_path: Path, use_json: bool) -> None:
    launcher = SlurmCliLauncher(use_json=use_json)
    prefix = f"lt{os.getpid()}{int(use_json)}{time.monotonic_ns() % 10**6}-"
    body = 'echo "tok=$TOK node=$SLURMD_NODENAME"; sleep 60'
    job_id = await launcher.submit(_spec(tmp_path, f"{prefix}run", body, secret_env={"TOK": "s3cret"}))
    assert job_id.isdigit()
    with pytest.raises(SubmitRejectedError, match="Invalid partition"):
        await launcher.submit(_spec(tmp_path, f"{prefix}bad", "#SBATCH --partition=nope\ntrue"))
    jobs = await _until(launcher, prefix, lambda js: any(j.state is JobState.RUNNING for j in js))
    (job,) = jobs
    assert job.launcher_job_id == job_id and job.node == "localhost"
    if job.output_path is None:
        # squeue's fixed format has no output path; the worker supplies the one it rendered
        job = msgspec.structs.replace(job, output_path=f"{tmp_path}/{prefix}run.out")
    out = await _wait_output(launcher, job, "tok=s3cret")
    assert "node=localhost" in out
    await launcher.cancel(job_id)
    await launcher.cancel(job_id)
    await launcher.cancel("99999999")  # purged / unknown: not an error
    jobs = await _until(launcher, prefix, lambda js: all(j.state is JobState.ENDED for j in js))
    assert jobs[0].outcome is Outcome.CANCELLED


async def _wait_output(launcher: Launcher, job: ObservedJob, text: str) -> str:
    deadline = time.monotonic() + 20
    while True:
        out = await launcher.read_output(job) or ""
        if text in out or time.monotonic() > deadline:
            return out
        await asyncio.sleep(0.1)


def test_sbatch_errors_are_classified() -> None:
    assert type(classify_sbatch_error("sbatch: error: Batch job submission failed: Invalid account")) is (
        SubmitRejectedError)
    temporary = classify_sbatch_error("sbatch: error: Batch job submission failed: Unable to contact slurm "
                                      "controller (connect failure)")
    assert type(temporary) is LauncherError


def test_slurmrest_submit_body_from_rendered_directives(tmp_path: Path) -> None:
    script = ("#!/bin/bash\n# comment\n#SBATCH --job-name=hpcgate-m-g1-e5\n#SBATCH --output=/o/x.out\n"
              "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n#SBATCH --cpus-per-task=8\n"
              "#SBATCH --gpus-per-node=4\n#SBATCH --mem=64G\n#SBATCH --time=0-04:00:00\n"
              "#SBATCH --partition=gpu\n"
              "#SBATCH --account=llm\n#SBATCH --exclusive\nset -e\n#SBATCH --qos=ignored-after-a-command\n")
    assert sbatch_directives(script)["exclusive"] == "true" and "qos" not in sbatch_directives(script)
    spec = JobSpec(name="hpcgate-m-g1-e5", script=script, output_path="/o/x.out", workdir="/w",
                   secret_env={"HPCGATE_JOB_REGISTRATION_TOKEN": "tok"})
    body = submit_body(spec, "v0.0.38")
    job = body["job"]
    assert body["script"] == script
    assert (job["name"], job["nodes"], job["cpus_per_task"], job["gpus_per_node"]) == (
        "hpcgate-m-g1-e5", [2, 2], 8, "4")
    # every field is one that slurmrestd 22.05 (v0.0.38) accepts, with the type it expects
    known = msgspec.json.decode((FIX / "slurmrestd-22.05-job-properties.json").read_bytes())["properties"]
    py_type = {"string": str, "integer": int, "array": list, "object": dict, "boolean": bool}
    for key, value in job.items():
        assert key in known, key
        assert isinstance(value, py_type[known[key]]), (key, value)
    assert (job["memory_per_node"], job["time_limit"]) == (65536, 240)
    assert (job["partition"], job["account"]) == ("gpu", "llm")
    assert job["environment"]["HPCGATE_JOB_REGISTRATION_TOKEN"] == "tok"
    later = submit_body(spec, "v0.0.40")["job"]
    assert "HPCGATE_JOB_REGISTRATION_TOKEN=tok" in later["environment"]
    assert (later["minimum_nodes"], later["tres_per_node"]) == (2, "gres/gpu:4")
    assert later["time_limit"] == {"set": True, "infinite": False, "number": 240}


def test_slurmrest_responses() -> None:
    assert parse_submit_response(200, b'{"job_id": 77, "step_id": "batch", "errors": []}') == "77"
    with pytest.raises(SubmitRejectedError, match="Invalid partition"):
        parse_submit_response(500 - 100, b'{"errors": [{"error": "Invalid partition name specified"}]}')
    jobs = parse_jobs_response(200, (FIX / "squeue-22.05.json").read_bytes(), "hpcgate-rec-")
    assert len(jobs) == 4
    assert cancel_ok(200, b"{}") and cancel_ok(500, b'{"errors":[{"error":"Invalid job id specified"}]}')
    assert not cancel_ok(500, b'{"errors":[{"error":"Access denied"}]}')


class FakeSlurmrestd:
    """Answers submit, list and cancel with recorded bodies, chunked; keeps what it was sent."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *lines = head.decode("latin-1").split("\r\n")
                fields = (ln.partition(":") for ln in lines if ln)
                headers = {k.strip().lower(): v.strip() for k, _, v in fields}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                method, path, _ = request_line.split(" ")
                self.requests.append((f"{method} {path}", headers, body))
                payload = {"POST": b'{"job_id": 77, "step_id": "batch", "errors": []}',
                           "GET": (FIX / "squeue-22.05.json").read_bytes()}.get(method, b"{}")
                pieces = [payload[i:i + 700] for i in range(0, len(payload), 700)]
                chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n" + chunked)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.mark.parametrize("over", ["tcp", "unix"])
async def test_slurmrest_launcher_submits_lists_and_cancels(tmp_path: Path, over: str) -> None:
    fake = FakeSlurmrestd()
    if over == "tcp":
        server = await asyncio.start_server(fake.serve, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    else:
        server = await asyncio.start_unix_server(fake.serve, str(tmp_path / "rest.sock"))
        url = f"unix://{tmp_path}/rest.sock"
    launcher = SlurmRestLauncher(url, "v0.0.38", user="svc", token="jwt-1", timeout_s=5)
    try:
        assert await launcher.submit(_spec(tmp_path, "hpcgate-rec-a", "sleep 1")) == "77"
        assert len(await launcher.observe("hpcgate-rec-")) == 4
        await launcher.cancel("77")
    finally:
        await launcher.close()
        server.close()
    assert [r[0] for r in fake.requests] == [
        "POST /slurm/v0.0.38/job/submit", "GET /slurm/v0.0.38/jobs", "DELETE /slurm/v0.0.38/job/77"]
    submitted = msgspec.json.decode(fake.requests[0][2])
    assert submitted["job"]["name"] == "hpcgate-rec-a"
    for _, headers, _ in fake.requests:
        assert headers["x-slurm-user-token"] == "jwt-1" and headers["x-slurm-user-name"] == "svc"


async def test_slurmrest_launcher_unreachable_is_a_launcher_error(tmp_path: Path) -> None:
    launcher = SlurmRestLauncher(f"unix://{tmp_path}/absent.sock", timeout_s=2)
    try:
        with pytest.raises(LauncherError, match="slurmrestd GET"):
            await launcher.observe("x-")
    finally:
        await launcher.close()


def test_in_flight_from_metrics() -> None:
    text = (b'# HELP vllm:num_requests_running x\nvllm:num_requests_running{model_name="m"} 2.0\n'
            b'vllm:num_requests_waiting{model_name="m"} 3.0\nvllm:num_requests_swapped 9\n')
    assert in_flight_from_metrics(text) == 5
    assert in_flight_from_metrics(b'vllm:num_requests_running{model_name="m"} 0.0\n') == 0
    assert in_flight_from_metrics(b"other_metric 1\n") is None


async def test_local_launcher_finds_a_job_whose_submitter_died_before_recording(tmp_path: Path) -> None:
    state = tmp_path / "state"
    job_id = await LocalLauncher(state).submit(_spec(tmp_path, "crash-a", "sleep 60"))
    # the state a worker killed between starting the process and writing its pid leaves behind
    record = msgspec.json.decode((state / f"{job_id}.json").read_bytes())
    record.update(pid=0, proc_start=0)
    (state / f"{job_id}.json").write_bytes(msgspec.json.encode(record))
    never = {**record, "job_id": "local-000000000000", "name": "crash-b", "started_at": time.time() - 60}
    (state / "local-000000000000.json").write_bytes(msgspec.json.encode(never))

    fresh = LocalLauncher(state, kill_wait_s=0.5)
    def found(js: list[ObservedJob]) -> bool:
        return len(js) == 2 and {j.name for j in js if j.state is JobState.RUNNING} == {"crash-a"}

    jobs = await _until(fresh, "crash-", found)
    by_name = {j.name: j for j in jobs}
    assert by_name["crash-a"].state is JobState.RUNNING
    assert by_name["crash-b"].state is JobState.ENDED  # no process ever wrote its pid
    await fresh.cancel(job_id)
    jobs = await _until(fresh, "crash-a", lambda js: bool(js) and not js[0].alive)
    assert jobs[0].outcome is Outcome.CANCELLED
