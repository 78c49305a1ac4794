"""``hpcgate control register`` (the job side) against the real registration API."""

from __future__ import annotations

import asyncio
import shlex

import asyncpg

from control.jobs import store
from control.store.tokens import hash_registration_token, new_registration_token
from tests.jobs.stack import ControlPlane, free_port
from tests.support.procs import child_env, hpcgate_cmd


async def _run(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *hpcgate_cmd("control", "register", *args), env=child_env(**env),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def _job(plane: ControlPlane, model: str) -> tuple[int, str]:
    status, body = await plane.admin().call("POST", "/admin/models", {"name": model, "max_instances": 1})
    assert status == 201, body
    token = new_registration_token()
    conn = await asyncpg.connect(plane.pg_dsn)
    try:
        job_id, _ = await store.create_job(conn, model_id=body["model_id"], model=model, generation=1,
                                           launcher="slurm", prefix="reg", replaces=None, walltime_s=None,
                                           token_hash=hash_registration_token(token), token_ttl_s=600)
    finally:
        await conn.close()
    return job_id, token


def _env(plane: ControlPlane, job_id: int, token: str, model: str, **extra: str) -> dict[str, str]:
    return {"HPCGATE_CONTROL_URL": plane.control_url, "HPCGATE_JOB_ENDPOINT_JOB_ID": str(job_id),
            "HPCGATE_JOB_REGISTRATION_TOKEN": token, "HPCGATE_JOB_MODEL": model, **extra}


async def test_registers_prints_shell_and_repeats_idempotently(plane: ControlPlane) -> None:
    job_id, token = await _job(plane, "reg-ok")
    env = _env(plane, job_id, token, "reg-ok")
    rc, out, err = await _run(env, "--launcher-job-id", "4242", "--node", "node07", "--format", "shell")
    assert rc == 0, err
    assert token not in out + err  # the one-time token is never printed
    values = dict(line.split("=", 1) for line in out.splitlines())
    assert set(values) == {"HPCG_PORT", "HPCG_ENDPOINT_ID", "HPCG_BEARER_TOKEN"}
    port = int(values["HPCG_PORT"])
    bearer = shlex.split(values["HPCG_BEARER_TOKEN"])[0]
    assert len(bearer) >= 32
    # the same claim again (a job retrying after a lost answer) gets the same port
    rc, out, err = await _run({**env, "HPCGATE_JOB_BEARER_TOKEN": bearer}, "--launcher-job-id", "4242",
                              "--node", "node07")
    assert rc == 0, err
    assert out.strip() == str(port)
    # a different claim with the used token is refused, not retried
    rc, out, err = await _run(env, "--launcher-job-id", "9999", "--node", "node08")
    assert rc == 1 and out == ""
    assert "registration refused: HTTP 409" in err or "registration refused: HTTP 401" in err


async def test_wrong_token_is_refused_with_the_reason(plane: ControlPlane) -> None:
    job_id, _ = await _job(plane, "reg-wrong")
    env = _env(plane, job_id, "x" * 43, "reg-wrong")
    rc, out, err = await _run(env, "--launcher-job-id", "1", "--node", "n1", "--format", "json")
    assert rc == 1 and out == ""
    assert "registration refused: HTTP 401" in err
    assert err.count("retrying") == 0


async def test_unreachable_api_gives_up_after_bounded_retries(plane: ControlPlane) -> None:
    env = _env(plane, 1, "y" * 43, "m", HPCGATE_CONTROL_URL=f"http://127.0.0.1:{free_port()}",
               HPCGATE_JOB_ATTEMPTS="3", HPCGATE_JOB_BACKOFF_S="0.05")
    rc, out, err = await _run(env, "--launcher-job-id", "1", "--node", "n1")
    assert rc == 3 and out == ""
    assert err.count("retrying") == 2 and "gave up after 3 attempts" in err


async def test_missing_settings_are_named(plane: ControlPlane) -> None:
    rc, _, err = await _run({"HPCGATE_CONTROL_URL": plane.control_url}, "--launcher-job-id", "")
    assert rc == 2
    assert "HPCGATE_JOB_ENDPOINT_JOB_ID" in err and "HPCGATE_JOB_REGISTRATION_TOKEN" in err
    assert "--launcher-job-id" in err
    rc, _, err = await _run({"HPCGATE_JOB_ENDPOINT_JOB_ID": "abc"}, "--launcher-job-id", "1")
    assert rc == 2 and "HPCGATE_JOB_ENDPOINT_JOB_ID" in err
