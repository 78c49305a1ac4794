"""Every ``hpcgate`` command documents itself: help on every option and subcommand, plain text.

The walk starts at :data:`hpcgate.cli.COMMANDS`: a command module either builds its parser with
``build_parser()`` or dispatches to further modules in a ``DAEMONS`` table of the same shape
(``hpcgate control``); a module with neither fails the walk, so a new command cannot skip it.
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
from collections.abc import Iterator

import pytest

from hpcgate.cli import COMMANDS
from tests.support.procs import child_env, hpcgate_cmd

# reStructuredText that argparse would print as is: ``literal``, :role:`target`
MARKUP = re.compile(r"``|:[a-z]+:`")


Walk = Iterator[tuple[str, argparse.ArgumentParser]]


def _parsers(commands: dict[str, tuple[str, str]], prefix: str) -> Walk:
    for name, (module_name, _) in commands.items():
        module = importlib.import_module(module_name)
        if hasattr(module, "build_parser"):
            yield from _walk(f"{prefix} {name}", module.build_parser())
        else:
            assert hasattr(module, "DAEMONS"), f"{module_name}: neither build_parser() nor DAEMONS"
            yield from _parsers(module.DAEMONS, f"{prefix} {name}")


def _walk(path: str, parser: argparse.ArgumentParser) -> Walk:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(f"{path} {name}", sub)


ALL = list(_parsers(COMMANDS, "hpcgate"))


def test_the_walk_reaches_nested_subcommands() -> None:
    names = {path for path, _ in ALL}
    for expected in ("hpcgate admin tenant create", "hpcgate control jobs", "hpcgate db version",
                     "hpcgate bench table", "hpcgate up"):
        assert expected in names


@pytest.mark.parametrize("path,parser", ALL, ids=[path for path, _ in ALL])
def test_every_option_and_subcommand_has_plain_help(path: str, parser: argparse.ArgumentParser) -> None:
    texts = [parser.description or "", parser.epilog or ""]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                assert choice.help, f"{path} {choice.dest}: subcommand without help"
                texts.append(choice.help)
        elif action.option_strings and action.help != argparse.SUPPRESS:
            assert action.help, f"{path} {'/'.join(action.option_strings)}: option without help"
            texts.append(action.help)
    for text in texts:
        assert not MARKUP.search(text), f"{path}: markup in {text!r}"


def test_db_help_names_every_subcommand() -> None:
    out = subprocess.run(hpcgate_cmd("db", "--help"), env=child_env(), capture_output=True, text=True,
                         check=True).stdout
    assert "migrate" in out and "version" in out
