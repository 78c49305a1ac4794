"""The admin examples operators copy are the ones that work: every ``sh`` block of
docs/admin-api.md runs, in order, as one bash script against a live control API, and the
examples in ``hpcgate admin model create --help`` name real resource fields."""

from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path

from control.jobs.resources import RESOURCE_FIELDS
from tests.control.conftest import Stack
from tests.control.daemons import ADMIN_TOKEN, Daemon
from tests.support.procs import HPCGATE, child_env, hpcgate_cmd

DOC = Path(__file__).resolve().parents[2] / "docs" / "admin-api.md"
_SH_BLOCK = re.compile(r"^```sh\n(.*?)^```", re.MULTILINE | re.DOTALL)


def doc_script() -> str:
    blocks = _SH_BLOCK.findall(DOC.read_text())
    assert blocks and all("hpcgate admin" in b for b in blocks), "docs/admin-api.md lost its examples"
    return "set -euo pipefail\n" + "\n".join(blocks)


async def test_the_admin_examples_of_the_docs_run(stack: Stack, api: Daemon) -> None:
    env = child_env(HPCGATE_CONTROL_URL=stack.api_url, HPCGATE_ADMIN_TOKEN=ADMIN_TOKEN,
                    PATH=f"{Path(HPCGATE).parent}:/usr/bin:/bin")
    proc = await asyncio.create_subprocess_exec(
        "bash", "-x", "-c", doc_script(), env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-3000:]
    # the session did what it says
    status, model = await stack.admin("GET", "/admin/models/meta-llama%2FLlama-3.1-8B-Instruct")
    assert status == 200 and model["slurm_template"] == "vllm" and model["desired_instances"] == 3
    assert model["engine_args"] == ["--max-num-seqs=128"] and model["aliases"] == ["llama"]
    assert "meta-llama/Llama-3.1-8B-Instruct" in out.decode()
    status, panel = await stack.admin("GET", "/admin/tribunals/panel")
    assert status == 200 and panel["peer_review"] is True and panel["rounds"] == 1
    assert [j["temperature"] for j in panel["jurors"]] == [0.2, 0.9]
    status, keys = await stack.admin("GET", "/admin/keys?tenant=acme&all=true")
    assert status == 200 and len(keys) == 1 and keys[0]["active"] is False


def test_the_resource_examples_of_the_help_are_real_fields() -> None:
    help_text = subprocess.run(hpcgate_cmd("admin", "model", "create", "--help"), capture_output=True,
                               text=True, check=True, env=child_env(COLUMNS="200")).stdout
    examples = re.findall(r"(?:^|[\s,(])([a-z_]+)=[^\s,]+", help_text, re.MULTILINE)
    assert examples, help_text
    assert set(examples) <= set(RESOURCE_FIELDS), examples
