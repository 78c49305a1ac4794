"""Dependency direction, checked on the source: gateway never imports control; control uses
only gateway.schemas of the gateway; gateway.schemas needs nothing but msgspec and stdlib."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imports(package: str) -> dict[str, set[str]]:
    """Module path -> the absolute module names it imports."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


def test_gateway_never_imports_control_bench_or_the_top_layer() -> None:
    for path, names in imports("gateway").items():
        top = {"hpcgate.cli", "hpcgate.up", "hpcgate.supervisor"}
        bad = {n for n in names if n.split(".")[0] in {"control", "bench"} or n in top}
        assert not bad, f"{path} imports {bad}"


def test_control_uses_only_the_shared_schemas_of_the_gateway() -> None:
    for path, names in imports("control").items():
        bad = {n for n in names if n.split(".")[0] == "gateway" and not n.startswith("gateway.schemas")}
        assert not bad, f"{path} imports {bad}"


def test_shared_schemas_need_only_msgspec_and_the_standard_library() -> None:
    allowed = set(sys.stdlib_module_names) | {"msgspec", "__future__", "gateway"}
    for path, names in imports("gateway/schemas").items():
        bad = {n for n in names if n.split(".")[0] not in allowed or
               (n.startswith("gateway") and not n.startswith("gateway.schemas"))}
        assert not bad, f"{path} imports {bad}"


def test_the_bottom_layer_imports_no_component() -> None:
    for module in ("settings.py", "logs.py"):
        names = imports("hpcgate")[f"hpcgate/{module}"]
        assert not {n for n in names if n.split(".")[0] in {"gateway", "control", "bench"}}, module
