"""Job templates rendered for the three GPU layouts and the simulator; resource validation."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest

from control.jobs.naming import endpoint_job_id_of, job_name
from control.jobs.render import JobContext, builtin_templates, render, render_text
from control.jobs.resources import ResourceError, parse_engine_args, parse_resources


def _ctx(template: str, resources: dict[str, Any], engine_args: tuple[str, ...] = ()) -> JobContext:
    res, walltime = parse_resources(resources)
    return JobContext(
        name=job_name("hpcgate", "meta-llama/Llama-3.1-8B", 3, 42),
        model="meta-llama/Llama-3.1-8B",
        endpoint_job_id=42,
        generation=3,
        template=template,
        resources=res,
        engine_args=engine_args,
        control_url="http://ctl.example:8081",
        hpcgate_bin="/opt/hpcgate/bin/hpcgate",
        output_path="/scratch/hpcgate/jobs/x.out",
        walltime_s=walltime,
    )


def _sbatch(text: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in text.splitlines() if line.startswith("#SBATCH ")]


def _check_bash_syntax(text: str) -> None:
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_one_gpu_layout() -> None:
    text = render(_ctx("vllm", {"gpus_per_node": 1, "partition": "gpu", "account": "llm", "time": "4:00:00",
                                "mem": "64G", "cpus_per_task": 8, "image": "/images/vllm.sif"},
                       ("--max-model-len", "8192", "--dtype", "bfloat16")))
    assert _sbatch(text) == [
        "--job-name=hpcgate-meta-llama_Llama-3.1-8B-g3-e42", "--output=/scratch/hpcgate/jobs/x.out",
        "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=8", "--gpus-per-node=1", "--mem=64G",
        "--time=0-04:00:00", "--partition=gpu", "--account=llm",
    ]
    assert ("exec apptainer exec --nv /images/vllm.sif \\\n  vllm serve meta-llama/Llama-3.1-8B "
            "--served-model-name meta-llama/Llama-3.1-8B --host 0.0.0.0 --port \"$HPCG_PORT\"") in text
    assert "--max-model-len 8192 --dtype bfloat16" in text
    assert "--tensor-parallel-size" not in text
    assert 'export VLLM_API_KEY="$HPCG_BEARER_TOKEN"' in text
    assert "/opt/hpcgate/bin/hpcgate control register" in text
    assert "{{" not in text
    _check_bash_syntax(text)
    # the directives come before the first command, or Slurm ignores them
    lines = text.splitlines()
    first_cmd = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert all(i < first_cmd for i, line in enumerate(lines) if line.startswith("#SBATCH"))


def test_tensor_parallel_layout() -> None:
    text = render(_ctx("vllm-tp", {"gpus_per_node": 4, "partition": "gpu", "image": "/images/vllm.sif"}))
    assert "--gpus-per-node=4" in _sbatch(text) and "--nodes=1" in _sbatch(text)
    assert "--tensor-parallel-size 4" in text
    assert "--pipeline-parallel-size" not in text and "ray start" not in text
    _check_bash_syntax(text)


def test_multinode_layout() -> None:
    text = render(_ctx("vllm-multinode", {"nodes": 2, "gpus_per_node": 4, "image": "/images/vllm.sif",
                                          "time": "1-00:00:00"}))
    directives = _sbatch(text)
    assert "--nodes=2" in directives and "--gpus-per-node=4" in directives and "--exclusive" in directives
    assert "--time=1-00:00:00" in directives
    assert "ray start --head" in text and 'ray start --address="$HEAD_ADDR:$RAY_PORT"' in text
    assert "--tensor-parallel-size 4 --pipeline-parallel-size 2" in text
    assert "--distributed-executor-backend ray" in text
    assert "TOTAL_GPUS=$(( 2 * 4 ))" in text
    _check_bash_syntax(text)


def test_sim_template_and_quoting() -> None:
    text = render(_ctx("sim", {"env": {"NOTE": "it's $HOME; rm -rf /"}, "sim_profile": "fast"}))
    assert ("exec /opt/hpcgate/bin/hpcgate sim --host 0.0.0.0 --port \"$HPCG_PORT\" "
            "--model meta-llama/Llama-3.1-8B") in text
    assert "--profile fast" in text
    assert "export NOTE='it'\"'\"'s $HOME; rm -rf /'" in text
    assert "--gpus-per-node" not in text
    _check_bash_syntax(text)


@pytest.mark.parametrize(
    ("template", "resources", "message"),
    [
        ("vllm", {"gpus_per_node": 2, "image": "/i.sif"}, "template vllm is for one GPU"),
        ("vllm-tp", {"gpus_per_node": 1, "image": "/i.sif"}, "vllm-tp is for several GPUs"),
        ("vllm-multinode", {"nodes": 1, "gpus_per_node": 4, "image": "/i.sif"}, "several nodes"),
        ("vllm", {"gpus_per_node": 1}, "needs slurm_resources.image"),
        ("no-such", {}, "no no-such.sbatch"),
        ("../etc/passwd", {}, "not a valid template name"),
    ],
)
def test_layout_errors(template: str, resources: dict[str, Any], message: str) -> None:
    with pytest.raises(ResourceError, match=message):
        render(_ctx(template, resources))


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        ({"partition": "gpu; rm -rf /"}, "partition"),
        ({"partition": "a b"}, "partition"),
        ({"gpus_per_node": -1}, "gpus_per_node"),
        ({"nodes": 0}, "nodes"),
        ({"time": "4 hours"}, "malformed Slurm time"),
        ({"time": "1:75:00"}, "out of range"),
        ({"time": "0:30"}, "under one minute"),
        ({"mem": "lots"}, "mem"),
        ({"gpus": 1}, "unknown field 'gpus'"),
        ({"env": {"HPCGATE_JOB_MODEL": "x"}}, "reserved"),
        ({"env": {"BAD NAME": "x"}}, "env"),
        ({"image": "relative.sif"}, "image"),
    ],
)
def test_resource_validation(resources: dict[str, Any], message: str) -> None:
    with pytest.raises(ResourceError, match=message):
        parse_resources(resources)


def test_engine_args_validation() -> None:
    assert parse_engine_args(["--a", "1"]) == ("--a", "1")
    assert parse_engine_args('["--x"]') == ("--x",)
    for bad in ({"a": 1}, [1, 2], ["ok", "line\nbreak"], "not json"):
        with pytest.raises(ResourceError):
            parse_engine_args(bad)


def test_unknown_placeholder() -> None:
    with pytest.raises(ResourceError, match="unknown placeholders"):
        render_text("#!/bin/bash\n{{sbatch}}\necho {{nope}}\n", _ctx("custom", {}))


def test_job_names() -> None:
    name = job_name("hpcgate", "org/model:v1 big", 7, 123)
    assert name == "hpcgate-org_model_v1_big-g7-e123"
    assert endpoint_job_id_of("hpcgate", name) == 123
    assert endpoint_job_id_of("other", name) is None
    assert endpoint_job_id_of("hpcgate", "hpcgate-whatever") is None


_SECRETS = ("HPCG_BEARER_TOKEN", "HPCGATE_JOB_REGISTRATION_TOKEN")
_LAYOUT_OF = {"sim": {}, "vllm": {"gpus_per_node": 1, "image": "/i.sif"},
              "vllm-image": {"gpus_per_node": 1, "image": "/i.sif"},
              "vllm-tp": {"gpus_per_node": 4, "image": "/i.sif"},
              "vllm-multinode": {"nodes": 2, "gpus_per_node": 4, "image": "/i.sif"}}


@pytest.mark.parametrize("template", sorted(_LAYOUT_OF))
def test_no_secret_reaches_a_command_line(template: str) -> None:
    """A secret is only ever exported (environment) or unset, never an argument: every user of
    a node can read every command line."""
    text = render(_ctx(template, _LAYOUT_OF[template]))
    uses = []
    for line in text.splitlines():
        for var in _SECRETS:
            if f"${var}" in line or f"${{{var}" in line:
                uses.append(line)
                assert re.fullmatch(rf'\s*export [A-Z_]+="\${var}"', line), line
    assert uses, "the template no longer hands the server its bearer token"


def test_every_builtin_template_is_covered() -> None:
    assert builtin_templates() == sorted(_LAYOUT_OF)


def test_the_image_template_registers_with_the_client_of_its_image() -> None:
    text = render(_ctx("vllm-image", {"gpus_per_node": 1, "image": "/shared/img/hpcgate vllm.sif"}))
    assert "HPCG_REG=$(apptainer exec '/shared/img/hpcgate vllm.sif' hpcgate control register " in text
    assert "exec apptainer exec --nv '/shared/img/hpcgate vllm.sif'" in text
    with pytest.raises(ResourceError, match="template vllm-image is for one GPU on one node"):
        render(_ctx("vllm-image", {"gpus_per_node": 2, "image": "/i.sif"}))
    with pytest.raises(ResourceError, match=r"needs slurm_resources\.image"):
        render(_ctx("vllm-image", {"gpus_per_node": 1}))
