"""The routers' mirror for a shadow step: the operator's mirror is written with a JSON patch that
tests before it sets, nothing else of the route changes, and every write without a mirror removes it.

The fakes apply patches with the ``jsonpatch`` library (RFC 6902, as the API server does) and answer
422 for a failed ``test``. The real API server with the real CRDs: tests/integration/test_shadow.py.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import jsonpatch
import pytest
from kubernetes.client.exceptions import ApiException

from model_rollouts.traffic import watched
from model_rollouts.traffic.gateway_api import OPT_IN, GatewayAPIRouter
from model_rollouts.traffic.istio import IstioRouter
from model_rollouts.traffic.router import CANDIDATE, Arm, Mirror, RouterError

OWNER = ("ModelRollout", "fraud")
STABLE, CAND = Arm("stable", "fraud-v1"), Arm(CANDIDATE, "fraud-v2")
SHADOW = {STABLE: 100, CAND: 0}


class Fake:
    """CustomObjectsApi for one object: applies JSON patches for real and records them."""

    def __init__(self, obj: dict[str, Any]) -> None:
        self.obj = obj
        self.patches: list[list[dict[str, Any]]] = []

    def get_namespaced_custom_object(self, *args: Any, **kw: Any) -> dict[str, Any]:
        return copy.deepcopy(self.obj)

    def patch_namespaced_custom_object(self, *args: Any, **kw: Any) -> dict[str, Any]:
        ops = args[5]
        assert kw["_content_type"] == "application/json-patch+json"
        self.patches.append(ops)
        try:
            self.obj = jsonpatch.apply_patch(self.obj, ops)
        except (jsonpatch.JsonPatchTestFailed, jsonpatch.JsonPointerException) as e:
            raise ApiException(status=422, reason=str(e)) from e
        return copy.deepcopy(self.obj)


@pytest.fixture(autouse=True)
def _no_cache() -> Iterator[None]:
    watched.ROUTES.clear()
    yield
    watched.ROUTES.clear()


def httproute(filters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "backendRefs": [
            {"name": "fraud-v1", "port": 80, "weight": 100},
            {"name": "fraud-v2", "port": 8080, "weight": 0},
        ],
        "timeouts": {"request": "3s"},
    }
    if filters is not None:
        rule["filters"] = filters
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "fraud", "namespace": "ml", "annotations": {OPT_IN: "ModelRollout/fraud"}},
        "spec": {"parentRefs": [{"name": "gw"}], "rules": [rule]},
    }


def gateway(fake: Fake) -> GatewayAPIRouter:
    r = GatewayAPIRouter(None, "ml", "fraud", owner=OWNER)  # type: ignore[arg-type]
    r._co = fake  # type: ignore[assignment]
    return r


USER_HEADER = {
    "type": "RequestHeaderModifier",
    "requestHeaderModifier": {"set": [{"name": "x", "value": "1"}]},
}


def test_gateway_api_adds_a_request_mirror_with_percent_and_tests_the_rule_first() -> None:
    fake = Fake(httproute())
    r = gateway(fake)
    carried = r.write(r.read(), SHADOW, Mirror(CAND, 10))
    (ops,) = fake.patches
    rule = fake.obj["spec"]["rules"][0]
    assert rule["filters"] == [
        {
            "type": "RequestMirror",
            "requestMirror": {"backendRef": {"name": "fraud-v2", "port": 8080}, "percent": 10},
        }
    ]
    # The rule had no filters: the whole rule as read is tested before the list is added.
    assert {"op": "test", "path": "/spec/rules/0", "value": httproute()["spec"]["rules"][0]} in ops
    assert carried.mirrors == {"fraud-v2": 10} and carried.mirror_wrong(SHADOW, Mirror(CAND, 10)) is None
    # Nothing else of the route changed.
    rest = copy.deepcopy(fake.obj)
    del rest["spec"]["rules"][0]["filters"]
    assert rest == httproute()
    # Already so: no request.
    r.write(r.read(), SHADOW, Mirror(CAND, 10))
    assert len(fake.patches) == 1


def test_gateway_api_keeps_the_users_filters_and_removes_only_its_mirror() -> None:
    user_mirror = {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "audit", "port": 80}}}
    fake = Fake(httproute([USER_HEADER, user_mirror]))
    r = gateway(fake)
    r.write(r.read(), SHADOW, Mirror(CAND, 25))
    filters = fake.obj["spec"]["rules"][0]["filters"]
    assert filters[:2] == [USER_HEADER, user_mirror] and filters[2]["requestMirror"]["percent"] == 25
    assert fake.patches[0][1] == {
        "op": "test",
        "path": "/spec/rules/0/filters",
        "value": [USER_HEADER, user_mirror],
    }
    # A new percent replaces ours; the end (no mirror) removes ours alone.
    r.write(r.read(), SHADOW, Mirror(CAND, 50))
    assert r.read().mirrors == {"audit": 100, "fraud-v2": 50}
    carried = r.write(r.read(), {STABLE: 100, CAND: 0})
    assert fake.obj["spec"]["rules"][0]["filters"] == [USER_HEADER, user_mirror]
    assert carried.mirrors == {"audit": 100} and carried.mirror_wrong(SHADOW, None) is None


def test_gateway_api_removing_its_only_filter_leaves_the_rule_as_it_was() -> None:
    fake = Fake(httproute())
    r = gateway(fake)
    r.write(r.read(), SHADOW, Mirror(CAND, 10))
    r.write(r.read(), {STABLE: 100, CAND: 0})  # a rollback: weights and no mirror
    assert fake.obj == httproute()


def test_gateway_api_a_concurrent_edit_of_the_filters_fails_the_whole_patch() -> None:
    fake = Fake(httproute([USER_HEADER]))
    r = gateway(fake)
    state = r.read()
    fake.obj["spec"]["rules"][0]["filters"].append(dict(USER_HEADER, type="RequestHeaderModifier"))
    fake.obj["spec"]["rules"][0]["filters"][1]["requestHeaderModifier"] = {"remove": ["y"]}
    edited = copy.deepcopy(fake.obj)
    # The retry from a fresh read writes against the edited list, keeping the edit.
    r.write(state, {STABLE: 90, CAND: 10}, Mirror(CAND, 10))
    assert len(fake.patches) == 2
    assert fake.obj["spec"]["rules"][0]["filters"][:2] == edited["spec"]["rules"][0]["filters"]


def test_gateway_api_from_the_watchs_trimmed_copy_reads_afresh_to_add_the_first_filter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = Fake(httproute())
    monkeypatch.setattr(watched.ROUTES, "enabled", True)
    watched.ROUTES.store(fake.obj)  # what the operator's watch keeps: no parentRefs, no timeouts
    r = gateway(fake)
    state = r.read()
    assert "kind" not in state.raw
    r.write(state, SHADOW, Mirror(CAND, 10))
    assert len(fake.patches) == 1  # tested against the rule as the API server has it: no 422
    # The watch's copy keeps the filters: the end of the shadow is written from it.
    assert r.read().mirrors == {"fraud-v2": 10}
    r.write(r.read(), SHADOW)
    assert fake.obj == httproute() and len(fake.patches) == 2


def test_gateway_api_a_mirror_to_a_service_without_backend_ref_is_refused() -> None:
    fake = Fake(httproute())
    r = gateway(fake)
    with pytest.raises(RouterError):
        r.write(r.read(), SHADOW, Mirror(Arm(CANDIDATE, "elsewhere"), 10))
    assert fake.patches == []


def virtualservice(mirror: dict[str, Any] | None = None) -> dict[str, Any]:
    route: dict[str, Any] = {
        "name": "primary",
        "route": [
            {"destination": {"host": "fraud-v1", "port": {"number": 80}}, "weight": 100},
            {"destination": {"host": "fraud-v2.ml.svc.cluster.local", "port": {"number": 80}}, "weight": 0},
        ],
        "timeout": "3s",
    }
    if mirror is not None:
        route["mirror"] = mirror
    return {
        "metadata": {"name": "fraud", "namespace": "ml", "annotations": {OPT_IN: "ModelRollout/fraud"}},
        "spec": {
            "hosts": ["fraud"],
            "http": [{"name": "testers", "route": [{"destination": {"host": "t"}}]}, route],
        },
    }


def istio(fake: Fake) -> IstioRouter:
    r = IstioRouter(None, "ml", "fraud", route_name="primary", owner=OWNER)  # type: ignore[arg-type]
    r._co = fake  # type: ignore[assignment]
    return r


def test_istio_sets_mirror_and_mirror_percentage_and_removes_both_at_the_end() -> None:
    fake = Fake(virtualservice())
    r = istio(fake)
    carried = r.write(r.read(), SHADOW, Mirror(CAND, 20))
    route = fake.obj["spec"]["http"][1]
    assert route["mirror"] == {"host": "fraud-v2.ml.svc.cluster.local", "port": {"number": 80}}
    assert route["mirrorPercentage"] == {"value": 20.0}
    assert {
        "op": "test",
        "path": "/spec/http/1",
        "value": virtualservice()["spec"]["http"][1],
    } in fake.patches[0]
    assert carried.mirrors == {"fraud-v2": 20}
    r.write(r.read(), SHADOW, Mirror(CAND, 20))
    assert len(fake.patches) == 1  # already so
    r.write(r.read(), {STABLE: 100, CAND: 0})
    assert fake.obj == virtualservice()


def test_istio_never_replaces_a_mirror_it_does_not_own() -> None:
    fake = Fake(virtualservice({"host": "audit"}))
    r = istio(fake)
    with pytest.raises(RouterError, match="audit"):
        r.write(r.read(), SHADOW, Mirror(CAND, 20))
    # A write without a mirror leaves the user's mirror alone.
    r.write(r.read(), {STABLE: 90, CAND: 10})
    assert fake.obj["spec"]["http"][1]["mirror"] == {"host": "audit"}


def test_istio_a_concurrent_edit_of_the_route_fails_the_whole_patch() -> None:
    fake = Fake(virtualservice())
    r = istio(fake)
    state = r.read()
    fake.obj["spec"]["http"][1]["timeout"] = "9s"
    with pytest.raises(ApiException) as e:
        r.write(state, {STABLE: 90, CAND: 10}, Mirror(CAND, 20))
    assert e.value.status == 422
    assert "mirror" not in fake.obj["spec"]["http"][1]
    assert fake.obj["spec"]["http"][1]["route"][1]["weight"] == 0


def test_a_router_without_mirroring_refuses_a_mirror() -> None:
    from model_rollouts.traffic.router import Capabilities

    with pytest.raises(RouterError, match="cannot mirror"):
        Capabilities(mirroring=False).fit_mirror("spec.trafficRouting.x", Mirror(CAND, 10))
    Capabilities(mirroring=False).fit_mirror("spec.trafficRouting.x", None)
    assert GatewayAPIRouter.capabilities.mirroring and IstioRouter.capabilities.mirroring
