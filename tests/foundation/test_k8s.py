"""The Kubernetes overlays render with a real kustomize, validate strictly and keep their invariants.

Every overlay under ``k8s/overlays`` is rendered with ``kubectl kustomize`` (installed by
``dev.sh``), every object whose kind Kubernetes defines is validated strictly (unknown fields
are errors) against the schemas bundled in the ``kubernetes-validate`` package, offline, and
the rendered objects are checked for what a site relies on: probes, the restricted security
context, a grace period longer than the gateway's preStop pause plus its drain, PDB and HPA
targets that exist, every referenced ConfigMap/Secret key present, and settings every process
accepts. Prometheus Operator objects (CRDs, no bundled schema) get a structural check.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from control.autoscale.settings import AutoscalerSettings
from control.jobs.settings import JobsSettings
from control.settings import ApiSettings, HealthSettings
from gateway.settings import GatewaySettings, load_gateway_settings
from hpcgate.cli import COMMANDS
from hpcgate.settings import load_settings

K8S = Path(__file__).resolve().parents[2] / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
K8S_VERSION = "1.30.0"  # oldest Kubernetes the manifests target (endPort, autoscaling/v2, policy/v1)
OPERATOR_KINDS = {("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "ServiceMonitor")}
SINGLETONS = {"hpcgate-control-jobs", "hpcgate-control-health", "hpcgate-control-autoscaler"}
Doc = dict[str, Any]


@functools.cache
def render(overlay: str) -> tuple[Doc, ...]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing: ./dev.sh test installs kubernetes-client"
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def of_kind(docs: tuple[Doc, ...], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: tuple[Doc, ...], kind: str, name: str) -> Doc:
    (doc,) = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    return doc


def pod_specs(docs: tuple[Doc, ...]) -> Iterator[tuple[str, Doc]]:
    for d in of_kind(docs, "Deployment"):
        yield d["metadata"]["name"], d["spec"]["template"]["spec"]


def containers(spec: Doc) -> list[Doc]:
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # matchExpressions are not used here
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def external_secrets(overlay: str) -> dict[str, set[str]]:
    """Secrets the site creates (not rendered): name -> keys, from required-secrets.yaml."""
    path = K8S / "overlays" / overlay / "required-secrets.yaml"
    if not path.exists():
        return {}
    return {d["metadata"]["name"]: set(d["stringData"]) for d in yaml.safe_load_all(path.read_text()) if d}


def test_overlays_exist_and_the_flat_manifests_are_gone() -> None:
    assert {"dev", "production"} <= set(OVERLAYS)
    assert not list(K8S.glob("*.yaml")), "manifests belong in k8s/base, overlays or observability"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_validates_strictly(overlay: str) -> None:
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget",
            "HorizontalPodAutoscaler", "NetworkPolicy"} <= kinds
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in OPERATOR_KINDS:
            check_monitor(doc, docs)
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_custom_metric_hpa_example_validates() -> None:
    docs = [d for d in yaml.safe_load_all((K8S / "examples/hpa-inflight.yaml").read_text()) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] in docs[0]["data"]["config.yaml"]


def test_strict_validation_catches_a_typo() -> None:
    """The check above would fail on a misspelt field (strict mode is on, the schemas are found)."""
    gateway = dict(named(render("dev"), "Deployment", "hpcgate-gateway"))
    gateway["spec"] = {**gateway["spec"], "replica": 2}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(gateway, K8S_VERSION, strict=True)


def check_monitor(doc: Doc, docs: tuple[Doc, ...]) -> None:
    spec = doc["spec"]
    if doc["kind"] == "PodMonitor":
        targets = [spec for _, spec in pod_specs(docs)]
        pods = [d["spec"]["template"]["metadata"]["labels"] for d in of_kind(docs, "Deployment")]
        assert any(selects(spec["selector"], labels) for labels in pods), doc
        ports = {p["name"] for t in targets for c in t["containers"] for p in c.get("ports", [])}
        assert {e["port"] for e in spec["podMetricsEndpoints"]} <= ports
    else:
        services = [s for s in of_kind(docs, "Service") if selects(spec["selector"], s["metadata"]["labels"])]
        assert services, doc
        named_ports = {p["name"] for s in services for p in s["spec"]["ports"]}
        assert {e["port"] for e in spec["endpoints"]} <= named_ports


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_probes_drain_and_placement(overlay: str) -> None:
    docs = render(overlay)
    spec = named(docs, "Deployment", "hpcgate-gateway")["spec"]["template"]["spec"]
    (gw,) = spec["containers"]
    assert gw["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert gw["livenessProbe"]["httpGet"]["path"] == "/health"
    assert gw["startupProbe"]["httpGet"]["path"] in {"/health", "/ready"}
    assert gw["args"][:1] == ["gateway"] and "8080" in gw["args"]

    # Grace period: the preStop pause, then the drain (the gateway's shutdown_timeout_s, from the
    # ConfigMap or the setting's default), must both fit, with a margin for the exit itself.
    config = named(docs, "ConfigMap", next(e["configMapRef"]["name"] for e in gw["envFrom"]
                                           if "configMapRef" in e))["data"]
    drain_s = float(config.get("HPCGATE_GATEWAY_SHUTDOWN_TIMEOUT_S", GatewaySettings().shutdown_timeout_s))
    pause = gw["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep"
    assert spec["terminationGracePeriodSeconds"] >= float(pause[1]) + drain_s + 5

    term = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert selects(term["podAffinityTerm"]["labelSelector"], named(docs, "Deployment", "hpcgate-gateway")
                   ["spec"]["template"]["metadata"]["labels"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_runs_restricted(overlay: str) -> None:
    namespace = of_kind(render(overlay), "Namespace")[0]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, spec in pod_specs(render(overlay)):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] >= 1000, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        for c in containers(spec):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, (name, c["name"])
            assert sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]}, (name, c["name"])
            assert c["resources"]["requests"] and c["resources"]["limits"], (name, c["name"])
            assert c["args"][0] in COMMANDS, c["args"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_replicas_singletons_pdbs_hpas_and_services_fit_together(overlay: str) -> None:
    docs = render(overlay)
    deployments = {d["metadata"]["name"]: d for d in of_kind(docs, "Deployment")}
    for name in SINGLETONS:
        assert deployments[name]["spec"]["replicas"] == 1  # more would stand by (advisory lock)
    if overlay == "production":
        assert deployments["hpcgate-gateway"]["spec"]["replicas"] >= 2
        assert deployments["hpcgate-control-api"]["spec"]["replicas"] >= 2
    if overlay == "dev":
        assert {d["spec"]["replicas"] for d in deployments.values()} == {1}

    for pdb in of_kind(docs, "PodDisruptionBudget"):
        matched = [n for n, d in deployments.items()
                   if selects(pdb["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
        assert len(matched) == 1, (pdb["metadata"]["name"], matched)
    covered = {n for n, d in deployments.items() for pdb in of_kind(docs, "PodDisruptionBudget")
               if selects(pdb["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])}
    assert {"hpcgate-gateway", "hpcgate-control-api"} <= covered

    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        assert ref["kind"] == "Deployment" and ref["name"] in deployments, ref
        target = deployments[ref["name"]]["spec"]["replicas"]
        assert hpa["spec"]["minReplicas"] <= target <= hpa["spec"]["maxReplicas"]
        assert ref["name"] not in SINGLETONS

    for svc in of_kind(docs, "Service"):
        wanted = {"matchLabels": svc["spec"]["selector"]}
        backing = [d for d in deployments.values()
                   if selects(wanted, d["spec"]["template"]["metadata"]["labels"])]
        assert backing, svc["metadata"]["name"]
        ports = {p["name"] for d in backing for c in d["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_referenced_config_and_secret_key_exists(overlay: str) -> None:
    docs = render(overlay)
    config_maps = {d["metadata"]["name"]: set(d.get("data", {})) for d in of_kind(docs, "ConfigMap")}
    secrets = {d["metadata"]["name"]: set(d.get("data", {})) | set(d.get("stringData", {}))
               for d in of_kind(docs, "Secret")}
    secrets.update(external_secrets(overlay))
    for name, spec in pod_specs(docs):
        for c in containers(spec):
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in config_maps, (name, source)
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets, (name, source)
            for env in c.get("env", []):
                ref = env.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    key = ref["secretKeyRef"]
                    assert key["key"] in secrets.get(key["name"], set()), (name, key)
                if "configMapKeyRef" in ref:
                    key = ref["configMapKeyRef"]
                    assert key["key"] in config_maps.get(key["name"], set()), (name, key)
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                wanted = {i["key"] for i in volume["secret"].get("items", [])}
                assert wanted <= secrets.get(volume["secret"]["secretName"], set()), (name, volume)


SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "DATABASE_URL")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_maps_hold_no_secret_and_every_process_accepts_its_settings(overlay: str) -> None:
    docs = render(overlay)
    for cm in of_kind(docs, "ConfigMap"):
        for key in cm.get("data", {}):
            assert not any(w in key for w in SECRET_WORDS), f"{key} belongs in a Secret"
    config_maps = {d["metadata"]["name"]: d.get("data", {}) for d in of_kind(docs, "ConfigMap")}
    for _name, spec in pod_specs(docs):
        for c in spec["containers"]:
            env: dict[str, str] = {}
            for source in c.get("envFrom", []):
                env.update(config_maps[source["configMapRef"]["name"]])
            for item in c.get("env", []):
                # secret values are the site's; a well-formed stand-in checks the name is known
                env[item["name"]] = item.get("value", "postgresql://u:p@db:5432/hpcgate"
                                                     if item["name"] == "HPCGATE_DATABASE_URL" else "x")
            load_process_settings(c["args"], env)


def load_process_settings(args: list[str], env: dict[str, str]) -> None:
    """Load the settings the container's command would (a bad or unknown one raises)."""
    if args[0] == "gateway":
        load_gateway_settings(env=env)
        return
    assert args[0] == "control", args
    cls: type[Any] = {"api": ApiSettings, "health": HealthSettings, "jobs": JobsSettings,
                      "autoscaler": AutoscalerSettings}[args[1]]
    load_settings(cls, args[1], env=env)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_deny_by_default_and_cover_every_pod(overlay: str) -> None:
    docs = render(overlay)
    policies = of_kind(docs, "NetworkPolicy")
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and "ingress" not in p["spec"]
            and "egress" not in p["spec"]]
    assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    for d in of_kind(docs, "Deployment"):
        labels = d["spec"]["template"]["metadata"]["labels"]
        own = [p for p in policies if p["spec"]["podSelector"].get("matchLabels")
               and selects(p["spec"]["podSelector"], labels)]
        assert own, f"{d['metadata']['name']} has no NetworkPolicy of its own"
        egress_ports = {port["port"] for p in own for rule in p["spec"].get("egress", [])
                        for port in rule.get("ports", [])}
        assert 5432 in egress_ports, d["metadata"]["name"]  # every process reaches PostgreSQL

