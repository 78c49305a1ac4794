"""Metric names: those the rules and dashboards under k8s/ use, and those an exposition exports.

Used by the static check (tests/foundation/test_observability.py) and by the live one that
scrapes a running gateway, control API and simulator (tests/control/test_gateway_chain.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

K8S = Path(__file__).resolve().parents[2] / "k8s"
# Series names of ours and vLLM's; recording rules (hpcgate:...) are defined, not exported.
_NAME = re.compile(r"\b(hpcgate_[a-z0-9_]+|vllm:[a-z0-9_:]+)")
_TYPE = re.compile(r"^# TYPE (\S+) (\S+)$", re.M)
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "summary": ("_sum", "_count", "_created"), "gauge": ("",), "untyped": ("",)}


def rule_exprs() -> list[str]:
    groups = yaml.safe_load((K8S / "observability/rules.yaml").read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    exprs = []
    for path in sorted((K8S / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            exprs += [t["expr"] for t in panel.get("targets", [])]
    return exprs


def used_names() -> dict[str, set[str]]:
    """Metric name -> where it is used (rule or dashboard file)."""
    used: dict[str, set[str]] = {}
    for where, exprs in (("rules.yaml", rule_exprs()), ("dashboards", dashboard_exprs())):
        for expr in exprs:
            for name in _NAME.findall(expr):
                used.setdefault(name, set()).add(where)
    return used


def exported_names(exposition: str) -> set[str]:
    """Every series name a Prometheus text exposition can produce, from its TYPE lines."""
    names: set[str] = set()
    for family, kind in _TYPE.findall(exposition):
        base = family.removesuffix("_total") if kind == "counter" else family
        names |= {base + suffix for suffix in _SUFFIXES.get(kind, ("",))}
    return names
