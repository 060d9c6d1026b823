"""The HTTPRoute opt-in (annotation mlrollouts.io/managed-by): who it admits, and that the router
never patches a route that does not admit the writer, and tests the opt-in inside the patch itself.

The real-stack behaviour (Valid=False, the route's resourceVersion unchanged) is in
tests/integration/test_tenancy_rbac.py.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from model_rollouts.traffic.gateway_api import FIELD, OPT_IN, GatewayAPIRouter, opted_in
from model_rollouts.traffic.router import RouterError


@pytest.mark.parametrize(
    ("value", "kind", "name", "admitted"),
    [
        ("ModelRollout/fraud", "ModelRollout", "fraud", True),
        ("modelrollout/fraud", "ModelRollout", "fraud", True),
        (" ModelExperiment/ab , ModelRollout/fraud ", "ModelRollout", "fraud", True),
        ("*", "ModelExperiment", "ab", True),
        ("ModelRollout/fraud", "ModelExperiment", "fraud", False),  # the kind counts
        ("ModelRollout/fraud-2", "ModelRollout", "fraud", False),
        ("ModelRollout/fraud/x", "ModelRollout", "fraud", False),
        ("fraud", "ModelRollout", "fraud", False),  # a bare name is not an entry
        ("Deployment/fraud", "ModelRollout", "fraud", False),
        ("", "ModelRollout", "fraud", False),
        ("true", "ModelRollout", "fraud", False),
        ("ModelRollout/*", "ModelRollout", "fraud", False),
    ],
)
def test_who_an_annotation_admits(value: str, kind: str, name: str, admitted: bool) -> None:
    assert opted_in({OPT_IN: value}, kind, name) is admitted


def test_no_annotation_admits_nobody() -> None:
    assert not opted_in(None, "ModelRollout", "fraud")
    assert not opted_in({"mlrollouts.io/other": "ModelRollout/fraud"}, "ModelRollout", "fraud")


class FakeRoutes:
    """CustomObjectsApi for one HTTPRoute: applies JSON patches (add and test) and records them."""

    def __init__(self, annotations: dict[str, str] | None) -> None:
        self.route: dict[str, Any] = {
            "metadata": {"name": "fraud", "namespace": "ml", "annotations": annotations or {}},
            "spec": {
                "rules": [{"backendRefs": [{"name": "v1", "weight": 100}, {"name": "v2", "weight": 0}]}]
            },
        }
        self.patches: list[list[dict[str, Any]]] = []

    def get_namespaced_custom_object(self, *args: Any, **kw: Any) -> dict[str, Any]:
        return copy.deepcopy(self.route)

    def patch_namespaced_custom_object(
        self, group: str, version: str, ns: str, plural: str, name: str, ops: list[dict[str, Any]], **kw: Any
    ) -> dict[str, Any]:
        self.patches.append(ops)
        new = copy.deepcopy(self.route)
        for op in ops:
            *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
            node: Any = new
            for p in parents:
                node = node[int(p)] if isinstance(node, list) else node[p]
            if op["op"] == "test":
                if node.get(last) != op["value"]:
                    raise AssertionError("422: test failed")  # the API server refuses the whole patch
            else:
                node[last] = op["value"]
        self.route = new
        return copy.deepcopy(new)


def router(fake: FakeRoutes, owner: tuple[str, str] | None) -> GatewayAPIRouter:
    r = GatewayAPIRouter(None, "ml", "fraud", owner=owner)  # type: ignore[arg-type]
    r._co = fake  # type: ignore[assignment]
    return r


@pytest.mark.parametrize(
    ("annotations", "owner"),
    [
        (None, ("ModelRollout", "fraud")),
        ({OPT_IN: "ModelRollout/other"}, ("ModelRollout", "fraud")),
        ({OPT_IN: "ModelRollout/fraud"}, ("ModelExperiment", "fraud")),
        ({OPT_IN: "*"}, None),  # a read-only router writes nothing even where anyone may
    ],
)
def test_a_route_that_does_not_admit_the_writer_is_never_patched(
    annotations: dict[str, str] | None, owner: tuple[str, str] | None
) -> None:
    fake = FakeRoutes(annotations)
    r = router(fake, owner)
    with pytest.raises(RouterError) as err:
        r.check(["v1", "v2"])
    assert err.value.field == FIELD == "spec.trafficRouting.gatewayAPI.httpRoute"
    assert OPT_IN in err.value.message
    with pytest.raises(RouterError):
        r.set_weights({"v1": 70, "v2": 30})
    assert fake.patches == []
    assert r.get_weights() == {"v1": 100, "v2": 0}  # reading needs no opt-in


def test_an_admitted_write_tests_the_opt_in_in_the_same_patch() -> None:
    fake = FakeRoutes({OPT_IN: "ModelRollout/fraud"})
    r = router(fake, ("ModelRollout", "fraud"))
    r.check(["v1", "v2"])
    assert r.set_weights({"v1": 70, "v2": 30}) == {"v1": 70, "v2": 30}
    (ops,) = fake.patches
    assert ops[0] == {
        "op": "test",
        "path": "/metadata/annotations/mlrollouts.io~1managed-by",
        "value": "ModelRollout/fraud",
    }
    assert {o["path"] for o in ops if o["op"] == "add"} == {
        "/spec/rules/0/backendRefs/0/weight",
        "/spec/rules/0/backendRefs/1/weight",
    }


def test_an_opt_in_withdrawn_between_read_and_write_fails_the_whole_patch() -> None:
    fake = FakeRoutes({OPT_IN: "ModelRollout/fraud"})
    r = router(fake, ("ModelRollout", "fraud"))
    read = fake.get_namespaced_custom_object

    def read_then_withdraw(*args: Any, **kw: Any) -> dict[str, Any]:
        route = read()
        fake.route["metadata"]["annotations"] = {}  # the route's owner removes it meanwhile
        return route

    fake.get_namespaced_custom_object = read_then_withdraw  # type: ignore[method-assign]
    with pytest.raises(AssertionError, match="422"):
        r.set_weights({"v1": 70, "v2": 30})
    assert fake.route["spec"]["rules"][0]["backendRefs"][1]["weight"] == 0
