"""Who may do what with the tenancy kinds: `kubectl auth can-i`, asked of the real API server.

The aggregated user roles and the operator's permissions come from manifests/tenancy/rbac.yaml
(the harness applies it next to manifests/rbac.yaml); aggregation into the built-in view/edit
roles is done by the real kube-controller-manager.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from kubernetes import client

from tests.harness.stack import Stack

NS = "ml"
OTHER = "team-b"
OPERATOR = "system:serviceaccount:model-rollouts:model-rollouts"
G = "mlrollouts.io"


@pytest.fixture(scope="module")
def stack(real_components: None) -> Iterator[Stack]:
    with Stack(variants={"svc-a": {}}, controller_manager=True, rps=1, max_seconds=300) as s:
        core, rbac = client.CoreV1Api(s.api), client.RbacAuthorizationV1Api(s.api)
        core.create_namespace(client.V1Namespace(metadata={"name": OTHER}))
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
        yield s


def can(
    stack: Stack, user: str, verb: str, resource: str, namespace: str | None = None, group: str = G
) -> bool:
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


# (user, verb, resource, namespace, group, allowed)
MATRIX = [
    ("alice", "create", "metrictemplates", NS, G, True),
    ("alice", "delete", "metrictemplates", NS, G, True),
    ("alice", "get", "metrictemplates", NS, G, True),
    ("alice", "create", "metrictemplates", OTHER, G, False),
    ("alice", "create", "clustermetricproviders", None, G, False),
    ("alice", "update", "clustermetricproviders", None, G, False),
    ("alice", "create", "clustermetrictemplates", None, G, False),
    ("alice", "get", "secrets", "model-rollouts", "", False),
    ("bob", "get", "metrictemplates", NS, G, True),
    ("bob", "list", "metrictemplates", NS, G, True),
    ("bob", "create", "metrictemplates", NS, G, False),
    ("bob", "get", "metrictemplates", OTHER, G, False),
    (OPERATOR, "get", "clustermetricproviders", None, G, True),
    (OPERATOR, "list", "clustermetricproviders", None, G, True),
    (OPERATOR, "get", "clustermetrictemplates", None, G, True),
    (OPERATOR, "get", "metrictemplates", NS, G, True),
    (OPERATOR, "create", "clustermetricproviders", None, G, False),
    (OPERATOR, "patch", "clustermetrictemplates", None, G, False),
    (OPERATOR, "update", "metrictemplates", NS, G, False),
]


def test_can_i_matrix_for_the_tenancy_kinds(stack: Stack) -> None:
    # The controller-manager aggregates our roles into view/edit asynchronously.
    deadline = time.monotonic() + 60
    while not can(stack, "alice", "create", "metrictemplates", NS) and time.monotonic() < deadline:
        time.sleep(1)
    wrong = [
        (user, verb, resource, ns, allowed)
        for user, verb, resource, ns, group, allowed in MATRIX
        if can(stack, user, verb, resource, ns, group) != allowed
    ]
    assert wrong == [], wrong
