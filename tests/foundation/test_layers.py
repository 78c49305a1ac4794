"""Dependency direction, checked on the source: gateway and control never import each other;
what they share lives in the bottom layer (``hpcgate``), and the shared wire contract
``hpcgate.schemas`` needs nothing but msgspec and the standard library."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# the only hpcgate modules above the components
TOP = {"hpcgate.cli", "hpcgate.up", "hpcgate.supervisor", "hpcgate.up_jobs", "hpcgate.up_state",
       "hpcgate.up_preflight"}
BOTTOM = ("settings.py", "logs.py", "backoff.py", "metrics_text.py", "lifecycle.py", "net.py",
          "schemas/__init__.py", "schemas/tables.py", "schemas/api_keys.py", "schemas/tribunal.py")


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
        bad = {n for n in names if n.split(".")[0] in {"control", "bench"} or n in TOP}
        assert not bad, f"{path} imports {bad}"


def test_control_never_imports_the_gateway_or_the_top_layer() -> None:
    for path, names in imports("control").items():
        bad = {n for n in names if n.split(".")[0] in {"gateway", "bench"} or n in TOP}
        assert not bad, f"{path} imports {bad}"


def test_shared_schemas_need_only_msgspec_and_the_standard_library() -> None:
    allowed = set(sys.stdlib_module_names) | {"msgspec", "__future__"}
    for path, names in imports("hpcgate/schemas").items():
        bad = {n for n in names if n.split(".")[0] not in allowed and not n.startswith("hpcgate.schemas")}
        assert not bad, f"{path} imports {bad}"


def test_the_bottom_layer_imports_no_component() -> None:
    found = imports("hpcgate")
    for module in BOTTOM:
        names = found[f"hpcgate/{module}"]
        bad = {n for n in names if n.split(".")[0] in {"gateway", "control", "bench"} or n in TOP}
        assert not bad, f"{module} imports {bad}"
