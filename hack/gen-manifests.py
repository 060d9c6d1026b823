#!/usr/bin/env python3
"""Generate manifests/ from the Helm chart and the Argo CD Lua (one source each; a test fails when stale).

    .venv/bin/python hack/gen-manifests.py [--check]

- manifests/install.yaml: cluster-wide install (Namespace model-rollouts, CRDs including the
  tenancy kinds, RBAC, users' aggregated roles, Deployment, metrics Service): `helm template` with
  the chart's defaults.
- manifests/namespace-install.yaml: namespaced install into whatever namespace `kubectl -n` names:
  watches only that namespace, Roles instead of ClusterRoles, no CRDs and nothing cluster-scoped
  (the CRDs come from crds/, applied once by a cluster admin; so does read access to the
  ClusterMetricProviders and ClusterMetricTemplates, see its header).
- manifests/base/: the same as a kustomize base (kustomize loads nothing from outside a base).
- manifests/rbac.yaml: the ServiceAccount and RBAC of install.yaml alone, the users' aggregated
  roles included (the integration tests run the operator with it and ask can-i of it).
- manifests/argocd/argocd-cm.yaml: the health checks and actions as an argocd-cm patch.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "model-rollouts"
OUT = ROOT / "manifests"
CUSTOM = OUT / "argocd" / "resource_customizations"
HELM = Path(os.environ.get("MODEL_ROLLOUTS_CACHE", ROOT / ".cache")) / "tools" / "bin" / "helm"
NAMESPACE = "model-rollouts"
HEADER = "# Generated from charts/model-rollouts by hack/gen-manifests.py (`make manifests`). Do not edit.\n"
CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
# Labels that only make sense for a Helm release.
HELM_ONLY = ("helm.sh/chart", "app.kubernetes.io/managed-by")


def helm_template(*args: str, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    out = subprocess.run(
        [str(HELM), "template", "model-rollouts", str(CHART), "--namespace", namespace, *args],
        check=True, capture_output=True, text=True,
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    for d in docs:
        _strip_helm_labels(d)
    return docs


def _strip_helm_labels(obj: Any) -> None:
    if isinstance(obj, dict):
        labels = obj.get("labels")
        if isinstance(labels, dict):
            for k in HELM_ONLY:
                labels.pop(k, None)
        for v in obj.values():
            _strip_helm_labels(v)
    elif isinstance(obj, list):
        for v in obj:
            _strip_helm_labels(v)


def namespace_doc() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": NAMESPACE, "labels": {"app.kubernetes.io/part-of": "model-rollouts"}}}


def dump(docs: list[dict[str, Any]], header: str = HEADER) -> str:
    return header + "".join("---\n" + yaml.safe_dump(d, sort_keys=False, width=1000) for d in docs)


def without_namespace(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for d in docs:
        assert d["kind"] not in CLUSTER_SCOPED, f"namespace-install must be namespaced only, got {d['kind']}"
        d["metadata"].pop("namespace", None)
        for s in d.get("subjects") or []:
            s.pop("namespace", None)  # a RoleBinding's ServiceAccount defaults to the binding's namespace
    return docs


def argocd_cm() -> dict[str, Any]:
    data: dict[str, str] = {}
    for kind_dir in sorted(CUSTOM.glob("*/*")):
        key = f"{kind_dir.parent.name}_{kind_dir.name}"
        data[f"resource.customizations.health.{key}"] = (kind_dir / "health.lua").read_text()
        actions = kind_dir / "actions"
        definitions = [
            {"name": p.parent.name, "action.lua": p.read_text()} for p in sorted(actions.glob("*/action.lua"))
        ]
        data[f"resource.customizations.actions.{key}"] = yaml.safe_dump(
            {"discovery.lua": (actions / "discovery.lua").read_text(), "definitions": definitions},
            sort_keys=False, width=1000,
        )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "argocd-cm", "namespace": "argocd",
                     "labels": {"app.kubernetes.io/name": "argocd-cm", "app.kubernetes.io/part-of": "argocd"}},
        "data": data,
    }


class _Literal(str):
    pass


# Strings that YAML 1.1 parsers (kubectl, Helm: sigs.k8s.io/yaml) read as booleans; PyYAML does
# not, so it would write them bare (a CRD property named `n` would become `false`).
_YAML11_BOOLS = re.compile(r"^(y|Y|n|N|yes|Yes|YES|no|No|NO|on|On|ON|off|Off|OFF)$")


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    if _YAML11_BOOLS.match(value):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"')
    return dumper.represent_str(value)


yaml.SafeDumper.add_representer(str, _str)
yaml.SafeDumper.add_representer(
    _Literal, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|")
)


def cluster_metric_resources() -> list[str]:
    """What the chart's read-only ClusterRole of namespaced mode grants (rbac.clusterMetricKinds):
    the header of namespace-install.yaml tells a cluster admin to grant exactly that."""
    docs = helm_template("--set", "watch.clusterWide=false", "--set", "crds.install=false")
    (role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    out = []
    for rule in role["rules"]:
        assert rule["verbs"] == ["get", "list", "watch"], rule
        out += [f"{r}.{g}" for g in rule["apiGroups"] for r in rule["resources"]]
    return out


def render() -> dict[Path, str]:
    install = [namespace_doc(), *helm_template()]
    namespaced = without_namespace(
        helm_template(
            "--set", "watch.clusterWide=false", "--set", "crds.install=false", "--set", "rbac.aggregate=false",
            "--set", "rbac.clusterMetricKinds=false",
        )
    )
    rbac_kinds = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    rbac = [namespace_doc(), *[d for d in helm_template() if d["kind"] in rbac_kinds]]
    cm = argocd_cm()
    cm["data"] = {k: _Literal(v) for k, v in cm["data"].items()}
    return {
        OUT / "install.yaml": dump(install),
        OUT / "base" / "install.yaml": dump(install),
        OUT / "namespace-install.yaml": dump(
            namespaced,
            HEADER + "# Namespaced: `kubectl create namespace NS && kubectl apply -n NS --server-side -f namespace-install.yaml`\n"
            "# after a cluster admin has applied the CRDs once (crds/ and crds/tenancy/). It watches only NS,\n"
            "# patches HTTPRoutes only there (and only routes that opt in: annotation mlrollouts.io/managed-by)\n"
            "# and reads Secrets only there. To let it read the platform's ClusterMetricProviders,\n"
            "# ClusterMetricTemplates and ClusterNotificationProviders (notifications and gates), a cluster\n"
            "# admin grants that once (read only; the chart's rbac.clusterMetricKinds ClusterRole):\n"
            "#   kubectl create clusterrole model-rollouts-cluster-metrics --verb=get,list,watch \\\n"
            f"#     --resource={','.join(cluster_metric_resources())}\n"
            "#   kubectl create clusterrolebinding model-rollouts-NS --clusterrole=model-rollouts-cluster-metrics \\\n"
            "#     --serviceaccount=NS:model-rollouts\n",
        ),
        OUT / "rbac.yaml": dump(
            rbac,
            HEADER + "# The ServiceAccount and RBAC of install.yaml. The operator: its own resources and status,\n"
            "# HTTPRoute patch (weights; the operator writes only routes whose mlrollouts.io/managed-by annotation\n"
            "# names the rollout or experiment: RBAC cannot select by annotation), Events, Services/EndpointSlices\n"
            "# (candidate readiness), MetricTemplates and the Cluster* metric kinds (read), Secrets only in its own\n"
            "# namespace (provider credentials), Kopf's cluster-wide watching, its leader-election Lease.\n"
            "# Users: ClusterRoles aggregated into the built-in admin, edit and view roles.\n",
        ),
        OUT / "argocd" / "argocd-cm.yaml": (
            "# Generated from manifests/argocd/resource_customizations by hack/gen-manifests.py. Do not edit.\n"
            "# Merge into Argo CD's argocd-cm: kubectl -n argocd patch configmap argocd-cm --patch-file manifests/argocd/argocd-cm.yaml\n"
            + yaml.safe_dump(cm, sort_keys=False, width=1000)
        ),
    }


def main() -> int:
    check = "--check" in sys.argv[1:]
    stale = []
    for path, text in render().items():
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path.relative_to(ROOT)))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("stale, run `make manifests`: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
