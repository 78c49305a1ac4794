"""The operator page: signed login links, the pure renderer, and the page in a real headless
Chromium against a running stack (control API, Endpoint Worker, a simulator engine, a gateway
that books usage), with a screenshot check."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import msgspec
import pytest
from PIL import Image

from control.admin_cli import ui_login_url
from control.api.operator_page import OperatorView, age, render
from control.ui_tickets import LOGIN, SESSION, sign, verify
from control.wire import Endpoint, Job, Model, Usage, UsageRow
from gateway.http_server import bind_socket
from gateway.settings import GatewaySettings
from gateway.worker import Worker
from hpcgate.metrics_text import EngineLoad
from tests.control.conftest import Stack
from tests.control.daemons import ADMIN_TOKEN, KEY_SECRET, Daemon, chat, start_api, start_health
from tests.support.procs import child_env, hpcgate_cmd, wait_until
from tests.support.services import REDIS_URL
from tests.support.sim import sim_process

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)

# ----------------------------------------------------------------------------- tickets (pure)


def test_a_ticket_works_for_its_purpose_until_it_expires() -> None:
    value = sign("admin", LOGIN, 1000.0, 300)
    assert verify("admin", LOGIN, value, 1299.0)
    assert not verify("admin", LOGIN, value, 1300.0)  # expired
    assert not verify("admin", SESSION, value, 1000.0)  # a ticket is not a session
    assert not verify("other", LOGIN, value, 1000.0)  # signed with another (or rotated) token
    assert not verify("", LOGIN, value, 1000.0)
    expiry, mac = value.split(".")
    assert not verify("admin", LOGIN, f"{int(expiry) + 3600}.{mac}", 1000.0)  # expiry changed
    for junk in ("", ".", "abc.def", "1300.", f"{value}x", "x" * 1000, "-5.00"):
        assert not verify("admin", LOGIN, junk, 1000.0), junk


def test_the_login_link_carries_a_ticket_not_the_token() -> None:
    url = ui_login_url("http://ctl:8081/", "s3cret-admin", 1000.0)
    assert url.startswith("http://ctl:8081/ui/login?ticket=") and "s3cret-admin" not in url
    assert verify("s3cret-admin", LOGIN, url.split("ticket=")[1], 1001.0)


# ----------------------------------------------------------------------------- renderer (pure)


def test_age() -> None:
    assert age(None, NOW) == ""
    assert age(NOW - timedelta(seconds=12), NOW) == "12s"
    assert age(NOW - timedelta(minutes=7, seconds=3), NOW) == "7m 3s"
    assert age(NOW - timedelta(hours=2, minutes=5), NOW) == "2h 5m"
    assert age(NOW - timedelta(days=3, hours=4), NOW) == "3d 4h"
    assert age(NOW + timedelta(seconds=5), NOW) == "0s"  # clock skew never shows a negative age


def _view(load: EngineLoad | None, reason: str) -> OperatorView:
    model = msgspec.convert({
        "model_id": 1, "name": "org/<m>", "aliases": [], "engine_args": [], "slurm_template": "t",
        "slurm_resources": {}, "min_instances": 0, "max_instances": 3, "desired_instances": 2,
        "startup_timeout_s": 600, "max_model_len": None, "state": "failed", "state_reason": reason,
        "generation": 1, "live_jobs": 2, "ready_endpoints": 1, "created_at": NOW, "updated_at": NOW,
    }, Model)
    jobs = [msgspec.convert({
        "endpoint_job_id": n, "model": "org/<m>", "generation": 1, "launcher": "slurm",
        "launcher_job_id": f"{4200 + n}", "state": state, "state_reason": None,
        "created_at": NOW - timedelta(minutes=n), "submitted_at": None, "registered_at": None,
        "ready_at": None, "ended_at": None, "endpoint_id": None, "node": None, "port": None,
    }, Job) for n, state in ((7, "ready"), (8, "submitted"))]
    endpoint = msgspec.convert({
        "endpoint_id": 3, "endpoint_job_id": 7, "model": "org/<m>", "node": "gpu01", "port": 8100,
        "url": "http://gpu01:8100", "launcher_job_id": "4207", "job_state": "ready", "capabilities": [],
        "registered_at": NOW, "ready_at": NOW - timedelta(hours=2, minutes=5), "last_probe_at": NOW,
        "consecutive_failures": 2, "draining": False,
    }, Endpoint)
    usage = Usage(since=NOW, until=NOW, rows=[UsageRow(tenant="physics", model="org/<m>", requests=5,
                                                       errors=1, prompt_tokens=120, completion_tokens=80)])
    return OperatorView(generated_at=NOW, models=[model], jobs=jobs, endpoints=[(endpoint, load)],
                        usage=usage)


def test_the_page_shows_each_section_and_escapes_what_it_is_given() -> None:
    page = render(_view(EngineLoad(running=3, waiting=1, kv_usage=0.42), "<script>alert(1)</script>"))
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "org/&lt;m&gt;" in page and "org/<m>" not in page
    # min-max, desired, ready, pending (the submitted job)
    assert '<td class="num">0-3</td><td class="num">2</td><td class="num">1</td><td class="num">1</td>' \
        in page
    assert "<td>4207</td>" in page and "<td>7m 0s</td>" in page  # Slurm job id and age
    assert '<td class="num">3</td><td class="num">1</td><td class="num">42 %</td>' in page
    assert "<td>gpu01:8100</td>" in page and "<td>2h 5m</td>" in page
    assert "<td>physics</td>" in page and '<td class="num">120</td>' in page


def test_an_engine_that_could_not_be_scraped_is_unknown_not_idle() -> None:
    page = render(_view(None, "r"))
    assert page.count('<span class="muted">unknown</span>') == 3  # running, waiting, KV cache


# ----------------------------------------------------------------------------- a running stack

MODEL = "ui/model"


@pytest.fixture(scope="module")
async def daemons(stack: Stack) -> AsyncIterator[list[Daemon]]:
    api = await start_api(stack.env, stack.tmp)
    stack.api_url = f"http://127.0.0.1:{api.port}"
    health = await start_health(stack.env, stack.tmp)
    yield [api, health]
    for daemon in (health, api):
        await daemon.stop()


@pytest.fixture(scope="module")
async def gateway(stack: Stack, daemons: list[Daemon]) -> AsyncIterator[Worker]:
    settings = msgspec.convert({
        "port": 0, "access_log": False, "redis_url": REDIS_URL, "redis_prefix": stack.prefix,
        "database_url": stack.dsn, "key_hash_secret": KEY_SECRET, "usage_flush_s": 0.2,
    }, GatewaySettings)
    worker = Worker(settings)
    await worker.start(bind_socket("127.0.0.1", 0, reuse_port=False))
    yield worker
    await worker.stop()


async def _chromium(*args: str, tmp: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        f"--user-data-dir={tmp / 'profile'}", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, err.decode()[-2000:]
    return out.decode()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="dev.sh installs Debian's chromium")
async def test_the_page_in_a_real_browser_with_live_data(stack: Stack, gateway: Worker,
                                                         tmp_path: Path) -> None:
    model_id = await stack.add_model(MODEL)
    job_id, token = await stack.add_job(model_id)
    status, reg = await stack.register(job_id, token, MODEL, bearer="ui-secret",
                                       launcher_job_id="slurm-77001")
    assert status == 200, reg
    assert (await stack.admin("POST", "/admin/tenants", {"name": "astro"}))[0] == 201
    status, created = await stack.admin("POST", "/admin/tenants/astro/keys", {})
    assert status == 201

    async with sim_process("--port", str(reg["port"]), "--model", MODEL, "--api-key", "ui-secret"):
        await wait_until(lambda: _served(gateway.port, created["key"]), 20, "a request through the gateway")
        async with httpx.AsyncClient(base_url=stack.api_url, timeout=10) as client:
            # without the token: a 401 page that says how to get in; a forged ticket changes nothing
            refused = await client.get("/ui/")
            assert refused.status_code == 401 and "hpcgate admin ui" in refused.text
            forged = await client.get("/ui/login", params={"ticket": sign("guess", LOGIN, 2e9, 60)})
            assert forged.status_code == 401 and "set-cookie" not in forged.headers

            async def usage_shown() -> bool:
                page = await client.get("/ui/", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
                assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
                return "<td>astro</td>" in page.text

            await wait_until(usage_shown, 15, "today's usage to reach the page")

        # the link the CLI prints, opened by a real browser: ticket -> cookie -> the page
        proc = await asyncio.create_subprocess_exec(
            *hpcgate_cmd("admin", "ui"), stdout=asyncio.subprocess.PIPE,
            env=child_env(HPCGATE_CONTROL_URL=stack.api_url, HPCGATE_ADMIN_TOKEN=ADMIN_TOKEN))
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        link = out.decode().strip()
        assert proc.returncode == 0 and link.startswith(f"{stack.api_url}/ui/login?ticket=")

        dom = await _chromium("--dump-dom", link, tmp=tmp_path)
        assert "<h1>hpcgate</h1>" in dom, dom[:500]
        assert f"<td>{MODEL}</td>" in dom and "<td>slurm-77001</td>" in dom  # model, Slurm job id
        assert f"<td>127.0.0.1:{reg['port']}</td>" in dom  # the endpoint, scraped (not "unknown")
        endpoint_row = dom.split(f"<td>127.0.0.1:{reg['port']}</td>")[1].split("</tr>")[0]
        assert "unknown" not in endpoint_row, endpoint_row
        assert "<td>astro</td>" in dom  # usage today

        shot = tmp_path / "operator.png"
        await _chromium(f"--screenshot={shot}", "--window-size=1280,900", link, tmp=tmp_path)
        with Image.open(shot) as image:
            assert image.size == (1280, 900)
            colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
            # A blank or error page has a handful of colours; rendered tables and text have many.
            assert colours is None or len(colours) > 50, f"{len(colours)} colours: the page looks blank"


async def _served(port: int, key: str) -> bool:
    return await chat(port, key, MODEL) == 200
