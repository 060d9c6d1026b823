"""A metric provider, Secret or template an object cannot use is ``Valid=False``, like a route it cannot
use: ``ProviderError`` (metrics/) and ``RouterError`` (traffic/) are both ``SpecError`` (api/errors.py),
read the same, and the controller turns either into the same status without touching the route.

The controller runs one tick against a fake Kubernetes API (the ``kubernetes.client`` classes
replaced): no cluster, and every call it makes is recorded.
"""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from model_rollouts.api.errors import SpecError
from model_rollouts.handlers.rollout import RolloutController
from model_rollouts.kube import client as kube_client
from model_rollouts.metrics.errors import ProviderError
from model_rollouts.traffic.router import NotOptedIn, RouterError


def test_provider_and_router_errors_read_the_same() -> None:
    p = ProviderError("spec.analysis.provider", "ClusterMetricProvider p not found")
    r = RouterError("spec.trafficRouting.gatewayAPI.httpRoute", "HTTPRoute ml/r not found")
    assert (
        isinstance(p, SpecError) and isinstance(r, SpecError) and isinstance(NotOptedIn("f", "m"), SpecError)
    )
    assert not isinstance(p, RouterError) and not isinstance(r, ProviderError)
    assert str(p) == "spec.analysis.provider: ClusterMetricProvider p not found"
    assert (p.field, p.message) == ("spec.analysis.provider", "ClusterMetricProvider p not found")
    assert str(r) == "spec.trafficRouting.gatewayAPI.httpRoute: HTTPRoute ml/r not found"


class FakeApi:
    """Records every call; serves one opted-in HTTPRoute ``r`` (Services a, b) and no MetricTemplate."""

    calls: list[tuple[str, tuple[Any, ...]]] = []
    statuses: list[dict[str, Any]] = []
    events: list[Any] = []

    def __init__(self, *_: object) -> None:
        pass

    def get_namespaced_custom_object(
        self, group: str, version: str, ns: str, plural: str, name: str, **_: Any
    ) -> Any:
        FakeApi.calls.append(("get", (plural, ns, name)))
        if plural == "httproutes" and name == "r":
            return {
                "metadata": {"name": "r", "namespace": ns, "annotations": {"mlrollouts.io/managed-by": "*"}},
                "spec": {
                    "rules": [{"backendRefs": [{"name": "a", "weight": 100}, {"name": "b", "weight": 0}]}]
                },
            }
        raise ApiException(status=404)

    def get_cluster_custom_object(self, group: str, version: str, plural: str, name: str, **_: Any) -> Any:
        FakeApi.calls.append(("get", (plural, name)))
        raise ApiException(status=404)

    def list_cluster_custom_object(self, group: str, version: str, plural: str, **_: Any) -> Any:
        FakeApi.calls.append(("list", (plural,)))
        return {"items": []}

    def patch_namespaced_custom_object(self, *args: Any, **_: Any) -> Any:
        FakeApi.calls.append(("patch", args))
        raise AssertionError("the route must not be written for an invalid spec")

    def replace_namespaced_custom_object_status(self, *args: Any, **_: Any) -> Any:
        FakeApi.calls.append(("status", args[:5]))
        FakeApi.statuses.append(args[5]["status"])
        return args[5]

    def patch_namespaced_custom_object_status(self, *args: Any, **_: Any) -> Any:
        # A merge patch against an object without status: the patch is the whole status.
        FakeApi.calls.append(("status", args[:5]))
        FakeApi.statuses.append(args[5]["status"])
        return args[5]

    def create_namespaced_event(self, namespace: str, body: Any, **_: Any) -> Any:
        FakeApi.events.append(body)
        return body


@pytest.fixture()
def fake_api(monkeypatch: pytest.MonkeyPatch) -> type[FakeApi]:
    FakeApi.calls, FakeApi.statuses, FakeApi.events = [], [], []
    monkeypatch.setattr(client, "CustomObjectsApi", FakeApi)
    monkeypatch.setattr(client, "CoreV1Api", FakeApi)
    monkeypatch.setattr(kube_client, "_api", object())  # api() returns it: no kubeconfig is read
    return FakeApi


def _rollout(analysis: dict[str, Any], guardrail: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "mlrollouts.io/v1alpha1",
        "kind": "ModelRollout",
        "metadata": {
            "name": "fraud",
            "namespace": "ml",
            "uid": "u1",
            "generation": 1,
            "resourceVersion": "7",
        },
        "spec": {
            "stable": {"service": "a"},
            "candidate": {"service": "b"},
            "trafficRouting": {"gatewayAPI": {"httpRoute": "r"}},
            "steps": [{"setWeight": 50}],
            "analysis": {**analysis, "guardrails": [{"name": "g", "max": 1, **guardrail}]},
        },
    }


@pytest.mark.parametrize(
    ("analysis", "guardrail", "message"),
    [
        (
            {"prometheus": {"address": "http://prom:9090", "bearerTokenSecret": {"name": "s", "key": "t"}}},
            {"query": "up"},
            "spec.analysis.prometheus.bearerTokenSecret: a credential cannot be named together with an "
            "address in a ModelRollout or ModelExperiment; ask the platform team for a "
            "ClusterMetricProvider, set analysis.provider",
        ),
        (
            {"provider": "nowhere"},
            {"query": "up"},
            "spec.analysis.provider: ClusterMetricProvider nowhere not found",
        ),
        (
            {"provider": "nowhere"},
            {"templateRef": {"kind": "MetricTemplate", "name": "missing"}},
            "spec.analysis.guardrails[0].templateRef: MetricTemplate missing not found",
        ),
    ],
)
def test_a_provider_the_object_cannot_use_is_valid_false_and_the_route_is_left_alone(
    fake_api: type[FakeApi], analysis: dict[str, Any], guardrail: dict[str, Any], message: str
) -> None:
    RolloutController("ml", "fraud").tick(_rollout(analysis, guardrail))
    assert [c for c in fake_api.calls if c[0] == "patch"] == []
    assert len(fake_api.statuses) == 1, fake_api.calls
    status = fake_api.statuses[0]
    assert status["phase"] == "Invalid" and status["message"] == message
    valid = next(c for c in status["conditions"] if c["type"] == "Valid")
    assert (valid["status"], valid["reason"], valid["message"]) == ("False", "InvalidSpec", message)
    assert [(e.reason, e.message) for e in fake_api.events] == [("InvalidSpec", message)]
