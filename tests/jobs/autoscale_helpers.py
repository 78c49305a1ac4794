"""Helpers of the autoscaler's end-to-end tests (``test_autoscale_e2e.py``,
``test_autoscale_modes.py``): fast daemon settings, the model's state in PostgreSQL, a load of
closed-loop clients straight to its ready engines, and the 1 -> 3 -> 1 flow both modes share."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec

from tests.jobs.stack import ControlPlane, Daemon, db_rows, poll, start_daemon, stopping

FAST_JOBS = {
    "interval_s": "0.3",
    "drain_grace_s": "0.3",
    "backoff_base_s": "0.2",
    "backoff_max_s": "1",
    "cancel_retry_s": "2",
}
FAST_SCALER = {
    "INTERVAL_S": "0.5",
    "QUEUE_TIME_WINDOW_S": "3",
    "SCALE_UP_QUEUE_TIME_S": "0.5",
    "SCALE_UP_SUSTAIN_S": "1",
    "COOLDOWN_S": "1",
    "SCALE_DOWN_STABILISE_S": "3",
    "STANDBY_POLL_S": "0.2",
}
MODEL = "auto-e2e"


async def ready_endpoints(dsn: str, model: str = MODEL) -> list[dict[str, Any]]:
    return await db_rows(
        dsn,
        """SELECT e.node, e.port, e.bearer_token FROM ai_model_endpoints e
                                  JOIN ai_model_endpoint_jobs j USING (endpoint_job_id)
                                  JOIN ai_model_configurations m ON m.model_id = e.model_id
                                 WHERE m.name = $1 AND j.state = 'ready' AND NOT e.draining""",
        model,
    )


async def desired(dsn: str, model: str = MODEL) -> int:
    rows = await db_rows(dsn, "SELECT desired_instances FROM ai_model_configurations WHERE name = $1", model)
    return int(rows[0]["desired_instances"])


async def load(dsn: str, stop: asyncio.Event, clients: int, model: str = MODEL) -> None:
    """``clients`` closed-loop clients, each sending to a random ready instance."""
    endpoints: list[dict[str, Any]] = []

    async def refresh() -> None:
        nonlocal endpoints
        while not stop.is_set():
            endpoints = await ready_endpoints(dsn, model)
            await asyncio.sleep(0.3)

    async def client(http: httpx.AsyncClient) -> None:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 60,
            "ignore_eos": True,
        }
        while not stop.is_set():
            if not endpoints:
                await asyncio.sleep(0.1)
                continue
            ep = random.choice(endpoints)
            with contextlib.suppress(httpx.HTTPError):
                await http.post(
                    f"http://{ep['node']}:{ep['port']}/v1/chat/completions",
                    json=body,
                    headers={"authorization": f"Bearer {ep['bearer_token']}"},
                )

    async with httpx.AsyncClient(timeout=30) as http:
        tasks = [asyncio.ensure_future(refresh())] + [
            asyncio.ensure_future(client(http)) for _ in range(clients)
        ]
        await stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def create_paced_model(plane: ControlPlane, model: str, *, max_instances: int,
                             desired_instances: int) -> None:
    """A model (min 1) of simulators at a GPU-like pace, two sequences at a time: queues form
    under a modest load."""
    status, body = await plane.admin().call(
        "POST",
        "/admin/models",
        {
            "name": model,
            "min_instances": 1,
            "max_instances": max_instances,
            "desired_instances": desired_instances,
            "slurm_resources": {"sim_profile": "paced", "sim_max_num_seqs": 2},
        },
    )
    assert status == 201, body


async def scale_1_to_3_and_back(
    plane: ControlPlane, tmp_path: Path, prefix: str, model: str, **scaler: str
) -> tuple[list[dict[str, Any]], Daemon]:
    """Drive ``model`` (min 1, max 3) from 1 to 3 ready instances under load and back to 1
    desired after it, with an autoscaler of ``FAST_SCALER`` plus ``scaler`` settings; returns
    the decision history and the (stopped) autoscaler with its log."""
    dsn = plane.pg_dsn
    jobs = await plane.start_jobs(
        {"launcher": "local", "job_name_prefix": prefix, **FAST_JOBS, "data_dir": str(tmp_path)}
    )
    scaler_env = plane.env(**{f"HPCGATE_AUTOSCALER_{k}": v for k, v in {**FAST_SCALER, **scaler}.items()})
    daemon = await start_daemon("autoscaler", ["control", "autoscaler"], scaler_env, "autoscaler_started")
    async with stopping(jobs, plane), stopping(daemon, plane):
        await create_paced_model(plane, model, max_instances=3, desired_instances=1)
        await poll(lambda: n_ready(dsn, 1, model), 60, "the first instance ready")

        stop = asyncio.Event()
        driver = asyncio.ensure_future(load(dsn, stop, clients=14, model=model))
        try:
            await poll(lambda: n_ready(dsn, 3, model), 60, "three ready instances under load", interval=0.3)
        except AssertionError as exc:
            status_rows = await db_rows(dsn, "SELECT hold, detail, signals FROM ai_model_autoscaling")
            raise AssertionError(f"{exc}; the autoscaler's last observation: {status_rows}") from None
        finally:
            stop.set()
            await driver
        await poll(lambda: desired_is(dsn, 1, model), 60, "back to one instance after the load",
                   interval=0.3)
        rows = await db_rows(
            dsn,
            """SELECT from_instances, to_instances, reason, source, detail
                 FROM ai_model_scaling_decisions d JOIN ai_model_configurations m USING (model_id)
                WHERE m.name = $1 ORDER BY decision_id""",
            model,
        )
    # later tests in this module share the control plane: leave no instance of this model
    assert (await plane.admin().call("POST", f"/admin/models/{model}/drain"))[0] == 200
    return rows, daemon


async def n_ready(dsn: str, n: int, model: str = MODEL) -> bool:
    return len(await ready_endpoints(dsn, model)) == n


async def desired_is(dsn: str, n: int, model: str = MODEL) -> bool:
    return await desired(dsn, model) == n


async def stream_direct(ep: dict[str, Any], model: str, tokens: int) -> tuple[int, str | None, float, float]:
    """One streamed chat completion straight to an engine: (content chunks, finish reason,
    start and end in wall seconds). A cut stream raises or ends without its finish reason."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
    }
    chunks, finish, start = 0, None, time.time()
    async with httpx.AsyncClient(timeout=60) as http, http.stream(
        "POST",
        f"http://{ep['node']}:{ep['port']}/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {ep['bearer_token']}"},
    ) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            choice = msgspec.json.decode(line[6:])["choices"]
            if choice and choice[0]["delta"].get("content"):
                chunks += 1
            if choice and choice[0].get("finish_reason"):
                finish = choice[0]["finish_reason"]
    return chunks, finish, start, time.time()


async def n_jobs_live(dsn: str, n: int, model: str) -> bool:
    rows = await db_rows(
        dsn,
        "SELECT count(*) AS n FROM ai_model_endpoint_jobs j JOIN ai_model_configurations m USING (model_id) "
        "WHERE m.name = $1 AND j.state <> 'ended'",
        model,
    )
    return int(rows[0]["n"]) == n
