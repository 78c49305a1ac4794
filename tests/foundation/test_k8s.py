"""The Kubernetes manifests parse, run real hpcgate commands, and chart metrics that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from gateway import metrics as gateway_metrics
from hpcgate.cli import COMMANDS

K8S = Path(__file__).resolve().parents[2] / "k8s"


def _docs() -> list[Any]:
    docs: list[Any] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_manifests_parse_and_name_their_kind() -> None:
    docs = _docs()
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "Secret"} <= kinds
    for doc in docs:
        assert doc["apiVersion"] and doc["metadata"]


def test_containers_run_existing_commands_with_known_settings() -> None:
    for doc in _docs():
        if doc["kind"] != "Deployment":
            continue
        spec = doc["spec"]["template"]["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            assert container["args"][0] in COMMANDS, container["args"]
    configs = [d for d in _docs() if d["kind"] == "ConfigMap"]
    config = next(d for d in configs if d["metadata"]["name"] == "hpcgate-config")
    for name in config["data"]:
        assert name.startswith("HPCGATE_")


def test_dashboard_uses_metrics_the_gateway_exports() -> None:
    dashboard = json.loads((K8S / "dashboards/hpcgate.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m.removesuffix("_total").removesuffix("_bucket") for e in exprs
            for m in re.findall(r"hpcgate_gateway_[a-z_]+", e)}
    source = Path(gateway_metrics.__file__).read_text()
    assert used
    for name in used:
        assert f'"{name}"' in source, name
