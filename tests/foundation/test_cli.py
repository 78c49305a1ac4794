"""The console script: subcommand dispatch and structured logs."""

from __future__ import annotations

import io
import subprocess
import sys

import orjson

from hpcgate.cli import COMMANDS
from hpcgate.logs import get_logger, setup_logging
from tests.support.procs import child_env, hpcgate_cmd


def test_help_lists_every_component() -> None:
    out = subprocess.run(hpcgate_cmd("--help"), capture_output=True, text=True, check=True).stdout
    for name in COMMANDS:
        assert f"  {name} " in out


def test_unknown_command_exits_2() -> None:
    proc = subprocess.run(hpcgate_cmd("frobnicate"), env=child_env(), capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown command 'frobnicate'" in proc.stderr


def test_every_command_module_has_main() -> None:
    import importlib

    for module, _ in COMMANDS.values():
        assert callable(importlib.import_module(module).main), module


def test_log_lines_are_json_with_event_and_fields() -> None:
    stream = io.StringIO()
    setup_logging("info", stream=stream)
    log = get_logger("hpcgate.test")
    log.info("endpoint_ready", endpoint_id=3, old="probing", new="ready")
    log.debug("not_shown")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    doc = orjson.loads(lines[0])
    assert doc["event"] == "endpoint_ready"
    assert doc["endpoint_id"] == 3 and doc["new"] == "ready" and doc["level"] == "info"


def test_bench_without_its_extra_says_what_to_install() -> None:
    """The base install has no numpy/matplotlib/psutil: ``hpcgate bench`` says so in one line."""
    hide = "import sys; sys.modules['numpy'] = None; from hpcgate.cli import main; "
    for args in (["run", "--base-url", "http://127.0.0.1:9"], ["table", "--quick"], ["overhead", "--quick"]):
        code = hide + f"sys.exit(main(['bench', *{args!r}]))"
        proc = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "numpy" in proc.stderr
        assert "install hpcgate[bench]" in proc.stderr
