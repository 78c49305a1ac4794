"""Render a model's job script from a template under ``slurm/templates/`` (pure, no I/O but reads).

Templates are plain bash with ``{{name}}`` placeholders (a tiny renderer, so bash's own ``$VAR``
needs no escaping and a site can copy a template and edit it without learning a template
language). Every value substituted
into a template is either built here from validated fields or shell-quoted (``shlex.quote``):
nothing from the database reaches the script unquoted. Layout rules (which template fits which
GPU layout) are checked here, so a wrong combination fails with a reason, not on the cluster.

Variables every template can use: ``sbatch`` (the ``#SBATCH`` block), ``setup`` (environment,
modules), ``register`` (the registration call; afterwards ``$HPCG_PORT``, ``$HPCG_BEARER_TOKEN``
and ``$HPCG_ENDPOINT_ID`` are set, and the script has exited non-zero with a reason if it
failed), ``hpcgate``, ``model``, ``model_path``, ``image``, ``engine_args``, ``nodes``,
``gpus_per_node``, ``sim_args``.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from control.jobs.resources import ResourceError, SlurmResources, parse_engine_args, parse_resources
from control.launchers.slurm_parse import format_time

TEMPLATE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
TEMPLATE_SUFFIX = ".sbatch"
_PLACEHOLDER_RE = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")
BUILTIN_TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "slurm" / "templates"

# Which layouts the built-in templates accept; site templates are not constrained.
_LAYOUTS: dict[str, str] = {
    "vllm": "one GPU on one node",
    "vllm-image": "one GPU on one node",
    "vllm-tp": "several GPUs on one node (tensor parallel)",
    "vllm-multinode": "several nodes (Ray head and workers)",
}


class JobContext(msgspec.Struct, frozen=True, kw_only=True):
    name: str  # the launcher job name (see control.jobs.naming)
    model: str
    endpoint_job_id: int
    generation: int
    template: str
    resources: SlurmResources
    engine_args: tuple[str, ...]
    control_url: str
    hpcgate_bin: str
    output_path: str
    walltime_s: int | None


def _check_layout(template: str, res: SlurmResources) -> None:
    where = "$.slurm_resources"
    if template in ("vllm", "vllm-image") and (res.nodes != 1 or res.gpus_per_node != 1):
        raise ResourceError(
            f"template {template} is for {_LAYOUTS['vllm']}; got nodes={res.nodes} "
            f"gpus_per_node={res.gpus_per_node} (set slurm_resources.gpus_per_node=1, "
            "or use vllm-tp or vllm-multinode)", where
        )
    if template == "vllm-tp" and (res.nodes != 1 or res.gpus_per_node < 2):
        raise ResourceError(
            f"template vllm-tp is for {_LAYOUTS['vllm-tp']}; got nodes={res.nodes} "
            f"gpus_per_node={res.gpus_per_node}", where
        )
    if template == "vllm-multinode" and (res.nodes < 2 or res.gpus_per_node < 1):
        raise ResourceError(
            f"template vllm-multinode is for {_LAYOUTS['vllm-multinode']}; got nodes={res.nodes} "
            f"gpus_per_node={res.gpus_per_node}", where
        )
    if template in _LAYOUTS and res.image is None:
        raise ResourceError(f"template {template} needs slurm_resources.image (an Apptainer image path)",
                            "$.slurm_resources.image")


def sbatch_block(ctx: JobContext) -> str:
    res = ctx.resources
    lines = [
        f"--job-name={ctx.name}",
        f"--output={ctx.output_path}",
        f"--nodes={res.nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={res.cpus_per_task}",
    ]
    if res.gpus_per_node:
        lines.append(f"--gpus-per-node={res.gpus_per_node}")
    if res.mem:
        lines.append(f"--mem={res.mem}")
    if ctx.walltime_s is not None:
        lines.append(f"--time={format_time(ctx.walltime_s)}")
    for flag, value in (("partition", res.partition), ("account", res.account), ("qos", res.qos),
                        ("constraint", res.constraint)):
        if value:
            lines.append(f"--{flag}={value}")
    if res.exclusive or res.nodes > 1:
        lines.append("--exclusive")
    # The name and output path are built from validated parts; quote the path anyway.
    return "\n".join(f"#SBATCH {line}" for line in lines)


def setup_block(ctx: JobContext) -> str:
    q = shlex.quote
    lines = [
        "# Settings inherited from the submitting process are not this job's: drop them, keep the token.",
        'for _v in $(compgen -e); do case "$_v" in HPCGATE_JOB_REGISTRATION_TOKEN) ;; '
        'HPCGATE_*) unset "$_v" ;; esac; done',
        f"export HPCGATE_CONTROL_URL={q(ctx.control_url)}",
        f"export HPCGATE_JOB_ENDPOINT_JOB_ID={ctx.endpoint_job_id}",
        f"export HPCGATE_JOB_MODEL={q(ctx.model)}",
    ]
    lines += [f"export {name}={q(value)}" for name, value in sorted(ctx.resources.env.items())]
    lines += [f"module load {q(m)}" for m in ctx.resources.modules]
    return "\n".join(lines)


def register_block(ctx: JobContext, hpcgate: str | None = None) -> str:
    """The registration step; ``hpcgate`` is the (quoted) command that runs the client, by
    default the node's ``hpcgate_bin``."""
    hpcgate = hpcgate or shlex.quote(ctx.hpcgate_bin)
    return "\n".join([
        'HPCG_JOB_ID="${SLURM_JOB_ID:-${HPCG_LOCAL_JOB_ID:-}}"',
        'HPCG_NODE="${SLURMD_NODENAME:-${HPCG_LOCAL_NODE:-$(hostname)}}"',
        'echo "hpcgate: registering endpoint job $HPCGATE_JOB_ENDPOINT_JOB_ID (launcher job $HPCG_JOB_ID) '
        'on $HPCG_NODE"',
        f'if ! HPCG_REG=$({hpcgate} control register --launcher-job-id "$HPCG_JOB_ID" --node "$HPCG_NODE" '
        "--format shell); then",
        '  echo "hpcgate: registration failed, exiting (see the error above)" >&2',
        "  exit 3",
        "fi",
        'eval "$HPCG_REG"',
        "unset HPCGATE_JOB_REGISTRATION_TOKEN HPCG_REG",
        'echo "hpcgate: registered as endpoint $HPCG_ENDPOINT_ID on $HPCG_NODE:$HPCG_PORT"',
    ])


