"""The ``hpcgate`` console script: one subcommand per component, imported lazily.

Each component exposes ``main(argv: list[str]) -> int`` in the module named in
:data:`COMMANDS`; importing only the chosen one keeps ``hpcgate sim`` starting in well under a
second and keeps the data plane free of control-plane imports. A :class:`SettingsError` from
any component ends the process with a one-line message and exit code 2. A process started by
``hpcgate up`` dies with it (:func:`hpcgate.lifecycle.die_with_parent`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

from hpcgate.lifecycle import die_with_parent
from hpcgate.settings import SettingsError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("hpcgate.up", "run the whole stack on this machine until Ctrl-C"),
    "gateway": ("gateway.main", "the data plane: OpenAI-compatible streaming gateway"),
    "control": ("control.main", "control-plane daemons: api | jobs | health | autoscaler"),
    "admin": ("control.admin_cli", "client of the admin API (tenants, keys, models, jobs, usage)"),
    "db": ("control.db.cli", "database maintenance: migrate | version"),
    "sim": ("bench.sim.main", "a vLLM-compatible engine simulator"),
    "bench": ("bench.main", "load driver, Table 1 reproduction and plots"),
}


def _usage() -> str:
    lines = ["usage: hpcgate COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'hpcgate COMMAND --help' for the options of one command."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0 if args else 2
    if args[0] == "--version":
        from hpcgate import __version__

        print(__version__)
        return 0
    die_with_parent()  # under `hpcgate up`: end with it, even when it is killed with SIGKILL
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"hpcgate: error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    entry: Callable[[list[str]], int] = module.main
    try:
        return entry(rest)
    except SettingsError as exc:
        print(f"hpcgate {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
