"""The Istio router (VirtualService): the same guarantees as the HTTPRoute router.

Opt-in, a JSON patch that tests before it sets, only weights written, the result read back.
The fake applies patches with the ``jsonpatch`` library (RFC 6902, as the API server does) and
answers 422 for a failed ``test``, like the API server. The real-API-server behaviour, with the real
Istio CRDs, is in tests/integration/test_istio_router.py.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
import pytest
from kubernetes.client.exceptions import ApiException

from model_rollouts.traffic.gateway_api import OPT_IN
from model_rollouts.traffic.istio import (
    FIELD,
    ROUTE_FIELD,
    IstioRouter,
    destination_name,
    route_weights,
)
from model_rollouts.traffic.router import NotOptedIn, RouterError


def virtualservice(annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "fraud", "namespace": "ml", "annotations": annotations or {}},
        "spec": {
            "hosts": ["fraud"],
            "http": [
                {
                    "name": "testers",
                    "match": [{"headers": {"x-tester": {"exact": "1"}}}],
                    "route": [{"destination": {"host": "fraud-v2"}}],
                },
                {
                    "name": "primary",
                    "route": [
                        {
                            "destination": {"host": "fraud-v1.ml.svc.cluster.local", "port": {"number": 80}},
                            "weight": 100,
                            "headers": {"response": {"add": {"x-arm": "v1"}}},
                        },
                        {"destination": {"host": "fraud-v2"}, "weight": 0},
                    ],
                    "mirror": {"host": "fraud-shadow"},
                    "timeout": "3s",
                },
            ],
        },
    }


class FakeVirtualServices:
    """CustomObjectsApi for one VirtualService: applies JSON patches for real and records them."""

    def __init__(self, vs: dict[str, Any]) -> None:
        self.vs = vs
        self.patches: list[list[dict[str, Any]]] = []
        self.gets = 0

    def get_namespaced_custom_object(self, *args: Any, **kw: Any) -> dict[str, Any]:
        self.gets += 1
        return copy.deepcopy(self.vs)

    def patch_namespaced_custom_object(
        self, group: str, version: str, ns: str, plural: str, name: str, ops: list[dict[str, Any]], **kw: Any
    ) -> dict[str, Any]:
        assert (group, version, plural) == ("networking.istio.io", "v1", "virtualservices")
        assert kw["_content_type"] == "application/json-patch+json"
        self.patches.append(ops)
        try:
            self.vs = jsonpatch.apply_patch(self.vs, ops)
        except (jsonpatch.JsonPatchTestFailed, jsonpatch.JsonPointerException) as e:
            raise ApiException(status=422, reason=str(e)) from e
        return copy.deepcopy(self.vs)


def router(
    fake: FakeVirtualServices,
    owner: tuple[str, str] | None = ("ModelRollout", "fraud"),
    route: str | None = "primary",
) -> IstioRouter:
    r = IstioRouter(None, "ml", "fraud", route_name=route, owner=owner)  # type: ignore[arg-type]
    r._co = fake  # type: ignore[assignment]
    return r


def test_destinations_are_named_by_subset_else_short_host() -> None:
    assert destination_name({"host": "fraud-v1.ml.svc.cluster.local"}, "ml") == "fraud-v1"
    assert destination_name({"host": "fraud-v1.ml.svc"}, "ml") == "fraud-v1"
    assert destination_name({"host": "fraud-v1.ml"}, "ml") == "fraud-v1"
    assert destination_name({"host": "fraud-v1"}, "ml") == "fraud-v1"
    assert destination_name({"host": "fraud", "subset": "v2"}, "ml") == "v2"
    # Another namespace's Service is not this namespace's Service of the same short name.
    assert destination_name({"host": "fraud-v1.other.svc.cluster.local"}, "ml") != "fraud-v1"


def test_a_lone_destination_without_weight_carries_everything() -> None:
    assert route_weights({"route": [{"destination": {"host": "a"}}]}, "ml") == {"a": 100}
    two = {"route": [{"destination": {"host": "a"}, "weight": 100}, {"destination": {"host": "b"}}]}
    assert route_weights(two, "ml") == {"a": 100, "b": 0}


def test_reads_the_named_route() -> None:
    fake = FakeVirtualServices(virtualservice({OPT_IN: "*"}))
    assert router(fake).get_weights() == {"fraud-v1": 100, "fraud-v2": 0}
    assert router(fake, route="testers").get_weights() == {"fraud-v2": 100}


def test_sets_only_the_weights_with_a_patch_that_tests_first() -> None:
    vs = virtualservice({OPT_IN: "ModelRollout/fraud"})
    fake = FakeVirtualServices(copy.deepcopy(vs))
    assert router(fake).set_weights({"fraud-v1": 75, "fraud-v2": 25}) == {"fraud-v1": 75, "fraud-v2": 25}
    (ops,) = fake.patches
    assert ops[0] == {
        "op": "test",
        "path": "/metadata/annotations/mlrollouts.io~1managed-by",
        "value": "ModelRollout/fraud",
    }
    assert ops[1] == {"op": "test", "path": "/spec/http/1/name", "value": "primary"}
    assert {
        "op": "test",
        "path": "/spec/http/1/route/0/destination/host",
        "value": "fraud-v1.ml.svc.cluster.local",
    } in ops
    assert {"op": "test", "path": "/spec/http/1/route/1/destination/host", "value": "fraud-v2"} in ops
    writes = [op for op in ops if op["op"] != "test"]
    assert writes == [
        {"op": "add", "path": "/spec/http/1/route/0/weight", "value": 75},
        {"op": "add", "path": "/spec/http/1/route/1/weight", "value": 25},
    ]
    # Everything but the two weights is byte-identical: other routes, matches, mirror, headers, port.
    expected = copy.deepcopy(vs)
    expected["spec"]["http"][1]["route"][0]["weight"] = 75
    expected["spec"]["http"][1]["route"][1]["weight"] = 25
    assert fake.vs == expected


def test_no_write_when_the_weights_are_already_so() -> None:
    fake = FakeVirtualServices(virtualservice({OPT_IN: "*"}))
    assert router(fake).set_weights({"fraud-v1": 100, "fraud-v2": 0}) == {"fraud-v1": 100, "fraud-v2": 0}
    assert fake.patches == []


def test_only_the_destinations_that_change_are_written() -> None:
    fake = FakeVirtualServices(virtualservice({OPT_IN: "*"}))
    router(fake).set_weights({"fraud-v2": 0, "fraud-v1": 100})
    router(fake).set_weights({"fraud-v1": 60, "fraud-v2": 0})
    (ops,) = fake.patches
    assert [op["path"] for op in ops if op["op"] == "add"] == ["/spec/http/1/route/0/weight"]


@pytest.mark.parametrize(
    ("annotations", "owner"),
    [
        (None, ("ModelRollout", "fraud")),
        ({OPT_IN: "ModelRollout/other"}, ("ModelRollout", "fraud")),
        ({OPT_IN: "ModelRollout/fraud"}, ("ModelExperiment", "fraud")),
        ({OPT_IN: "*"}, None),  # read-only router: never writes
        ({"mlrollouts.io/other": "*"}, ("ModelRollout", "fraud")),
    ],
)
def test_a_virtualservice_without_the_opt_in_is_never_written(
    annotations: dict[str, str] | None, owner: tuple[str, str] | None
) -> None:
    fake = FakeVirtualServices(virtualservice(annotations))
    before = copy.deepcopy(fake.vs)
    for call in (lambda r: r.set_weights({"fraud-v1": 50, "fraud-v2": 50}), lambda r: r.check(["fraud-v1"])):
        with pytest.raises(NotOptedIn) as err:
            call(router(fake, owner))
        assert err.value.field == FIELD and OPT_IN in err.value.message
    assert fake.patches == [] and fake.vs == before


def test_opt_in_withdrawn_between_read_and_write_refuses_the_whole_patch() -> None:
    fake = FakeVirtualServices(virtualservice({OPT_IN: "ModelRollout/fraud"}))
    r = router(fake)
    real_get = fake.get_namespaced_custom_object

    def get_then_withdraw(*a: Any, **kw: Any) -> dict[str, Any]:
        seen = real_get(*a, **kw)
        fake.vs["metadata"]["annotations"][OPT_IN] = "ModelRollout/someone-else"
        return seen

    fake.get_namespaced_custom_object = get_then_withdraw  # type: ignore[method-assign]
    with pytest.raises(ApiException) as err:
        r.set_weights({"fraud-v1": 50, "fraud-v2": 50})
    assert err.value.status == 422
    assert fake.vs["spec"]["http"][1]["route"][0]["weight"] == 100


def test_a_concurrent_reorder_of_destinations_fails_instead_of_weighting_the_wrong_one() -> None:
    fake = FakeVirtualServices(virtualservice({OPT_IN: "*"}))
    r = router(fake)
    real_get = fake.get_namespaced_custom_object

    def get_then_reorder(*a: Any, **kw: Any) -> dict[str, Any]:
        seen = real_get(*a, **kw)
        fake.vs["spec"]["http"][1]["route"].reverse()
        return seen

    fake.get_namespaced_custom_object = get_then_reorder  # type: ignore[method-assign]
    reordered = copy.deepcopy(fake.vs)
    reordered["spec"]["http"][1]["route"].reverse()
    with pytest.raises(ApiException) as err:
        r.set_weights({"fraud-v1": 10, "fraud-v2": 90})
    assert err.value.status == 422 and fake.vs == reordered


def test_a_concurrent_reorder_of_routes_fails_too() -> None:
    fake = FakeVirtualServices(virtualservice({OPT_IN: "*"}))
    r = router(fake)
    real_get = fake.get_namespaced_custom_object

    def get_then_reorder(*a: Any, **kw: Any) -> dict[str, Any]:
        seen = real_get(*a, **kw)
        fake.vs["spec"]["http"].reverse()
        return seen

    fake.get_namespaced_custom_object = get_then_reorder  # type: ignore[method-assign]
    with pytest.raises(ApiException) as err:
        r.set_weights({"fraud-v1": 10, "fraud-v2": 90})
    assert err.value.status == 422


def test_subsets_name_destinations() -> None:
    vs = virtualservice({OPT_IN: "*"})
    vs["spec"]["http"] = [
        {
            "route": [
                {"destination": {"host": "fraud", "subset": "stable"}, "weight": 100},
                {"destination": {"host": "fraud", "subset": "canary"}, "weight": 0},
            ]
        }
    ]
    fake = FakeVirtualServices(vs)
    assert router(fake, route=None).set_weights({"stable": 80, "canary": 20}) == {"stable": 80, "canary": 20}
    ops = fake.patches[0]
    assert {"op": "test", "path": "/spec/http/0/route/1/destination/subset", "value": "canary"} in ops
    assert not any(op["path"].endswith("/name") for op in ops)  # an unnamed route: tested by its destinations


@pytest.mark.parametrize(
    ("route", "services", "field", "message"),
    [
        ("nope", ["fraud-v1"], ROUTE_FIELD, "no http route named nope (has: testers, primary)"),
        (None, ["fraud-v1"], ROUTE_FIELD, "2 http route(s)"),
        ("primary", ["fraud-v1", "fraud-v3"], FIELD, "no destination for service(s) fraud-v3"),
    ],
)
def test_check_names_the_field_at_fault(
    route: str | None, services: list[str], field: str, message: str
) -> None:
    fake = FakeVirtualServices(virtualservice({OPT_IN: "*"}))
    with pytest.raises(RouterError) as err:
        router(fake, route=route).check(services)
    assert err.value.field == field and message in err.value.message


def test_unknown_service_with_positive_weight_is_refused_and_zero_is_satisfied() -> None:
    fake = FakeVirtualServices(virtualservice({OPT_IN: "*"}))
    with pytest.raises(RouterError, match="no destination for fraud-v3"):
        router(fake).set_weights({"fraud-v1": 50, "fraud-v3": 50})
    assert fake.patches == []
    assert router(fake).set_weights({"fraud-v1": 100, "fraud-v3": 0}) == {"fraud-v1": 100, "fraud-v2": 0}


def test_missing_virtualservice_is_a_router_error() -> None:
    class Missing(FakeVirtualServices):
        def get_namespaced_custom_object(self, *args: Any, **kw: Any) -> dict[str, Any]:
            raise ApiException(status=404)

    with pytest.raises(RouterError) as err:
        router(Missing(virtualservice())).get_weights()
    assert err.value.field == FIELD and "not found" in err.value.message


# ---- the registry and the one-read/one-write interface (issue 17's router registry) ---------------


def test_the_registry_selects_the_istio_router_for_spec_traffic_routing_istio() -> None:
    from model_rollouts.api.common import TrafficRouting
    from model_rollouts.traffic import registry

    assert {"gatewayAPI", "istio"} <= set(registry.ROUTERS)
    routing = TrafficRouting.model_validate({"istio": {"virtualService": "fraud", "routeName": "primary"}})
    router = registry.make_router(None, routing, "ml", ("ModelRollout", "fraud"))
    assert isinstance(router, IstioRouter)
    assert (router.name, router.route_name, router.owner) == ("fraud", "primary", ("ModelRollout", "fraud"))


def test_one_owner_key_is_the_virtualservice_route() -> None:
    from model_rollouts.traffic import registry

    key = registry.route_key("ml", {"istio": {"virtualService": "fraud", "routeName": "primary"}})
    assert key is not None and key[0] == ("ml", "fraud/primary", 0) and key[1].name == "istio"
    assert key[1].describe("fraud/primary", 0) == "VirtualService fraud route primary"
    other = registry.route_key("ml", {"istio": {"virtualService": "fraud", "routeName": "testers"}})
    assert other is not None and other[0] != key[0]  # another route of the same VirtualService
    assert registry.route_key("ml", {"istio": {"routeName": "x"}}) is None


def test_one_read_then_no_write_when_the_virtualservice_already_carries_the_weights() -> None:
    from model_rollouts.traffic.router import RETIRED, Arm

    fake = FakeVirtualServices(virtualservice({OPT_IN: "ModelExperiment/ab"}))
    r = router(fake, ("ModelExperiment", "ab"))
    state = r.read()
    arms = [Arm("control", "fraud-v1"), Arm("treatment", "fraud-v2")]
    r.admit(state, arms)
    same = {arms[0]: 100, arms[1]: 0, Arm(RETIRED, "gone"): 0}
    assert state.carries(same) and r.write(state, same) is state
    assert (fake.gets, fake.patches) == (1, [])
    moved = r.write(state, {arms[0]: 60, arms[1]: 40})
    assert moved.weights == {"fraud-v1": 60, "fraud-v2": 40}
    assert fake.gets == 1 and len(fake.patches) == 1  # verified from the PATCH response, not a re-read
    r.admit(state, [*arms, Arm(RETIRED, "fraud-v3")])  # a retired arm need not be in the route
