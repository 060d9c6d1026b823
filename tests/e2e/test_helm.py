"""The Helm chart and the plain manifests on a real API server: every object is accepted, the
RBAC is what each mode promises (``kubectl auth can-i`` as the operator's ServiceAccount), CRDs
come from crds/ without drift and survive ``helm uninstall``, and kubeconform validates every
rendering of the ci/ values matrix against schemas from this API server's own OpenAPI.

Runs in file order: the install and upgrade share one release.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import Cluster
from tests.install.openapi_schemas import LOCATION, write_schemas
from tests.install.tools import CHART, MANIFESTS, REPO, helm, run, tool

pytestmark = pytest.mark.e2e

RELEASE, NS = "mr", "mr-system"
SA = f"system:serviceaccount:{NS}:mr-model-rollouts"


def kubectl(
    cluster: Cluster, *args: str, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return run([tool("kubectl"), "--kubeconfig", cluster.kubeconfig, *args], check=check, input=input)


def can_i(cluster: Cluster, who: str, verb: str, resource: str, namespace: str | None) -> bool:
    ns = ["--all-namespaces"] if namespace is None else ["-n", namespace]
    # kubectl reads TYPE/NAME: "modelrollouts.mlrollouts.io/status" would ask about an object named
    # "status", so a subresource goes in --subresource.
    kind, _, sub = resource.partition("/")
    target = [kind, *([f"--subresource={sub}"] if sub else [])]
    proc = kubectl(cluster, "auth", "can-i", verb, *target, *ns, "--as", who, check=False)
    answer = proc.stdout.strip()
    assert answer in ("yes", "no"), proc.stderr
    return answer == "yes"


def assert_rbac(cluster: Cluster, who: str, expect: dict[tuple[str, str, str | None], bool]) -> None:
    got = {k: can_i(cluster, who, *k) for k in expect}
    wrong = {k: got[k] for k in expect if got[k] != expect[k]}
    assert not wrong, (
        f"{who}: can-i answers that break the promise (verb, resource, namespace) -> got: {wrong}"
    )


def ensure_namespace(cluster: Cluster, name: str) -> None:
    doc = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    kubectl(cluster, "apply", "--server-side", "-f", "-", input=json.dumps(doc))


# What the operator needs in each watched namespace, and a few things it must never get.
NAMESPACED_YES = [
    ("list", "modelrollouts.mlrollouts.io"),
    ("watch", "modelexperiments.mlrollouts.io"),
    ("patch", "modelrollouts.mlrollouts.io"),
    ("patch", "modelrollouts.mlrollouts.io/status"),
    ("update", "modelexperiments.mlrollouts.io/status"),
    ("patch", "httproutes.gateway.networking.k8s.io"),
    ("watch", "httproutes.gateway.networking.k8s.io"),
    ("create", "events"),
    ("create", "events.events.k8s.io"),
    ("get", "metrictemplates.mlrollouts.io"),
    ("list", "endpointslices.discovery.k8s.io"),
    ("watch", "endpointslices.discovery.k8s.io"),
    ("get", "services"),
    ("create", "configmaps"),  # the series archive: written, never read
    ("patch", "configmaps"),
]
NEVER = [
    ("get", "secrets"),  # Secrets only in the release namespace
    ("create", "modelrollouts.mlrollouts.io"),
    ("delete", "modelrollouts.mlrollouts.io"),
    ("list", "secrets"),
    ("list", "configmaps"),
    ("update", "httproutes.gateway.networking.k8s.io"),
    ("delete", "httproutes.gateway.networking.k8s.io"),
    ("create", "deployments.apps"),
    ("create", "pods"),
]


def test_install_accepts_every_object_and_crds_match_the_source(cluster: Cluster, tmp_path: Path) -> None:
    # A first install that also asks for a ClusterMetricProvider: its CRD comes with the same release.
    values = tmp_path / "values.json"
    provider = {"name": "platform-prometheus", "prometheus": {"address": "http://prometheus.monitoring:9090"}}
    values.write_text(json.dumps({"clusterMetricProviders": [provider]}))
    out = helm(
        "install", RELEASE, CHART, "--namespace", NS, "--create-namespace", "-f", values,
        kubeconfig=cluster.kubeconfig,
    ).stdout  # fmt: skip
    # Helm cannot create a kind whose CRD the same command installs: the first install ships
    # none and says so; the next upgrade creates it (a post-upgrade hook).
    assert "created by the next upgrade" in out, out
    missing = kubectl(cluster, "get", "clustermetricprovider", "platform-prometheus", check=False)
    assert missing.returncode != 0
    helm("upgrade", RELEASE, CHART, "--namespace", NS, "--reuse-values", kubeconfig=cluster.kubeconfig)
    cmp = json.loads(
        kubectl(cluster, "get", "clustermetricprovider", "platform-prometheus", "-o", "json").stdout
    )
    assert cmp["spec"]["prometheus"]["address"] == "http://prometheus.monitoring:9090"
    manifest = [
        d
        for d in yaml.safe_load_all(
            helm("get", "manifest", RELEASE, "-n", NS, kubeconfig=cluster.kubeconfig).stdout
        )
        if d
    ]
    kinds = sorted({d["kind"] for d in manifest})
    assert kinds == sorted(
        {
            "ServiceAccount",
            "CustomResourceDefinition",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Service",
            "Deployment",
        }
    ), kinds
    live = kubectl(cluster, "get", "-f", "-", "-o", "name", input=yaml.safe_dump_all(manifest)).stdout.split()
    assert len(live) == len(manifest), live
    for source in sorted([*(REPO / "crds").glob("*.yaml"), *(REPO / "crds" / "tenancy").glob("*.yaml")]):
        want = yaml.safe_load(source.read_text())
        live = json.loads(kubectl(cluster, "get", "crd", want["metadata"]["name"], "-o", "json").stdout)
        diff = _differences(live["spec"], want["spec"])
        assert not diff, f"{source.name}: the installed CRD differs from the source: {diff[:10]}"
        assert live["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def _differences(live: Any, want: Any, path: str = "") -> list[str]:
    """Where the live CRD differs from the source, ignoring what the API server adds (defaults)."""
    if isinstance(want, dict) and isinstance(live, dict):
        out = []
        for k, v in want.items():
            if k not in live:
                if v not in (0, "", None, [], {}):  # zero values are omitted by the API server
                    out.append(f"{path}/{k}: missing")
            else:
                out += _differences(live[k], v, f"{path}/{k}")
        return out
    if isinstance(want, list) and isinstance(live, list):
        if len(want) != len(live):
            return [f"{path}: {len(live)} items, want {len(want)}"]
        return [
            d
            for i, (a, b) in enumerate(zip(live, want, strict=True))
            for d in _differences(a, b, f"{path}[{i}]")
        ]
    return [] if live == want else [f"{path}: {live!r} != {want!r}"]


def test_cluster_wide_rbac(cluster: Cluster) -> None:
    ensure_namespace(cluster, "team-a")
    expect: dict[tuple[str, str, str | None], bool] = {}
    for verb, res in NAMESPACED_YES:
        expect[(verb, res, "team-a")] = True
        expect[(verb, res, None)] = True
    for verb, res in NEVER:
        expect[(verb, res, "team-a")] = False
    expect |= {
        ("list", "namespaces", None): True,
        ("watch", "customresourcedefinitions.apiextensions.k8s.io", None): True,
        ("create", "leases.coordination.k8s.io", NS): True,
        ("update", "leases.coordination.k8s.io", NS): True,
        ("create", "leases.coordination.k8s.io", "team-a"): False,
        ("create", "customresourcedefinitions.apiextensions.k8s.io", None): False,
        ("get", "secrets", NS): True,
        ("watch", "secrets", NS): True,  # provider Secrets are watched there (issue 18)
        ("get", "secrets", None): False,
        ("list", "secrets", None): False,
        ("get", "clustermetricproviders.mlrollouts.io", None): True,
        ("create", "clustermetricproviders.mlrollouts.io", None): False,
    }
    assert_rbac(cluster, SA, expect)


def test_aggregated_roles_let_namespace_users_manage_rollouts(cluster: Cluster) -> None:
    # Aggregation is kube-controller-manager's work; the local cluster runs one.
    for role, user in (("edit", "dev"), ("view", "viewer")):
        doc = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": f"{user}-{role}", "namespace": "team-a"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
        }
        kubectl(cluster, "apply", "--server-side", "-f", "-", input=json.dumps(doc))
    deadline = time.monotonic() + 30
    while not can_i(cluster, "dev", "create", "modelrollouts.mlrollouts.io", "team-a"):
        assert time.monotonic() < deadline, "the edit role never aggregated ModelRollouts"
        time.sleep(0.5)
    assert_rbac(
        cluster,
        "viewer",
        {
            ("list", "modelexperiments.mlrollouts.io", "team-a"): True,
            ("create", "modelexperiments.mlrollouts.io", "team-a"): False,
        },
    )


def test_upgrade_to_namespaced_mode_narrows_rbac(cluster: Cluster) -> None:
    ensure_namespace(cluster, "team-b")
    helm(
        "upgrade",
        RELEASE,
        CHART,
        "--namespace",
        NS,
        "--set",
        "watch.clusterWide=false",
        "--set",
        "watch.namespaces={team-a}",
        kubeconfig=cluster.kubeconfig,
    )
    expect: dict[tuple[str, str, str | None], bool] = {}
    for verb, res in NAMESPACED_YES:
        expect[(verb, res, "team-a")] = True
        expect[(verb, res, "team-b")] = False
    expect |= {
        ("list", "namespaces", None): False,
        ("list", "modelrollouts.mlrollouts.io", None): False,
        ("create", "leases.coordination.k8s.io", NS): True,
        ("get", "secrets", NS): True,
        ("get", "secrets", "team-a"): False,
        ("patch", "httproutes.gateway.networking.k8s.io", None): False,
        ("get", "clustermetricproviders.mlrollouts.io", None): True,
        ("patch", "clustermetricproviders.mlrollouts.io", None): False,
    }
    assert_rbac(cluster, SA, expect)
    dep = json.loads(kubectl(cluster, "get", "deploy", "mr-model-rollouts", "-n", NS, "-o", "json").stdout)
    assert "--namespace=team-a" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    roles = kubectl(
        cluster, "get", "clusterroles", "-l", "app.kubernetes.io/instance=mr", "-o", "name"
    ).stdout.split()
    # The one cluster-scoped role left reads the platform's Cluster* metric kinds (rbac.clusterMetricKinds).
    assert roles == ["clusterrole.rbac.authorization.k8s.io/mr-model-rollouts-cluster-metrics"], roles


def test_uninstall_keeps_crds_and_resources(cluster: Cluster) -> None:
    rollout = {
        "apiVersion": "mlrollouts.io/v1alpha1",
        "kind": "ModelRollout",
        "metadata": {"name": "kept", "namespace": "team-a"},
        "spec": yaml.safe_load((MANIFESTS / "examples" / "modelrollout.yaml").read_text())["spec"],
    }
    kubectl(cluster, "apply", "--server-side", "-f", "-", input=json.dumps(rollout))
    helm("uninstall", RELEASE, "--namespace", NS, "--wait", kubeconfig=cluster.kubeconfig)
    assert kubectl(cluster, "get", "deploy", "mr-model-rollouts", "-n", NS, check=False).returncode != 0
    kubectl(cluster, "get", "crd", "modelrollouts.mlrollouts.io", "modelexperiments.mlrollouts.io")
    kubectl(cluster, "get", "modelrollout", "kept", "-n", "team-a")
    # The ClusterMetricProvider the upgrade shipped (a hook) is left in place, as documented.
    kubectl(cluster, "get", "clustermetricprovider", "platform-prometheus")


def test_plain_manifests_apply_server_side(cluster: Cluster) -> None:
    # A fresh install: the CRDs the Helm release kept go first (they carry its labels).
    crds = [
        yaml.safe_load(p.read_text())["metadata"]["name"]
        for p in [*(REPO / "crds").glob("*.yaml"), *(REPO / "crds" / "tenancy").glob("*.yaml")]
    ]
    kubectl(cluster, "delete", "crd", *crds, "--wait")
    kubectl(cluster, "apply", "--server-side", "-f", str(MANIFESTS / "install.yaml"))
    kubectl(cluster, "get", "deploy", "model-rollouts", "-n", "model-rollouts")
    who = "system:serviceaccount:model-rollouts:model-rollouts"
    assert_rbac(
        cluster,
        who,
        {
            ("patch", "modelrollouts.mlrollouts.io/status", "team-b"): True,
            ("list", "namespaces", None): True,
            ("list", "secrets", "team-b"): False,
            ("get", "secrets", "team-b"): False,
            ("get", "secrets", "model-rollouts"): True,
        },
    )
    ensure_namespace(cluster, "team-c")
    kubectl(
        cluster, "apply", "--server-side", "-n", "team-c", "-f", str(MANIFESTS / "namespace-install.yaml")
    )
    dep = json.loads(kubectl(cluster, "get", "deploy", "model-rollouts", "-n", "team-c", "-o", "json").stdout)
    assert "--namespace=$(POD_NAMESPACE)" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    who = "system:serviceaccount:team-c:model-rollouts"
    assert_rbac(
        cluster,
        who,
        {
            ("patch", "modelrollouts.mlrollouts.io/status", "team-c"): True,
            ("patch", "httproutes.gateway.networking.k8s.io", "team-c"): True,
            ("create", "leases.coordination.k8s.io", "team-c"): True,
            ("patch", "modelrollouts.mlrollouts.io/status", "team-b"): False,
            ("list", "namespaces", None): False,
            ("get", "secrets", "team-c"): True,
            ("get", "secrets", "team-b"): False,
            ("get", "clustermetricproviders.mlrollouts.io", None): False,
        },
    )


def test_kustomize_overlay_builds_on_the_base(cluster: Cluster) -> None:
    out = kubectl(cluster, "kustomize", str(MANIFESTS / "examples" / "kustomize-overlay")).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    base = [d for d in yaml.safe_load_all((MANIFESTS / "install.yaml").read_text()) if d]
    assert {(d["kind"], d["metadata"]["name"]) for d in docs} == {
        (d["kind"], d["metadata"]["name"]) for d in base
    }
    dep = next(d for d in docs if d["kind"] == "Deployment")
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":0.1.0-custom")
    kubectl(cluster, "apply", "--server-side", "--dry-run=server", "-f", "-", input=out)


def test_kubeconform_validates_the_values_matrix(cluster: Cluster, tmp_path: Path) -> None:
    openapi = json.loads(kubectl(cluster, "get", "--raw", "/openapi/v2").stdout)
    schemas = tmp_path / "schemas"
    assert write_schemas(openapi, schemas) > 50
    values = sorted((CHART / "ci").glob("*-values.yaml"))
    assert {v.name for v in values} >= {
        "default-values.yaml",
        "namespaced-values.yaml",
        "ha-values.yaml",
        "metrics-off-values.yaml",
    }
    for v in values:
        rendered = tmp_path / f"{v.stem}.yaml"
        rendered.write_text(helm("template", RELEASE, CHART, "-n", NS, "-f", v).stdout)
        # ServiceMonitor's CRD (prometheus-operator) is not on this API server: said, not silently ignored.
        proc = run(
            [
                tool("kubeconform"),
                "-strict",
                "-summary",
                "-output",
                "json",
                "-skip",
                "ServiceMonitor",
                "-schema-location",
                f"{schemas}/{LOCATION}",
                rendered,
            ]
        )
        summary = json.loads(proc.stdout)["summary"]
        print(f"\nkubeconform {v.name}: {summary}")
        assert summary["invalid"] == 0 and summary["errors"] == 0 and summary["valid"] >= 5, proc.stdout
    # The schemas bite: a misspelt field and a wrong type are caught.
    bad = tmp_path / "bad.yaml"
    dep = next(
        d
        for d in yaml.safe_load_all((MANIFESTS / "install.yaml").read_text())
        if d and d["kind"] == "Deployment"
    )
    dep["spec"]["replica"] = 2
    dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eighty"
    bad.write_text(yaml.safe_dump(dep))
    proc = run(
        [tool("kubeconform"), "-strict", "-schema-location", f"{schemas}/{LOCATION}", bad], check=False
    )
    assert proc.returncode != 0 and "replica" in proc.stdout and "containerPort" in proc.stdout, proc.stdout
    for f in ("install.yaml", "namespace-install.yaml", "rbac.yaml"):
        proc = run(
            [
                tool("kubeconform"),
                "-strict",
                "-summary",
                "-output",
                "json",
                "-schema-location",
                f"{schemas}/{LOCATION}",
                MANIFESTS / f,
            ]
        )
        summary = json.loads(proc.stdout)["summary"]
        assert summary["invalid"] == 0 and summary["errors"] == 0 and summary["skipped"] == 0, (
            f,
            proc.stdout,
        )
