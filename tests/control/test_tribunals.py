"""Tribunal configuration: admin API and ``hpcgate admin tribunal``, validation, publishing.

A tribunal is stored only if its models exist and its prompts use known placeholders (422
with the reason otherwise); a stored one reaches the published endpoint table (the Endpoint
Worker republishes on the NOTIFY of migration 0900).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from tests.control.conftest import Stack
from tests.control.daemons import Daemon, start_health
from tests.control.test_admin_cli import admin_json, run_admin
from tests.support.procs import wait_until


@pytest.fixture(scope="module")
async def models(stack: Stack, api: Daemon) -> None:
    await stack.add_model("tm1", desired=0, aliases=("tm1-alias",))
    await stack.add_model("tm2", desired=0)


@pytest.fixture(scope="module")
async def health(stack: Stack, api: Daemon) -> AsyncIterator[Daemon]:
    daemon = await start_health(stack.env, stack.tmp)
    yield daemon
    await daemon.stop()


async def test_create_show_update_delete_through_the_cli(stack: Stack, api: Daemon, models: None) -> None:
    created = await admin_json(stack, "tribunal", "create", "cli-t", "--juror", "tm1@0.2", "--juror",
                               "tm1@0.9", "--juror", "tm1-alias", "--judge", "tm2", "--rounds", "1",
                               "--quorum", "2", "--peer-review")
    assert created["model"] == "tribunal/cli-t"
    assert created["jurors"] == [{"model": "tm1", "temperature": 0.2}, {"model": "tm1", "temperature": 0.9},
                                 {"model": "tm1-alias"}]
    assert created["peer_review"] is True and created["rounds"] == 1
    assert "{answers}" in created["judge_prompt"]  # the shipped default
    rc, out, _ = await run_admin(stack, "tribunal", "list")
    assert rc == 0 and "tribunal/cli-t" in out and "tm1@0.2,tm1@0.9,tm1-alias" in out
    config = stack.tmp / "tribunal.json"
    config.write_text(json.dumps({"jurors": [{"model": "tm1", "system_prompt": "You are terse."}],
                                  "judge_prompt": "Pick the best of {answered}: {answers}"}))
    updated = await admin_json(stack, "tribunal", "update", "cli-t", "--config", str(config), "--quorum", "1",
                               "--fallback-judge", "tm1", "--show-deliberation")
    assert updated["jurors"] == [{"model": "tm1", "system_prompt": "You are terse."}]
    assert updated["quorum"] == 1 and updated["fallback_judge"] == "tm1" and updated["show_deliberation"]
    assert updated["rounds"] == 1  # not given: kept
    assert (await admin_json(stack, "tribunal", "show", "cli-t"))["judge_prompt"].startswith("Pick the best")
    assert (await admin_json(stack, "tribunal", "delete", "cli-t"))["name"] == "cli-t"
    rc, _, err = await run_admin(stack, "tribunal", "show", "cli-t")
    assert rc == 1 and "404 not_found" in err


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"jurors": [{"model": "nope"}], "judge": "tm2"}, ["unknown model(s): 'nope'"]),
        ({"jurors": [{"model": "tm1"}], "judge": "nope2"}, ["unknown model(s): 'nope2'"]),
        ({"jurors": [{"model": "tm1"}], "judge": "tm2", "judge_prompt": "{answers} {secret}"},
         ["judge_prompt: unknown placeholder {secret}", "{answered}"]),
        ({"jurors": [{"model": "tm1"}], "judge": "tm2", "revise_prompt": "{critique} {peers}"},
         ["revise_prompt: unknown placeholder {peers}"]),
        ({"jurors": [{"model": "tm1"}], "judge": "tm2", "review_prompt": "{answer"}, ["review_prompt:"]),
        ({"jurors": [{"model": "tm1"}], "judge": "tm2", "judge_prompt": "{answers!r}"}, ["no format spec"]),
        ({"jurors": [{"model": "tm1"}], "judge": "tm2", "quorum": 2}, ["quorum=2 exceeds the 1 juror"]),
        ({"jurors": [], "judge": "tm2"}, ["$.jurors"]),
        ({"jurors": [{"model": "tm1", "temperature": 9}], "judge": "tm2"}, ["temperature"]),
        ({"jurors": [{"model": "tm1"}], "judge": "tm2", "surprise": 1}, ["surprise"]),
        ({"jurors": [{"model": "tm1"}], "judge": "tm2", "fallback_judge": "tm2"},
         ["fallback_judge is the judge"]),
    ],
)
async def test_bad_configurations_are_refused_with_the_reason(
        stack: Stack, api: Daemon, models: None, body: dict[str, object], words: list[str]) -> None:
    status, answer = await stack.admin("POST", "/admin/tribunals", {"name": "bad", **body})
    assert status in (400, 422), (status, answer)
    text = json.dumps(answer)
    for w in words:
        assert w in text, (w, answer)
    status, _ = await stack.admin("GET", "/admin/tribunals/bad")
    assert status == 404  # nothing stored


async def test_update_is_validated_as_a_whole(stack: Stack, api: Daemon, models: None) -> None:
    status, _ = await stack.admin("POST", "/admin/tribunals", {"name": "whole", "jurors": [{"model": "tm1"}],
                                                              "judge": "tm2"})
    assert status == 201
    status, answer = await stack.admin("PATCH", "/admin/tribunals/whole", {"quorum": 3})
    assert status == 422 and "quorum=3" in answer["message"]
    status, answer = await stack.admin("PATCH", "/admin/tribunals/whole", {"judge": "gone"})
    assert status == 422 and "'gone'" in answer["message"]
    status, answer = await stack.admin("POST", "/admin/tribunals",
                                       {"name": "whole", "jurors": [{"model": "tm1"}], "judge": "tm2"})
    assert status == 409


async def test_published_with_the_endpoint_table(stack: Stack, api: Daemon, models: None,
                                                 health: Daemon) -> None:
    status, _ = await stack.admin("POST", "/admin/tribunals", {"name": "pub", "jurors": [{"model": "tm1"}],
                                                              "judge": "tm2", "rounds": 2})

    async def published(rounds: int | None) -> bool:
        table = await stack.endpoint_table()
        found = {t.name: t for t in table.tribunals} if table is not None else {}
        if rounds is None:
            return "pub" not in found
        return "pub" in found and found["pub"].rounds == rounds

    assert status == 201
    await wait_until(lambda: published(2), 10, "the tribunal in the endpoint table")
    await stack.admin("PATCH", "/admin/tribunals/pub", {"rounds": 0})
    await wait_until(lambda: published(0), 10, "the change in the endpoint table")
    await stack.admin("DELETE", "/admin/tribunals/pub")
    await wait_until(lambda: published(None), 10, "the tribunal gone from the endpoint table")
