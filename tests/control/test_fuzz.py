"""Schemathesis fuzzes the admin and registration APIs from ``/admin/openapi.json``: no 5xx.

The run is bounded (examples per operation, coverage + fuzzing + stateful phases) so it takes
well under a minute; the API runs against its own database, so the junk it creates is dropped
with it. Besides schemathesis' verdict, the API's log must hold no ``api_internal_error``.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from control.api.app import openapi_document
from tests.control.conftest import Stack
from tests.control.daemons import ADMIN_TOKEN, Daemon, start_api
from tests.support.procs import child_env

SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))


@pytest.fixture(scope="module")
async def api(stack: Stack) -> AsyncIterator[Daemon]:
    # the webhook takes the same token here, so the one Authorization header reaches every route
    daemon = await start_api({**stack.env, "HPCGATE_LOG_LEVEL": "warning",
                              "HPCGATE_API_GRAFANA_WEBHOOK_TOKEN": ADMIN_TOKEN}, stack.tmp)
    stack.api_url = f"http://127.0.0.1:{daemon.port}"
    yield daemon
    await daemon.stop()


def test_openapi_document_covers_every_route() -> None:
    doc = openapi_document()
    assert doc["openapi"].startswith("3.1")
    ops = {(m.upper(), p) for p, methods in doc["paths"].items() for m in methods}
    assert {
        ("POST", "/v1/register"),
        ("POST", "/admin/tenants"),
        ("POST", "/admin/keys/{key_id}/revoke"),
        ("PATCH", "/admin/models/{name}"),
        ("POST", "/admin/jobs/{job_id}/cancel"),
        ("GET", "/admin/usage"),
        ("GET", "/sd/vllm"),
        ("POST", "/hooks/grafana"),
        ("GET", "/admin/models/{name}/scaling"),
        ("PUT", "/admin/models/{name}/schedule"),
    } <= ops
    register = doc["paths"]["/v1/register"]["post"]
    assert "security" not in register and "security" not in doc  # no requirement: open
    assert {"401", "409", "422"} <= set(register["responses"])
    assert doc["paths"]["/admin/tenants"]["post"]["security"] == [{"adminToken": []}]


async def test_schemathesis_finds_no_server_error(stack: Stack, api: Daemon, tmp_path: Path) -> None:
    model_id = await stack.add_model("fuzz-model")  # something real for the stateful phase to find
    await stack.add_job(model_id)
    proc = await asyncio.create_subprocess_exec(
        SCHEMATHESIS,
        "run",
        f"{stack.api_url}/admin/openapi.json",
        "-H",
        f"Authorization: Bearer {ADMIN_TOKEN}",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        "15",
        "--workers",  # one: CPython 3.11.7's ast.parse is not thread-safe (gh-106905), and hypothesis
        "1",  # parses lambdas while schemathesis negates this document's oneOf schemas
        "--phases",
        "coverage,fuzzing,stateful",
        "--generation-database",
        "none",
        "--request-timeout",
        "10",
        "--no-color",
        "--seed",
        "20261120",
        cwd=tmp_path,
        env=child_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 110)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-6000:]
    assert "generated" in text and " failed" not in text.split("SUMMARY")[-1]
    assert not api.events("api_internal_error"), api.events("api_internal_error")[:3]
