"""The router registry: which router a spec selects, the "not implemented" answer for routers the CRD
offers but this version lacks, the one-owner key from the raw spec, capabilities, and the route state
a tick reads once (no request when the route already carries the weights)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from model_rollouts.api.common import TrafficRouting
from model_rollouts.traffic import registry
from model_rollouts.traffic.gateway_api import OPT_IN, GatewayAPIRouter
from model_rollouts.traffic.router import RETIRED, Arm, Capabilities, RouterError
from tests.unit.test_route_opt_in import FakeRoutes


def test_the_registry_finds_the_gateway_api_router_and_answers_for_the_others() -> None:
    assert set(registry.ROUTERS) == {"gatewayAPI"}
    assert set(registry.OFFERED) == {"gatewayAPI", "istio", "replicas", "kserve"}
    router, config = registry.selected(TrafficRouting.model_validate({"gatewayAPI": {"httpRoute": "r"}}))
    assert router.name == "gatewayAPI" and config.httpRoute == "r"
    offered = (
        ("istio", {"virtualService": "vs"}),
        ("replicas", {"totalReplicas": 4}),
        ("kserve", {"inferenceService": "fraud"}),
    )
    for name, config in offered:
        routing = TrafficRouting.model_validate({name: config})
        with pytest.raises(RouterError) as err:
            registry.selected(routing)
        assert err.value.field == f"spec.trafficRouting.{name}"
        assert "not implemented in this version; use gatewayAPI" in err.value.message
    with pytest.raises(RouterError, match="set exactly one router"):
        registry.selected(TrafficRouting.model_construct())


def test_the_one_owner_key_comes_from_the_router_of_the_raw_spec() -> None:
    key = registry.route_key("ml", {"gatewayAPI": {"httpRoute": "fraud", "ruleIndex": 2}})
    assert key is not None and key[0] == ("ml", "fraud", 2) and key[1].name == "gatewayAPI"
    default = registry.route_key("ml", {"gatewayAPI": {"httpRoute": "fraud"}})
    assert default is not None and default[0] == ("ml", "fraud", 0)
    assert registry.route_key("ml", {"gatewayAPI": {"ruleIndex": "x"}}) is None
    assert registry.route_key("ml", {"istio": {"virtualService": "vs"}}) is None  # no such router yet


def test_capabilities_refuse_what_the_router_cannot_carry() -> None:
    caps = Capabilities(max_arms=2, granularity=5)
    caps.fit("f", {Arm("a", "s1"): 50, Arm("b", "s2"): 50, Arm(RETIRED, "old"): 0})
    with pytest.raises(RouterError, match="at most 2 arms"):
        caps.fit("f", {Arm("a", "s1"): 40, Arm("b", "s2"): 30, Arm("c", "s3"): 30})
    with pytest.raises(RouterError, match="steps of 5; not so for s2"):
        caps.fit("f", {Arm("a", "s1"): 65, Arm("b", "s2"): 33})


class Counting(FakeRoutes):
    def __init__(self, annotations: dict[str, str] | None) -> None:
        super().__init__(annotations)
        self.gets = 0

    def get_namespaced_custom_object(self, *args: Any, **kw: Any) -> dict[str, Any]:
        self.gets += 1
        return copy.deepcopy(self.route)


def test_one_read_then_no_write_when_the_route_already_carries_the_weights() -> None:
    fake = Counting({OPT_IN: "ModelExperiment/ab"})
    r = GatewayAPIRouter(None, "ml", "fraud", owner=("ModelExperiment", "ab"))  # type: ignore[arg-type]
    r._co = fake  # type: ignore[assignment]
    state = r.read()
    arms = [Arm("control", "v1"), Arm("treatment", "v2")]
    r.admit(state, arms)
    same = {arms[0]: 100, arms[1]: 0, Arm(RETIRED, "gone"): 0}  # a retired Service the route lacks
    assert state.carries(same) and r.write(state, same) is state
    assert (fake.gets, fake.patches) == (1, [])
    moved = r.write(state, {arms[0]: 60, arms[1]: 40})
    assert moved.weights == {"v1": 60, "v2": 40} and not moved.wrong({arms[0]: 60, arms[1]: 40})
    assert fake.gets == 1 and len(fake.patches) == 1  # verified from the PATCH response, not a re-read
    with pytest.raises(RouterError, match="no backendRef for service"):
        r.admit(state, [*arms, Arm("v3", "v3")])
    r.admit(state, [*arms, Arm(RETIRED, "v3")])  # a retired arm need not be in the route
