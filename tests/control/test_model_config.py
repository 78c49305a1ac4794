"""A model's launch configuration is checked when it is created or changed: what the Job
Worker's renderer would refuse later is a 422 naming the field now, and nothing is stored."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.control.conftest import Stack
from tests.control.daemons import Daemon, start_api

IMAGE = "/shared/images/vllm.sif"
SITE_TEMPLATE = """#!/bin/bash
{{sbatch}}
set -euo pipefail
{{setup}}
{{register}}
exec {{hpcgate}} sim --host 0.0.0.0 --port "$HPCG_PORT" --model {{model}}
"""


@pytest.fixture(scope="module")
async def api(stack: Stack) -> AsyncIterator[Daemon]:
    site = stack.tmp / "site-templates"
    site.mkdir()
    (site / "site-sim.sbatch").write_text(SITE_TEMPLATE)
    (site / "broken.sbatch").write_text("#!/bin/bash\n{{sbatch}}\n{{no_such_placeholder}}\n")
    daemon = await start_api({**stack.env, "HPCGATE_API_TEMPLATE_DIRS": str(site)}, stack.tmp)
    stack.api_url = f"http://127.0.0.1:{daemon.port}"
    yield daemon
    await daemon.stop()


async def refused(stack: Stack, method: str, path: str, body: dict[str, Any]) -> tuple[str, str]:
    status, answer = await stack.admin(method, path, body)
    assert status == 422, (status, answer)
    assert answer["error"] == "validation_error"
    return answer["message"], answer["path"]


@pytest.mark.parametrize(
    ("fields", "path", "words"),
    [
        ({"slurm_resources": {"gpus": 1}}, "$.slurm_resources.gpus",
         ["unknown field 'gpus'", "gpus_per_node"]),
        ({"slurm_template": "vllm", "slurm_resources": {"image": IMAGE}}, "$.slurm_resources",
         ["template vllm is for one GPU on one node", "gpus_per_node=0"]),
        ({"slurm_template": "vllm", "slurm_resources": {"gpus_per_node": 1}}, "$.slurm_resources.image",
         ["needs slurm_resources.image"]),
        ({"slurm_template": "vllm-tp", "slurm_resources": {"gpus_per_node": 1, "image": IMAGE}},
         "$.slurm_resources", ["vllm-tp"]),
        ({"slurm_template": "no-such"}, "$.slurm_template", ["no-such", "sim, vllm"]),
        ({"slurm_template": "Upper.Case"}, "$.slurm_template", ["not a valid template name"]),
        ({"slurm_template": "broken"}, "$.slurm_template", ["unknown placeholders", "no_such_placeholder"]),
        ({"slurm_resources": {"time": "4 hours"}}, "$.slurm_resources.time", ["malformed Slurm time"]),
        ({"slurm_resources": {"time": "0:30"}}, "$.slurm_resources.time", ["under one minute"]),
        ({"slurm_resources": {"partition": "gpu;rm"}}, "$.slurm_resources.partition", ["matching regex"]),
        ({"engine_args": ["--a\nb"]}, "$.engine_args[0]", ["newline"]),
    ],
)
async def test_create_refuses_what_the_worker_would_refuse(
    stack: Stack, api: Daemon, fields: dict[str, Any], path: str, words: list[str]
) -> None:
    message, where = await refused(stack, "POST", "/admin/models", {"name": "door-bad", **fields})
    assert where == path, message
    for word in words:
        assert word in message
    status, _ = await stack.admin("GET", "/admin/models/door-bad")
    assert status == 404  # nothing stored


async def test_valid_configurations_are_accepted(stack: Stack, api: Daemon) -> None:
    for name, fields in {
        "door-sim": {},
        "door-vllm": {"slurm_template": "vllm", "slurm_resources": {"gpus_per_node": 1, "image": IMAGE,
                                                                    "partition": "gpu", "time": "4:00:00"}},
        "door-tp": {"slurm_template": "vllm-tp", "slurm_resources": {"gpus_per_node": 4, "image": IMAGE}},
        "door-site": {"slurm_template": "site-sim"},  # found in api.template_dirs
    }.items():
        status, body = await stack.admin("POST", "/admin/models", {"name": name, **fields})
        assert status == 201, body


async def test_update_checks_the_configuration_as_it_would_become(stack: Stack, api: Daemon) -> None:
    status, before = await stack.admin("POST", "/admin/models", {"name": "door-upd"})
    assert status == 201, before
    # the template alone is wrong for the stored resources (no GPU, no image)
    message, where = await refused(stack, "PATCH", "/admin/models/door-upd", {"slurm_template": "vllm"})
    assert where == "$.slurm_resources" and "gpus_per_node=0" in message
    message, where = await refused(stack, "PATCH", "/admin/models/door-upd",
                                   {"slurm_resources": {"gpus": 2}})
    assert where == "$.slurm_resources.gpus"
    status, after = await stack.admin("GET", "/admin/models/door-upd")
    assert after["generation"] == before["generation"] and after["slurm_template"] == "sim"
    # template and resources together: accepted; then resources alone must still fit vllm
    status, body = await stack.admin("PATCH", "/admin/models/door-upd", {
        "slurm_template": "vllm", "slurm_resources": {"gpus_per_node": 1, "image": IMAGE}})
    assert status == 200 and body["generation"] == before["generation"] + 1, body
    message, _ = await refused(stack, "PATCH", "/admin/models/door-upd",
                               {"slurm_resources": {"image": IMAGE}})
    assert "gpus_per_node=0" in message
    # scaling alone is not a launch change and needs no check
    status, body = await stack.admin("PATCH", "/admin/models/door-upd", {"max_instances": 2})
    assert status == 200, body
