"""A model's ``slurm_resources`` (a JSON object in PostgreSQL), validated into a typed struct.

This is outside input (written through the admin API by people): every field is checked here,
with a message that names the field, before anything reaches a shell script. Names that end up
in ``#SBATCH`` lines (partition, account, qos, constraint) are restricted to a conservative
character set so nothing can break out of the directive; free text (environment values, engine
arguments) is always shell-quoted by the renderer, never interpolated raw.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec

from control.launchers.slurm_parse import SlurmParseError, parse_time

SlurmName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")]
Constraint = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.&|()\[\]*:-]{1,128}$")]
Memory = Annotated[str, msgspec.Meta(pattern=r"^[1-9][0-9]{0,9}[KMGT]?$")]
EnvName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
ModuleName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_./+-]{0,127}$")]
AbsPath = Annotated[str, msgspec.Meta(pattern=r"^/[^\x00\n]{0,1023}$")]
ModelPath = Annotated[str, msgspec.Meta(pattern=r"^[^\x00\n\r]{1,1024}$")]
_RESERVED_ENV = re.compile(r"^(HPCGATE_|HPCG_|SLURM_)")


class ResourceError(ValueError):
    """The model's resources or template are invalid; the message names the field. Terminal:
    the worker marks the model failed with this reason instead of retrying; the admin API
    answers 422 with it. ``path`` is the JSON path of the offending field in a model body."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class SlurmResources(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    partition: SlurmName | None = None
    account: SlurmName | None = None
    qos: SlurmName | None = None
    constraint: Constraint | None = None
    nodes: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 1
    gpus_per_node: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0
    cpus_per_task: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 1
    mem: Memory | None = None  # per node, sbatch --mem syntax: 64G, 128000M
    time: str | None = None  # sbatch --time syntax; the walltime (None: the partition's default)
    exclusive: bool = False
    image: AbsPath | None = None  # Apptainer image (.sif) for the vLLM templates
    model_path: ModelPath | None = None  # what vLLM loads; default: the model's name
    modules: tuple[ModuleName, ...] = ()  # `module load` lines, in order
    env: dict[EnvName, Annotated[str, msgspec.Meta(max_length=4096)]] = msgspec.field(default_factory=dict)
    sim_profile: SlurmName | None = None  # `hpcgate sim --profile` for the sim template
    # `hpcgate sim --max-num-seqs` for the sim template: a small value makes requests queue in the
    # engine at low load (autoscaling tests and demos)
    sim_max_num_seqs: Annotated[int, msgspec.Meta(ge=1, le=100_000)] | None = None


def parse_resources(raw: Mapping[str, Any] | str | bytes) -> tuple[SlurmResources, int | None]:
    """Validate ``slurm_resources``; returns it and the walltime in seconds (None: unlimited)."""
    try:
        if isinstance(raw, (str, bytes)):
            res = msgspec.json.decode(raw, type=SlurmResources)
        else:
            res = msgspec.convert(dict(raw), SlurmResources)
    except msgspec.ValidationError as exc:
        raise _validation_error(exc) from None
    except msgspec.DecodeError as exc:
        raise ResourceError(f"slurm_resources is not a JSON object: {exc}", "$.slurm_resources") from None
    for name, value in res.env.items():
        where = f"$.slurm_resources.env.{name}"
        if _RESERVED_ENV.match(name):
            reason = "HPCGATE_*, HPCG_* and SLURM_* are reserved"
            raise ResourceError(f"slurm_resources.env.{name}: {reason}", where)
        if "\x00" in value:
            raise ResourceError(f"slurm_resources.env.{name}: contains a NUL byte", where)
    walltime = None
    if res.time is not None:
        try:
            walltime = parse_time(res.time)
        except SlurmParseError as exc:
            raise ResourceError(f"slurm_resources.time: {exc}", "$.slurm_resources.time") from None
        if walltime is not None and walltime < 60:
            raise ResourceError(f"slurm_resources.time: {res.time!r} is under one minute",
                                "$.slurm_resources.time")
    return res, walltime


_AT_RE = re.compile(r"\s*-\s*at `\$\.?([^`]*)`")
_UNKNOWN_RE = re.compile(r"unknown field `([^`]*)`")
RESOURCE_FIELDS = tuple(f.name for f in msgspec.structs.fields(SlurmResources))


def _validation_error(exc: msgspec.ValidationError) -> ResourceError:
    """msgspec's message, with the field named as ``slurm_resources.x`` and, for an unknown
    field, the fields that exist (``gpus`` is a common guess for ``gpus_per_node``)."""
    text = str(exc)
    at = _AT_RE.search(text)
    unknown = _UNKNOWN_RE.search(text)
    sub = at.group(1) if at else (unknown.group(1) if unknown else "")
    reason = _AT_RE.sub("", text)
    if unknown:
        reason = f"unknown field {unknown.group(1)!r} (known: {', '.join(RESOURCE_FIELDS)})"
    field = f"slurm_resources.{sub}" if sub else "slurm_resources"
    return ResourceError(f"{field}: {reason}", f"$.{field}")


def parse_engine_args(raw: Any) -> tuple[str, ...]:
    """``engine_args``: a JSON array of strings without NUL or newlines."""
    if isinstance(raw, (str, bytes)):
        try:
            raw = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise ResourceError(f"engine_args is not JSON: {exc}", "$.engine_args") from None
    if not isinstance(raw, list) or not all(isinstance(a, str) for a in raw):
        raise ResourceError("engine_args must be an array of strings", "$.engine_args")
    for i, arg in enumerate(raw):
        if "\x00" in arg or "\n" in arg or "\r" in arg:
            raise ResourceError(f"engine_args[{i}]: contains a NUL or newline", f"$.engine_args[{i}]")
    return tuple(raw)
