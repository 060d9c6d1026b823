"""Who may do what, in both install modes, asked of the real API server; and the route opt-in.

The RBAC is what ships: the harness applies manifests/rbac.yaml (the chart's cluster-wide RBAC,
users' aggregated roles included), and the namespaced mode is manifests/namespace-install.yaml's
ServiceAccount, Roles and RoleBindings applied to a namespace as its README line says. Both files
are generated from the chart (tests/install checks they are not stale). Aggregation into the
built-in view/edit roles is done by the real kube-controller-manager. The questions are asked with
``kubectl auth can-i --as`` when kubectl is built (``make kube-bins``), else with the same
SubjectAccessReview it sends.

RBAC cannot grant ``patch`` on only some HTTPRoutes, so in cluster mode the operator may patch any
route as far as the API server is concerned; the matrix says so, and the second test shows that
the operator's own check of the route's ``mlrollouts.io/managed-by`` annotation keeps it from
writing a route that has not opted in.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.harness.cluster import CACHE, KUBE_VERSION, kubectl_apply
from tests.harness.objects import CANDIDATE, STABLE, rollout
from tests.harness.procs import REPO
from tests.harness.stack import MANAGED_BY, Stack

NS = "ml"  # the tenants' namespace (alice may edit there, bob may view)
OTHER = "team-b"  # a namespace neither user has rights in
SOLO = "team-c"  # the namespaced install: operator and its rollouts in one namespace
OPERATOR = "system:serviceaccount:model-rollouts:model-rollouts"  # manifests/rbac.yaml
SOLO_OPERATOR = f"system:serviceaccount:{SOLO}:model-rollouts"  # manifests/namespace-install.yaml
G = "mlrollouts.io"
GW = "gateway.networking.k8s.io"
RBAC_KINDS = {"ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
ROUTE = "fraud"


def kubectl() -> Path | None:
    for d in (os.environ.get("KUBEBUILDER_ASSETS"), str(CACHE / "kube" / KUBE_VERSION / "bin")):
        if d and (Path(d) / "kubectl").is_file():
            return Path(d) / "kubectl"
    return None


@pytest.fixture(scope="module")
def stack(real_components: None) -> Iterator[Stack]:
    with Stack(
        variants={STABLE: {"error_rate": 0.0}, CANDIDATE: {"error_rate": 0.0}},
        route=ROUTE,
        route_managed_by=None,  # the route has not opted in: the operator must leave it alone
        controller_manager=True,
        rps=20,
        max_seconds=600,
    ) as s:
        core, rbac = client.CoreV1Api(s.api), client.RbacAuthorizationV1Api(s.api)
        for ns in (OTHER, SOLO):
            core.create_namespace(client.V1Namespace(metadata={"name": ns}))
        # The namespaced install, as shipped, into SOLO (its RBAC only: no pods are needed to ask).
        solo = yaml.safe_load_all((REPO / "manifests" / "namespace-install.yaml").read_text())
        docs = [d for d in solo if d and d["kind"] in RBAC_KINDS]
        assert {d["kind"] for d in docs} == {"ServiceAccount", "Role", "RoleBinding"}, "namespaced only"
        for d in docs:
            d["metadata"]["namespace"] = SOLO
        kubectl_apply(s.api, docs)
        for user, role in (("alice", "edit"), ("bob", "view")):
            rbac.create_namespaced_role_binding(
                NS,
                client.V1RoleBinding(
                    metadata=client.V1ObjectMeta(name=f"{user}-{role}"),
                    role_ref=client.V1RoleRef(
                        api_group="rbac.authorization.k8s.io", kind="ClusterRole", name=role
                    ),
                    subjects=[
                        client.RbacV1Subject(kind="User", name=user, api_group="rbac.authorization.k8s.io")
                    ],
                ),
            )
        s.start_operator()
        yield s


def can(stack: Stack, user: str, verb: str, resource: str, namespace: str | None, group: str) -> bool:
    """``kubectl auth can-i VERB RESOURCE.GROUP -n NS --as USER`` (namespace None: all namespaces)."""
    exe = kubectl()
    if exe is not None:
        plural, _, sub = resource.partition("/")  # TYPE/NAME to kubectl: a subresource is a flag
        target = [f"{plural}.{group}" if group else plural, *([f"--subresource={sub}"] if sub else [])]
        where = ["--all-namespaces"] if namespace is None else ["-n", namespace]
        sa = user.startswith("system:serviceaccount:")
        as_groups = ["--as-group", "system:serviceaccounts"] if sa else []
        proc = subprocess.run(
            [str(exe), "--kubeconfig", str(stack.cluster.kubeconfig), "auth", "can-i", verb, *target,
             *where, "--as", user, *as_groups],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        answer = proc.stdout.strip()
        assert answer in ("yes", "no"), proc.stderr
        return answer == "yes"
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=user,
            groups=["system:serviceaccounts"]
            if user.startswith("system:serviceaccount:")
            else ["system:authenticated"],
            resource_attributes=client.V1ResourceAttributes(
                group=group, resource=resource, verb=verb, namespace=namespace
            ),
        )
    )
    return bool(client.AuthorizationV1Api(stack.api).create_subject_access_review(review).status.allowed)


# (who, verb, resource, namespace or None for all, group, allowed)
CLUSTER_MODE = [
    # Secrets: provider credentials, in the operator's own namespace only (watched there, issue 18).
    (OPERATOR, "get", "secrets", "model-rollouts", "", True),
    (OPERATOR, "list", "secrets", "model-rollouts", "", True),
    (OPERATOR, "watch", "secrets", "model-rollouts", "", True),
    (OPERATOR, "list", "secrets", NS, "", False),
    (OPERATOR, "list", "secrets", None, "", False),
    (OPERATOR, "get", "secrets", NS, "", False),
    (OPERATOR, "get", "secrets", "kube-system", "", False),
    (OPERATOR, "get", "secrets", None, "", False),
    # HTTPRoutes: patch anywhere as far as RBAC goes (it cannot select by annotation; the operator
    # checks the opt-in, see the test below); never update, create or delete.
    (OPERATOR, "patch", "httproutes", NS, GW, True),
    (OPERATOR, "patch", "httproutes", None, GW, True),
    (OPERATOR, "update", "httproutes", NS, GW, False),
    (OPERATOR, "create", "httproutes", NS, GW, False),
    (OPERATOR, "delete", "httproutes", NS, GW, False),
    # Its own kinds and status; the platform's metric kinds read only.
    (OPERATOR, "patch", "modelrollouts/status", NS, G, True),
    (OPERATOR, "patch", "modelexperiments/status", OTHER, G, True),
    (OPERATOR, "create", "modelrollouts", NS, G, False),
    (OPERATOR, "delete", "modelexperiments", NS, G, False),
    (OPERATOR, "get", "clustermetricproviders", None, G, True),
    (OPERATOR, "list", "clustermetrictemplates", None, G, True),
    (OPERATOR, "watch", "metrictemplates", NS, G, True),
    (OPERATOR, "create", "clustermetricproviders", None, G, False),
    (OPERATOR, "patch", "clustermetrictemplates", None, G, False),
    (OPERATOR, "update", "metrictemplates", NS, G, False),
    (OPERATOR, "create", "leases", "model-rollouts", "coordination.k8s.io", True),
    (OPERATOR, "create", "leases", NS, "coordination.k8s.io", False),
    (OPERATOR, "create", "pods", NS, "", False),
    (OPERATOR, "patch", "deployments", NS, "apps", False),
]
NAMESPACED_MODE = [
    (SOLO_OPERATOR, "patch", "httproutes", SOLO, GW, True),
    (SOLO_OPERATOR, "patch", "httproutes", NS, GW, False),
    (SOLO_OPERATOR, "patch", "httproutes", "kube-system", GW, False),
    (SOLO_OPERATOR, "patch", "httproutes", None, GW, False),
    (SOLO_OPERATOR, "get", "secrets", SOLO, "", True),
    (SOLO_OPERATOR, "list", "secrets", SOLO, "", True),
    (SOLO_OPERATOR, "list", "secrets", NS, "", False),
    (SOLO_OPERATOR, "get", "secrets", NS, "", False),
    (SOLO_OPERATOR, "get", "secrets", "model-rollouts", "", False),
    (SOLO_OPERATOR, "patch", "modelrollouts/status", SOLO, G, True),
    (SOLO_OPERATOR, "patch", "modelrollouts/status", NS, G, False),
    (SOLO_OPERATOR, "list", "modelrollouts", None, G, False),
    (SOLO_OPERATOR, "get", "metrictemplates", SOLO, G, True),
    (SOLO_OPERATOR, "get", "metrictemplates", NS, G, False),
    # Nothing cluster-scoped in the plain namespaced install (its header: a cluster admin may grant
    # read access to the Cluster* metric kinds).
    (SOLO_OPERATOR, "get", "clustermetricproviders", None, G, False),
    (SOLO_OPERATOR, "list", "namespaces", None, "", False),
    (SOLO_OPERATOR, "create", "leases", SOLO, "coordination.k8s.io", True),
    (SOLO_OPERATOR, "create", "leases", NS, "coordination.k8s.io", False),
]
USERS = [
    # alice (edit in ml): rollouts, experiments and MetricTemplates there; not their status, not the
    # platform's kinds, not the operator's Secrets, not HTTPRoutes (Gateway API is not aggregated).
    ("alice", "create", "modelrollouts", NS, G, True),
    ("alice", "delete", "modelexperiments", NS, G, True),
    ("alice", "create", "metrictemplates", NS, G, True),
    ("alice", "patch", "modelrollouts/status", NS, G, False),
    ("alice", "create", "metrictemplates", OTHER, G, False),
    ("alice", "create", "modelrollouts", OTHER, G, False),
    ("alice", "create", "clustermetricproviders", None, G, False),
    ("alice", "update", "clustermetricproviders", None, G, False),
    ("alice", "create", "clustermetrictemplates", None, G, False),
    ("alice", "get", "secrets", "model-rollouts", "", False),
    ("alice", "patch", "httproutes", NS, GW, False),
    # bob (view in ml): reads, writes nothing.
    ("bob", "get", "modelrollouts", NS, G, True),
    ("bob", "list", "modelexperiments/status", NS, G, True),
    ("bob", "list", "metrictemplates", NS, G, True),
    ("bob", "create", "modelrollouts", NS, G, False),
    ("bob", "create", "metrictemplates", NS, G, False),
    ("bob", "get", "metrictemplates", OTHER, G, False),
]


def test_can_i_matrix_for_both_install_modes_and_users(stack: Stack) -> None:
    # The controller-manager aggregates the chart's roles into view/edit asynchronously.
    deadline = time.monotonic() + 60
    while not can(stack, "alice", "create", "metrictemplates", NS, G) and time.monotonic() < deadline:
        time.sleep(1)
    rows = CLUSTER_MODE + NAMESPACED_MODE + USERS
    wrong = [
        (who, verb, resource, ns, f"expected {'yes' if allowed else 'no'}")
        for who, verb, resource, ns, group, allowed in rows
        if can(stack, who, verb, resource, ns, group) != allowed
    ]
    print(f"\ncan-i matrix: {len(rows)} questions ({'kubectl' if kubectl() else 'SubjectAccessReview'})")
    assert wrong == [], wrong


def _route(stack: Stack) -> dict[str, Any]:
    obj: dict[str, Any] = client.CustomObjectsApi(stack.api).get_namespaced_custom_object(
        GW, "v1", stack.namespace, "httproutes", ROUTE
    )
    return obj


def _annotate_route(stack: Stack, value: str) -> None:
    client.CustomObjectsApi(stack.api).patch_namespaced_custom_object(
        GW, "v1", stack.namespace, "httproutes", ROUTE, {"metadata": {"annotations": {MANAGED_BY: value}}}
    )


def test_a_route_without_the_opt_in_is_never_patched(stack: Stack) -> None:
    assert stack.prom is not None
    before = _route(stack)
    assert MANAGED_BY not in (before["metadata"].get("annotations") or {})
    doc = rollout("canary", stack.prom.url, [{"setWeight": 30}, {"pause": {}}])
    doc["spec"]["trafficRouting"] = {"gatewayAPI": {"httpRoute": ROUTE}}
    stack.apply(doc)

    def invalid_naming_the_route(o: dict[str, Any]) -> bool:
        st = o.get("status") or {}
        return st.get("phase") == "Invalid" and "spec.trafficRouting.gatewayAPI.httpRoute" in (
            st.get("message") or ""
        )

    obj = stack.wait_for("modelrollouts", "canary", invalid_naming_the_route, 60)
    msg = obj["status"]["message"]
    assert MANAGED_BY in msg and "ModelRollout/canary" in msg, msg
    valid = next(c for c in obj["status"]["conditions"] if c["type"] == "Valid")
    assert valid["status"] == "False" and "spec.trafficRouting.gatewayAPI.httpRoute" in valid["message"]

    # An opt-in for another object is no opt-in for this one; a re-check (every 15 s) says so again.
    _annotate_route(stack, "ModelRollout/someone-else, ModelExperiment/canary")
    annotated = _route(stack)["metadata"]["resourceVersion"]
    time.sleep(20)  # the route's watch event, then a whole re-check period (15 s) and more
    after = _route(stack)
    assert after["metadata"]["resourceVersion"] == annotated, "the operator wrote a route that did not opt in"
    assert after["spec"] == before["spec"], (before["spec"], after["spec"])
    assert stack.route_weights() == {STABLE: 100, CANDIDATE: 0}
    assert stack.get("modelrollouts", "canary")["status"]["phase"] == "Invalid"

    # The route's owner opts in for this rollout: the same object now moves traffic.
    _annotate_route(stack, "ModelRollout/someone-else,ModelRollout/canary")
    stack.wait_route({STABLE: 70, CANDIDATE: 30}, timeout=60)
    # The route is written first, then status: wait for the status too.
    stack.wait_for("modelrollouts", "canary", lambda o: (o.get("status") or {}).get("phase") != "Invalid", 30)

    # Withdrawn while the rollout runs: the next tick is Invalid, and the route is left as it was.
    client.CustomObjectsApi(stack.api).patch_namespaced_custom_object(
        GW, "v1", stack.namespace, "httproutes", ROUTE, {"metadata": {"annotations": {MANAGED_BY: None}}}
    )
    withdrawn = _route(stack)["metadata"]["resourceVersion"]
    stack.wait_for("modelrollouts", "canary", invalid_naming_the_route, 30)
    stack.annotate("modelrollouts", "canary", {"mlrollouts.io/promote-full": "now"})  # asks for a write
    time.sleep(17)  # its tick at once, then a whole re-check period (15 s)
    after = _route(stack)
    assert after["metadata"]["resourceVersion"] == withdrawn, (
        "the operator wrote a route after its opt-in went"
    )
    assert stack.route_weights() == {STABLE: 70, CANDIDATE: 30}

    # Deleted now: the route is not restored (it does not opt in), and deletion does not wait on retries.
    client.CustomObjectsApi(stack.api).delete_namespaced_custom_object(
        "mlrollouts.io", "v1alpha1", stack.namespace, "modelrollouts", "canary"
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
        o["metadata"]["name"] == "canary"
        for o in client.CustomObjectsApi(stack.api).list_namespaced_custom_object(
            "mlrollouts.io", "v1alpha1", stack.namespace, "modelrollouts"
        )["items"]
    ):
        time.sleep(0.5)
    assert time.monotonic() < deadline, "deleting a rollout whose route does not opt in waited on retries"
    assert _route(stack)["metadata"]["resourceVersion"] == withdrawn
    events = client.CoreV1Api(stack.api).list_namespaced_event(
        stack.namespace, field_selector="involvedObject.name=canary"
    )
    assert "RouteLeftAlone" in {e.reason for e in events.items}
