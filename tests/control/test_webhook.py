"""The paper's alert webhook, ``POST /hooks/grafana``, against a real control API and PostgreSQL:
firing, resolved, duplicate, limits and cooldown, bad token, bad payload, unknown model."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.control.conftest import Stack
from tests.control.daemons import ADMIN_TOKEN, Daemon, http, start_api

HOOK_TOKEN = "grafana-hook-token"


@pytest.fixture(scope="module")
async def hook_api(stack: Stack) -> AsyncIterator[Daemon]:
    daemon = await start_api(
        {**stack.env, "HPCGATE_API_GRAFANA_WEBHOOK_TOKEN": HOOK_TOKEN, "HPCGATE_API_WEBHOOK_COOLDOWN_S": "0"},
        stack.tmp,
    )
    stack.api_url = f"http://127.0.0.1:{daemon.port}"
    yield daemon
    await daemon.stop()


def payload(
    model: str,
    status: str = "firing",
    fingerprint: str = "c6eadffa33fcdf37",
    starts_at: str = "2026-11-30T10:00:00Z",
    **labels: str,
) -> dict[str, Any]:
    """Grafana's webhook notification as Grafana sends it (extra fields included)."""
    alert = {
        "status": status,
        "labels": {"alertname": "hpcgate queue time", "model": model, **labels},
        "annotations": {"summary": "queue time above 5 s for 30 s"},
        "startsAt": starts_at,
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://grafana/alerting/1/view",
        "fingerprint": fingerprint,
        "silenceURL": "",
        "dashboardURL": "",
        "panelURL": "",
        "values": {"B": 7.2},
        "valueString": "[ var='B' value=7.2 ]",
    }
    return {
        "receiver": "hpcgate",
        "status": status,
        "orgId": 1,
        "alerts": [alert],
        "groupLabels": {},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://grafana/",
        "version": "1",
        "groupKey": "{}:{}",
        "truncatedAlerts": 0,
        "title": "[FIRING:1]",
        "state": "alerting",
        "message": "...",
    }


async def desired(stack: Stack, name: str) -> int:
    rows = await stack.sql("SELECT desired_instances FROM ai_model_configurations WHERE name = $1", name)
    return int(rows[0]["desired_instances"])


async def test_firing_resolved_and_duplicate_alerts(stack: Stack, hook_api: Daemon) -> None:
    url = f"{stack.api_url}/hooks/grafana"
    await stack.add_model("hook/m", desired=1, aliases=("hook-alias",))
    await stack.sql("UPDATE ai_model_configurations SET max_instances = 2 WHERE name = 'hook/m'")

    status, body = await http("POST", url, payload("hook-alias"), token=HOOK_TOKEN)
    assert status == 200, body
    assert body["alerts"][0]["outcome"] == "applied 1 -> 2"
    assert await desired(stack, "hook/m") == 2
    # Grafana repeats the notification: nothing changes a second time
    status, body = await http("POST", url, payload("hook-alias"), token=HOOK_TOKEN)
    assert (status, body["alerts"][0]["outcome"]) == (200, "duplicate")
    assert await desired(stack, "hook/m") == 2
    status, body = await http("POST", url, payload("hook-alias", status="resolved"), token=HOOK_TOKEN)
    assert body["alerts"][0]["outcome"] == "resolved: no change"
    # a new firing episode at max: refused by the same limits as the autoscaler's
    status, body = await http(
        "POST", url, payload("hook/m", starts_at="2026-11-30T11:00:00Z"), token=HOOK_TOKEN
    )
    assert body["alerts"][0]["outcome"] == "not changed: at max (2)"
    # scale_down, then a cooldown set on the model holds the next change
    status, body = await http(
        "POST",
        url,
        payload("hook/m", starts_at="2026-11-30T12:00:00Z", action="scale_down"),
        token=HOOK_TOKEN,
    )
    assert body["alerts"][0]["outcome"] == "applied 2 -> 1"
    await http(
        "PATCH", f"{stack.api_url}/admin/models/hook%2Fm/scaling", {"cooldown_s": 3600}, token=ADMIN_TOKEN
    )
    status, body = await http(
        "POST", url, payload("hook/m", starts_at="2026-11-30T13:00:00Z"), token=HOOK_TOKEN
    )
    assert body["alerts"][0]["outcome"].startswith("not changed: cooldown")
    assert await desired(stack, "hook/m") == 1

    status, scaling = await http("GET", f"{stack.api_url}/admin/models/hook%2Fm/scaling", token=ADMIN_TOKEN)
    assert status == 200
    assert [
        (d["from_instances"], d["to_instances"], d["source"], d["reason"]) for d in scaling["decisions"]
    ] == [(2, 1, "webhook", "webhook_firing"), (1, 2, "webhook", "webhook_firing")]
    assert "c6eadffa33fcdf37" in scaling["decisions"][1]["detail"]


async def test_bad_token_bad_payload_and_unknown_model_change_nothing(stack: Stack, hook_api: Daemon) -> None:
    url = f"{stack.api_url}/hooks/grafana"
    await stack.add_model("hook/other", desired=1)
    await stack.sql("UPDATE ai_model_configurations SET max_instances = 3 WHERE name = 'hook/other'")
    for token in (None, "wrong", ADMIN_TOKEN):  # the admin token is not the hook's
        status, _ = await http("POST", url, payload("hook/other", fingerprint="f1"), token=token)
        assert status == 401
    bad = copy.deepcopy(payload("hook/other", fingerprint="f2"))
    del bad["alerts"][0]["fingerprint"]
    status, body = await http("POST", url, bad, token=HOOK_TOKEN)
    assert status == 422 and "fingerprint" in body["message"]
    status, body = await http(
        "POST", url, payload("hook/other", fingerprint="f3", action="explode"), token=HOOK_TOKEN
    )
    assert status == 422 and "action='explode'" in body["message"]
    status, body = await http("POST", url, {"status": "firing", "alerts": []}, token=HOOK_TOKEN)
    assert status == 422
    # one alert names an unknown model: the whole notification is refused, the other not applied
    two = payload("hook/other", fingerprint="f4")
    two["alerts"].append(payload("no/such/model", fingerprint="f5")["alerts"][0])
    status, body = await http("POST", url, two, token=HOOK_TOKEN)
    assert status == 404 and "no/such/model" in body["message"]
    assert await desired(stack, "hook/other") == 1
    # nothing was recorded either: the same alert applies once the payload is fixed
    status, body = await http("POST", url, payload("hook/other", fingerprint="f4"), token=HOOK_TOKEN)
    assert body["alerts"][0]["outcome"] == "applied 1 -> 2"
