"""Every admin operation through ``hpcgate admin`` against a real control API and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from control.admin_cli import build_parser
from control.autoscale.store import apply_decision
from control.store.db import Database, InvalidError
from tests.control.conftest import Stack
from tests.control.daemons import ADMIN_TOKEN, Daemon, free_port
from tests.support.procs import child_env, hpcgate_cmd


async def run_admin(stack: Stack, *args: str, url: str | None = None) -> tuple[int, str, str]:
    env = child_env(HPCGATE_CONTROL_URL=url or stack.api_url, HPCGATE_ADMIN_TOKEN=ADMIN_TOKEN)
    proc = await asyncio.create_subprocess_exec(
        *hpcgate_cmd("admin", *args), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode(), err.decode()


async def admin_json(stack: Stack, *args: str) -> Any:
    rc, out, err = await run_admin(stack, "--json", *args)
    assert rc == 0, err
    return json.loads(out)


async def test_tenants(stack: Stack, api: Daemon) -> None:
    created = await admin_json(
        stack, "tenant", "create", "cli-t1", "--allowed-models", "a,b", "--max-concurrent", "4"
    )
    assert created["allowed_models"] == ["a", "b"] and created["max_concurrent_requests"] == 4
    rc, out, _ = await run_admin(stack, "tenant", "list")
    assert rc == 0 and "cli-t1" in out and "MAX_CONCURRENT_REQUESTS" in out
    assert (await admin_json(stack, "tenant", "show", "cli-t1"))["enabled"] is True
    updated = await admin_json(
        stack, "tenant", "update", "cli-t1", "--all-models", "--tokens-per-minute", "900"
    )
    assert updated["allowed_models"] is None and updated["tokens_per_minute"] == 900
    assert (await admin_json(stack, "tenant", "disable", "cli-t1"))["enabled"] is False
    assert (await admin_json(stack, "tenant", "enable", "cli-t1"))["enabled"] is True

    rc, _, err = await run_admin(stack, "tenant", "create", "cli-t1")
    assert rc == 1 and "409 conflict" in err
    rc, _, err = await run_admin(stack, "tenant", "create", "Not Valid")
    assert rc == 1 and "422 validation_error" in err and "$.name" in err
    rc, _, err = await run_admin(stack, "tenant", "show", "nobody")
    assert rc == 1 and "404 not_found" in err


async def test_keys(stack: Stack, api: Daemon) -> None:
    await admin_json(stack, "tenant", "create", "cli-keys")
    rc, out, _ = await run_admin(stack, "key", "create", "cli-keys", "--description", "ci")
    assert rc == 0 and "shown only once" in out
    key = out.split()[1]
    assert key.startswith("hpg_")
    created = await admin_json(stack, "key", "create", "cli-keys", "--expires-in", "3600")
    key_id = created["api_key"]["key_id"]
    assert created["api_key"]["expires_at"] is not None

    listed = await admin_json(stack, "key", "list", "--prefix", key[:12])
    assert [k["prefix"] for k in listed] == [key[:12]]
    assert len(await admin_json(stack, "key", "list", "--tenant", "cli-keys")) == 2

    assert (await admin_json(stack, "key", "expire", str(key_id), "--never"))["expires_at"] is None
    later = await admin_json(stack, "key", "expire", str(key_id), "--at", "2999-01-01T00:00:00Z")
    assert later["expires_at"].startswith("2999-01-01")
    revoked = await admin_json(stack, "key", "revoke", str(key_id))
    assert revoked["active"] is False and revoked["revoked_at"] is not None
    assert len(await admin_json(stack, "key", "list", "--tenant", "cli-keys")) == 1
    assert len(await admin_json(stack, "key", "list", "--tenant", "cli-keys", "--all")) == 2

    rc, _, err = await run_admin(stack, "key", "revoke", "999999")
    assert rc == 1 and "404" in err
    rc, _, err = await run_admin(stack, "key", "expire", str(key_id), "--at", "yesterday")
    assert rc == 1 and "422" in err


async def test_models(stack: Stack, api: Daemon) -> None:
    created = await admin_json(
        stack,
        "model",
        "create",
        "org/cli-model",
        "--alias",
        "cli-alias",
        "--engine-arg=--max-num-seqs=8",
        "--resource",
        "cpus_per_task=2",
        "--resource",
        "partition=gpu",
        "--max",
        "3",
        "--desired",
        "1",
        "--startup-timeout",
        "600",
        "--max-model-len",
        "4096",
    )
    assert created["aliases"] == ["cli-alias"] and created["engine_args"] == ["--max-num-seqs=8"]
    assert created["slurm_resources"] == {"cpus_per_task": 2, "partition": "gpu"}
    assert created["generation"] == 1

    scaled = await admin_json(stack, "model", "scale", "org/cli-model", "2")
    assert scaled["desired_instances"] == 2 and scaled["generation"] == 1  # scaling is not a new config
    updated = await admin_json(stack, "model", "update", "org/cli-model", "--engine-arg=--max-num-seqs=16")
    assert updated["generation"] == 2
    assert (await admin_json(stack, "model", "drain", "org/cli-model"))["state"] == "draining"
    assert (await admin_json(stack, "model", "activate", "org/cli-model"))["state"] == "active"
    assert (await admin_json(stack, "model", "show", "org/cli-model"))["max_model_len"] == 4096
    rc, out, _ = await run_admin(stack, "model", "list")
    assert rc == 0 and "org/cli-model" in out

    rc, _, err = await run_admin(stack, "model", "scale", "org/cli-model", "9")
    assert rc == 1 and "422" in err
    rc, _, err = await run_admin(stack, "model", "create", "other", "--alias", "cli-alias")
    assert rc == 1 and "409" in err
    rc, _, err = await run_admin(stack, "model", "create", "cli-alias")
    assert rc == 1 and "409" in err


async def test_jobs_endpoints_and_usage(stack: Stack, api: Daemon) -> None:
    model_id = await stack.add_model("cli/jobs")
    job_a, token_a = await stack.add_job(model_id)
    job_b, _ = await stack.add_job(model_id)
    status, reg = await stack.register(job_a, token_a, "cli/jobs")
    assert status == 200

    jobs = await admin_json(stack, "job", "list", "--model", "cli/jobs")
    assert {j["endpoint_job_id"] for j in jobs} == {job_a, job_b}
    assert (await admin_json(stack, "job", "show", str(job_a)))["port"] == reg["port"]
    endpoints = await admin_json(stack, "endpoint", "list", "--model", "cli/jobs")
    assert [e["endpoint_id"] for e in endpoints] == [reg["endpoint_id"]]
    rc, out, _ = await run_admin(stack, "endpoint", "list")
    assert rc == 0 and f"127.0.0.1:{reg['port']}" in out

    drained = await admin_json(stack, "endpoint", "drain", str(reg["endpoint_id"]))
    assert drained["draining"] is True and drained["job_state"] == "draining"
    assert (await admin_json(stack, "job", "cancel", str(job_b)))["state"] == "cancelling"
    assert (await admin_json(stack, "job", "drain", str(job_a)))["state"] == "draining"  # idempotent
    assert [j["state"] for j in await admin_json(stack, "job", "list", "--state", "cancelling")] == [
        "cancelling"
    ]

    await stack.sql("UPDATE ai_model_endpoint_jobs SET state = 'ended' WHERE endpoint_job_id = $1", job_b)
    rc, _, err = await run_admin(stack, "job", "cancel", str(job_b))
    assert rc == 1 and "409" in err and "ended" in err
    assert job_b not in {j["endpoint_job_id"] for j in await admin_json(stack, "job", "list")}
    assert job_b in {j["endpoint_job_id"] for j in await admin_json(stack, "job", "list", "--all")}

    await admin_json(stack, "tenant", "create", "cli-usage")
    await stack.sql(
        """INSERT INTO usage_records (tenant_id, model, bucket_start, requests, prompt_tokens,
                                         completion_tokens)
           SELECT tenant_id, 'cli/jobs', b, 2, 10, 20 FROM identity_tenants,
                  unnest($1::timestamptz[]) b
            WHERE name = 'cli-usage'""",
        [datetime(2026, 1, 1, 0, 0, tzinfo=UTC), datetime(2026, 1, 1, 0, 1, tzinfo=UTC),
         datetime(2026, 2, 1, tzinfo=UTC)],
    )
    usage = await admin_json(
        stack,
        "usage",
        "--tenant",
        "cli-usage",
        "--since",
        "2026-01-01T00:00:00Z",
        "--until",
        "2026-01-02T00:00:00Z",
    )
    assert usage["rows"] == [
        {
            "tenant": "cli-usage",
            "model": "cli/jobs",
            "requests": 4,
            "errors": 0,
            "prompt_tokens": 20,
            "completion_tokens": 40,
        }
    ]
    rc, out, _ = await run_admin(
        stack, "usage", "--since", "2026-01-01T00:00:00Z", "--until", "2026-03-01T00:00:00Z"
    )
    assert rc == 0 and "cli-usage" in out and "60" in out
    rc, _, err = await run_admin(
        stack, "usage", "--since", "2026-02-01T00:00:00Z", "--until", "2026-01-01T00:00:00Z"
    )
    assert rc == 1 and "422" in err


async def test_cli_errors_are_one_line_and_exit_1(stack: Stack, api: Daemon) -> None:
    rc, _, err = await run_admin(stack, "tenant", "list", url=f"http://127.0.0.1:{free_port()}")
    assert rc == 1 and err.startswith("hpcgate admin: error: unreachable")
    env_wrong = child_env(HPCGATE_CONTROL_URL=stack.api_url, HPCGATE_ADMIN_TOKEN="wrong")
    proc = await asyncio.create_subprocess_exec(
        *hpcgate_cmd("admin", "tenant", "list"), env=env_wrong, stderr=asyncio.subprocess.PIPE
    )
    _, err_b = await proc.communicate()
    assert proc.returncode == 1 and b"401 unauthorized" in err_b


async def test_refusals_are_plain_and_name_the_values(stack: Stack, api: Daemon) -> None:
    """No database text (it quotes the failing row, hash included) in an answer or a log."""
    await admin_json(stack, "tenant", "create", "cli-plain")
    rc, _, err = await run_admin(stack, "tenant", "create", "cli-plain")
    assert (rc, err.strip()) == (1, "hpcgate admin: error: 409 conflict: tenant 'cli-plain' already exists")
    await admin_json(stack, "model", "create", "cli-plain-model")
    rc, _, err = await run_admin(stack, "model", "create", "cli-plain-model")
    assert err.strip().endswith("409 conflict: model 'cli-plain-model' already exists")
    rc, _, err = await run_admin(stack, "model", "scale", "cli-plain-model", "2")
    assert rc == 1 and "desired_instances=2 is not between min_instances=0 and max_instances=1" in err

    key_id = (await admin_json(stack, "key", "create", "cli-plain"))["api_key"]["key_id"]
    (row,) = await stack.sql("SELECT encode(key_hash, 'hex') AS h FROM identity_tenant_authentications"
                             " WHERE authentication_id = $1", key_id)
    rc, _, err = await run_admin(stack, "key", "expire", str(key_id), "--at", "2020-01-01T00:00:00Z")
    assert rc == 1 and "422 validation_error: expiry must be in the future" in err
    for text in (err, api.log_path.read_text()):
        assert row["h"] not in text and "\\x" + row["h"] not in text
        assert "violates" not in text and "Failing row" not in text and "duplicate key" not in text


async def test_constraint_errors_reaching_the_database_are_mapped_plainly(stack: Stack, api: Daemon) -> None:
    """The backstop: a row the store did not pre-check, refused by a constraint."""
    await admin_json(stack, "tenant", "create", "cli-backstop")
    key_id = (await admin_json(stack, "key", "create", "cli-backstop"))["api_key"]["key_id"]
    db = Database(stack.dsn)
    await db.open()
    try:
        with pytest.raises(InvalidError) as caught:
            async with db.transaction() as conn:
                await conn.execute("UPDATE identity_tenant_authentications SET expires_at = created_at"
                                   " - interval '1 day' WHERE authentication_id = $1", key_id)
    finally:
        await db.close()
    assert str(caught.value) == "a key's expiry must be after its creation"
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


# ----------------------------------------------------------------------------- command-line conveniences


@pytest.mark.parametrize("argv", [
    ["--json", "tenant", "list"],
    ["tenant", "--json", "list"],
    ["tenant", "list", "--json"],
    ["usage", "--json", "--tenant", "t"],
])
def test_json_is_accepted_anywhere(argv: list[str]) -> None:
    assert build_parser().parse_args(argv).json is True


def test_json_is_off_unless_given() -> None:
    assert build_parser().parse_args(["tenant", "list"]).json is False


def test_times_accept_a_date_as_midnight_utc(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["usage", "--since", "2026-11-29", "--until", "2026-11-30T06:00:00Z"])
    assert (args.since, args.until) == ("2026-11-29T00:00:00Z", "2026-11-30T06:00:00Z")
    expire = build_parser().parse_args(["key", "expire", "1", "--at", "2035-01-01"])
    assert expire.at == "2035-01-01T00:00:00Z"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["usage", "--since", "2026-13-01"])
    assert "expected a date (2026-11-29)" in capsys.readouterr().err


def test_tenant_limits_take_none_and_refuse_zero(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["tenant", "update", "t", "--max-concurrent", "none"])
    assert args.max_concurrent is None and not hasattr(args, "tokens_per_minute")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["tenant", "update", "t", "--tokens-per-minute", "0"])
    assert "or none for no limit; got '0'" in capsys.readouterr().err


async def test_usage_since_a_date(stack: Stack, api: Daemon) -> None:
    usage = await admin_json(stack, "usage", "--since", "2026-11-29", "--until", "2026-11-30")
    assert usage["since"].startswith("2026-11-29T00:00:00")
    assert usage["until"].startswith("2026-11-30T00:00:00")


async def test_tenant_limit_cleared_and_tenant_deleted(stack: Stack, api: Daemon) -> None:
    await admin_json(stack, "tenant", "create", "cli-del", "--max-concurrent", "4",
                     "--tokens-per-minute", "9")
    cleared = await admin_json(stack, "tenant", "update", "cli-del", "--max-concurrent", "none")
    assert cleared["max_concurrent_requests"] is None and cleared["tokens_per_minute"] == 9
    key_id = (await admin_json(stack, "key", "create", "cli-del"))["api_key"]["key_id"]
    rc, _, err = await run_admin(stack, "tenant", "delete", "cli-del")
    assert rc == 1 and "409 conflict: tenant 'cli-del' still has 1 active key(s); revoke them first" in err
    await admin_json(stack, "key", "revoke", str(key_id))
    assert (await admin_json(stack, "tenant", "delete", "cli-del"))["name"] == "cli-del"
    rc, _, err = await run_admin(stack, "tenant", "show", "cli-del")
    assert rc == 1 and "404 not_found" in err
    assert not await stack.sql("SELECT 1 FROM identity_tenant_authentications WHERE authentication_id = $1",
                               key_id)


async def test_model_deleted_only_without_live_jobs(stack: Stack, api: Daemon) -> None:
    await admin_json(stack, "model", "create", "cli-del-model", "--alias", "cli-del-alias")
    model_id = (await admin_json(stack, "model", "show", "cli-del-model"))["model_id"]
    live, _ = await stack.add_job(model_id)
    await stack.add_job(model_id, state="ended")
    rc, _, err = await run_admin(stack, "model", "delete", "cli-del-model")
    assert rc == 1 and "409 conflict: model 'cli-del-model' still has 1 live job(s)" in err
    await stack.sql("UPDATE ai_model_endpoint_jobs SET state = 'ended' WHERE endpoint_job_id = $1", live)
    assert (await admin_json(stack, "model", "delete", "cli-del-model"))["name"] == "cli-del-model"
    rc, _, err = await run_admin(stack, "model", "show", "cli-del-model")
    assert rc == 1 and "404 not_found" in err
    assert not await stack.sql("SELECT 1 FROM ai_model_endpoint_jobs WHERE model_id = $1", model_id)
    await admin_json(stack, "model", "create", "cli-del-alias")  # the alias is free again


async def test_model_scaling_shows_the_history_and_takes_overrides(stack: Stack, api: Daemon) -> None:
    await admin_json(stack, "model", "create", "cli/scaled", "--max", "3", "--desired", "1", "--min", "1")
    [row] = await stack.sql("SELECT model_id FROM ai_model_configurations WHERE name = 'cli/scaled'")
    conn = await asyncpg.connect(stack.dsn)
    try:
        assert await apply_decision(conn, row["model_id"], 1, 2, reason="queue_time_sustained",
                                    source="autoscaler", detail="queue time 7.2 s > 5 s for 30 s",
                                    signals=None, keep=10)
    finally:
        await conn.close()
    rc, out, err = await run_admin(stack, "model", "scaling", "cli/scaled")
    assert rc == 0, err
    assert "min 1  desired 2  max 3" in out
    header = next(line for line in out.splitlines() if line.startswith("TIME"))
    assert header.split() == ["TIME", "FROM", "->", "TO", "REASON", "SOURCE", "WHY"]
    assert "1 -> 2" in out and "queue time 7.2 s > 5 s for 30 s" in out

    shown = await admin_json(stack, "model", "scaling", "cli/scaled", "--set", "scale_up_queue_time_s=2.5",
                             "--set", "cooldown_s=10")
    assert shown["policy"] == {"scale_up_queue_time_s": 2.5, "cooldown_s": 10}
    shown = await admin_json(stack, "model", "scaling", "cli/scaled", "--unset", "cooldown_s",
                             "--set", "early_scale_up=true")
    assert shown["policy"] == {"scale_up_queue_time_s": 2.5, "early_scale_up": True}
    shown = await admin_json(stack, "model", "scaling", "cli/scaled", "--unset", "early_scale_up")
    assert shown["policy"] == {"scale_up_queue_time_s": 2.5}
    assert [d["reason"] for d in shown["decisions"]] == ["queue_time_sustained"]

    # out of range and unknown thresholds: 422 naming the field, nothing stored
    rc, _, err = await run_admin(stack, "model", "scaling", "cli/scaled", "--set", "scale_up_queue_time_s=-1")
    assert rc == 1 and "422" in err and "scale_up_queue_time_s" in err
    rc, _, err = await run_admin(stack, "model", "scaling", "cli/scaled", "--set", "bogus=1")
    assert rc == 1 and "422" in err and "bogus" in err
    shown = await admin_json(stack, "model", "scaling", "cli/scaled")
    assert shown["policy"] == {"scale_up_queue_time_s": 2.5}
    rc, _, err = await run_admin(stack, "model", "scaling", "nobody")
    assert rc == 1 and "404" in err
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"{stack.api_url}/metrics")).text
    assert ('hpcgate_autoscaler_decisions_total{model="cli/scaled",reason="queue_time_sustained",'
            'source="autoscaler"} 1.0') in text


async def test_model_schedule_is_validated_stored_and_shown(stack: Stack, api: Daemon) -> None:
    await admin_json(stack, "model", "create", "cli/sched", "--max", "4")
    shown = await admin_json(stack, "model", "schedule", "cli/sched",
                             "weekdays 08:00-19:00 Europe/Berlin: min 2; daily 00:00-24:00 UTC: max 1")
    assert shown["schedule"].startswith("weekdays 08:00-19:00 Europe/Berlin: min 2")
    # one of the two rules is in force at any hour: which one depends on the wall clock
    in_force = {"weekdays 08:00-19:00 Europe/Berlin: min 2": (2, 4), "daily 00:00-24:00 UTC: max 1": (0, 1)}
    assert (shown["effective_min"], shown["effective_max"]) == in_force[shown["schedule_rule"]]
    rc, out, _ = await run_admin(stack, "model", "scaling", "cli/sched")
    assert rc == 0 and "schedule   in force:" in out and "Europe/Berlin" in out

    rc, _, err = await run_admin(stack, "model", "schedule", "cli/sched",
                                 "weekdays 08:00-19:00 Mars/Base: min 2")
    assert rc == 1 and "422" in err and "unknown time zone 'Mars/Base'" in err
    assert (await admin_json(stack, "model", "scaling", "cli/sched"))["schedule"].startswith("weekdays")
    cleared = await admin_json(stack, "model", "schedule", "cli/sched", "--clear")
    assert cleared["schedule"] is None and (cleared["effective_min"], cleared["effective_max"]) == (0, 4)


async def test_usage_export_periods_csv_and_quotas(stack: Stack, api: Daemon) -> None:
    created = await admin_json(stack, "tenant", "create", "cli-quota", "--monthly-quota", "1000",
                               "--model-limit", "big/model=concurrent=1,tpm=500",
                               "--model-limit", "small=tpm=9")
    assert created["monthly_token_quota"] == 1000
    assert created["model_limits"] == {"big/model": {"max_concurrent_requests": 1, "tokens_per_minute": 500},
                                       "small": {"max_concurrent_requests": None, "tokens_per_minute": 9}}
    rc, out, _ = await run_admin(stack, "tenant", "show", "cli-quota")
    assert rc == 0 and "big/model=concurrent=1/tpm=500" in out
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    await stack.sql(
        """INSERT INTO usage_records (tenant_id, model, bucket_start, requests, prompt_tokens,
                                     completion_tokens)
           SELECT tenant_id, 'big/model', b, 1, 100, 200 FROM identity_tenants, unnest($1::timestamptz[]) b
            WHERE name = 'cli-quota'""",
        [now, now + timedelta(minutes=1),
         datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 1, 2, tzinfo=UTC)],
    )
    by_day = await admin_json(stack, "usage", "--tenant", "cli-quota", "--since", "2025-01-01",
                              "--until", "2025-01-03", "--period", "day")
    assert [(r["period_start"][:10], r["prompt_tokens"]) for r in by_day["rows"]] == [
        ("2025-01-01", 100), ("2025-01-02", 100)]
    (quota,) = by_day["quotas"]
    assert (quota["used"], quota["left"]) == (600, 400)  # this month's two buckets, whatever the range
    rc, csv_text, err = await run_admin(stack, "usage", "--tenant", "cli-quota", "--since", "2025-01-01",
                                        "--until", "2025-02-01", "--period", "month", "--csv")
    assert rc == 0, err
    assert csv_text.splitlines() == [
        "period_start,tenant,model,requests,errors,prompt_tokens,completion_tokens,total_tokens",
        "2025-01-01T00:00:00Z,cli-quota,big/model,2,0,200,400,600"]
    rc, out, _ = await run_admin(stack, "usage", "--tenant", "cli-quota")
    assert rc == 0 and "monthly quotas" in out and "400" in out
    rc, _, err = await run_admin(stack, "usage", "--csv", "--json")
    assert rc == 2 and "exclude" in err
    status, body = await stack.admin("GET", "/admin/usage?period=week")
    assert status in {400, 422}, body
    updated = await admin_json(stack, "tenant", "update", "cli-quota", "--no-model-limits", "--monthly-quota",
                               "none")
    assert updated["model_limits"] == {} and updated["monthly_token_quota"] is None