def find_template(name: str, search: tuple[Path, ...]) -> Path:
    if not TEMPLATE_NAME_RE.match(name):
        raise ResourceError(f"slurm_template {name!r}: not a valid template name ([a-z0-9_-], max 64)",
                            "$.slurm_template")
    for directory in (*search, BUILTIN_TEMPLATE_DIR):
        path = directory / f"{name}{TEMPLATE_SUFFIX}"
        if path.is_file():
            return path
    raise ResourceError(f"slurm_template {name!r}: no {name}{TEMPLATE_SUFFIX} in {[str(d) for d in search]} "
                        f"or the built-in templates ({', '.join(builtin_templates())})", "$.slurm_template")


def builtin_templates() -> list[str]:
    found = BUILTIN_TEMPLATE_DIR.glob(f"*{TEMPLATE_SUFFIX}")
    return sorted(p.name.removesuffix(TEMPLATE_SUFFIX) for p in found)


def render_text(template_text: str, ctx: JobContext) -> str:
    """Substitute ``ctx`` into a template's text; an unknown ``{{name}}`` is an error."""
    _check_layout(ctx.template, ctx.resources)
    res = ctx.resources
    q = shlex.quote
    sim_args = ["--profile", res.sim_profile] if res.sim_profile else []
    values = {
        "sbatch": sbatch_block(ctx),
        "setup": setup_block(ctx),
        "register": register_block(ctx),
        # the client of the image (slurm/templates/hpcgate-vllm.def): nothing installed on the node
        "register_in_image": register_block(ctx, f"apptainer exec {q(res.image or '')} hpcgate"),
        "hpcgate": q(ctx.hpcgate_bin),
        "model": q(ctx.model),
        "model_path": q(res.model_path or ctx.model),
        "image": q(res.image or ""),
        "engine_args": " ".join(q(a) for a in ctx.engine_args),
        "nodes": str(res.nodes),
        "gpus_per_node": str(res.gpus_per_node),
        "sim_args": " ".join(q(a) for a in sim_args),
        "name": ctx.name,
    }
    unknown = sorted({m.group(1) for m in _PLACEHOLDER_RE.finditer(template_text)} - values.keys())
    if unknown:
        raise ResourceError(f"slurm_template {ctx.template!r} uses unknown placeholders {unknown}",
                            "$.slurm_template")
    return _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], template_text)


def render(ctx: JobContext, search: tuple[Path, ...] = ()) -> str:
    return render_text(find_template(ctx.template, search).read_text(), ctx)


class LaunchConfig(msgspec.Struct, frozen=True, kw_only=True):
    """A model's launch configuration as stored (``slurm_resources`` and ``engine_args`` raw)."""

    model: str
    generation: int = 1
    template: str
    resources: Mapping[str, Any] | str | bytes
    engine_args: Any


def prepare(config: LaunchConfig, search: tuple[Path, ...], *, control_url: str,
            hpcgate_bin: str) -> tuple[str, JobContext]:
    """Validate a launch configuration into the template's text and a render-ready context
    (name and ids are filled in per job); ResourceError names the field.

    The one check of a configuration: the admin API runs it when a model is created or
    changed (422), the Job Worker before it submits anything, so what the API accepts renders.
    """
    resources, walltime = parse_resources(config.resources)
    engine_args = parse_engine_args(config.engine_args)
    try:
        text = find_template(config.template, search).read_text()
    except OSError as exc:
        raise ResourceError(f"slurm_template {config.template!r}: {exc}", "$.slurm_template") from None
    ctx = JobContext(name="", model=config.model, endpoint_job_id=0, generation=config.generation,
                     template=config.template, resources=resources, engine_args=engine_args,
                     control_url=control_url, output_path="", walltime_s=walltime, hpcgate_bin=hpcgate_bin)
    render_text(text, msgspec.structs.replace(ctx, name="check", endpoint_job_id=1, output_path="/dev/null"))
    return text, ctx
