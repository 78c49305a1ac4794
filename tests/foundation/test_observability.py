"""Prometheus configuration, rules and dashboards under k8s/ checked by Prometheus's own promtool.

`promtool check rules`, `promtool test rules` (one scenario per alert, in rules.test.yaml) and
`promtool check config` run on the committed files; promtool comes from Debian's prometheus
package, installed by dev.sh. That every metric name used exists is checked against a live
gateway, control API and simulator in tests/control/test_gateway_chain.py.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from tests.support.metric_names import K8S, dashboard_exprs, rule_exprs, used_names

OBS = K8S / "observability"
ALERTS_REQUIRED = {"HpcgateGateway5xxRate", "HpcgateTTFTP95High", "HpcgateEndpointTableStale",
                   "HpcgateEndpointEjected", "HpcgateModelNoReadyInstance", "HpcgateSlurmJobPendingTooLong",
                   "HpcgateUsageWritesFailing", "HpcgateAutoscalerAtMax"}


def promtool(*args: str, cwd: Path = OBS) -> str:
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: ./dev.sh test installs Debian's prometheus package"
    done = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def alerts() -> set[str]:
    groups = yaml.safe_load((OBS / "rules.yaml").read_text())["groups"]
    return {r["alert"] for g in groups for r in g["rules"] if "alert" in r}


def test_rules_pass_promtool_check() -> None:
    assert "SUCCESS" in promtool("check", "rules", "rules.yaml")


def test_every_alert_has_a_promtool_unit_test_and_they_pass() -> None:
    assert alerts() >= ALERTS_REQUIRED
    tests = yaml.safe_load((OBS / "rules.test.yaml").read_text())["tests"]
    tested = {case["alertname"] for t in tests for case in t.get("alert_rule_test", [])
              if case.get("exp_alerts")}
    assert tested == alerts()  # each alert is shown to fire in some scenario
    assert "SUCCESS" in promtool("test", "rules", "rules.test.yaml")


def test_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    """The scrape configuration (with its rule file), with the token file paths made local."""
    token = tmp_path / "token"
    token.write_text("t")
    text = (OBS / "prometheus.yml").read_text()
    text = text.replace("/etc/prometheus/secrets/hpcgate-sd-token", str(token))
    (tmp_path / "prometheus.yml").write_text(text)
    shutil.copy(OBS / "rules.yaml", tmp_path / "rules.yaml")
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    jobs = {j["job_name"] for j in yaml.safe_load(text)["scrape_configs"]}
    assert jobs == {"hpcgate-gateway", "hpcgate-control-api", "hpcgate-vllm"}
    assert "/sd/vllm" in text


def test_rules_and_dashboards_use_our_names() -> None:
    assert rule_exprs() and dashboard_exprs()
    used = used_names()
    assert any(n.startswith("hpcgate_gateway_") for n in used)
    assert any(n.startswith("hpcgate_control_") for n in used)
    assert any(n.startswith("vllm:") for n in used)


def test_the_grafana_example_reproduces_the_paper_rule_and_targets_the_webhook(tmp_path: Path) -> None:
    doc = yaml.safe_load((K8S / "examples/grafana-autoscaling.yaml").read_text())
    [receiver] = doc["contactPoints"][0]["receivers"]
    assert receiver["type"] == "webhook" and receiver["settings"]["url"].endswith("/hooks/grafana")
    assert receiver["settings"]["authorization_scheme"] == "Bearer"
    [rule] = doc["groups"][0]["rules"]
    assert rule["for"] == "30s" and rule["labels"] == {"action": "scale_up"}
    query = next(d for d in rule["data"] if d["refId"] == "A")["model"]["expr"]
    threshold = next(d for d in rule["data"] if d["refId"] == rule["condition"])["model"]
    assert threshold["conditions"][0]["evaluator"] == {"type": "gt", "params": [5]}
    assert "by (model)" in query  # the webhook reads the model from the alert's labels
    # the query is valid PromQL: promtool checks it as a recording rule
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(
        {"groups": [{"name": "q", "rules": [{"record": "hpcgate:queue_time:mean1m", "expr": query}]}]}))
    assert "SUCCESS" in promtool("check", "rules", "q.yaml", cwd=tmp_path)
