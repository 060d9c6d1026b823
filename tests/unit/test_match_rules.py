"""The operator's own match and sticky rules (traffic/rules.py) on both routers.

A fake CustomObjectsApi applies each JSON patch with the ``jsonpatch`` library (RFC 6902, as the API
server does) and answers 422 when a ``test`` fails. Through the real proxy, on the real API server:
tests/integration/test_match_affinity.py.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import jsonpatch
import pytest
from kubernetes.client.exceptions import ApiException

from model_rollouts.api.common import TrafficRouting
from model_rollouts.traffic import rules
from model_rollouts.traffic.gateway_api import GatewayAPIRouter
from model_rollouts.traffic.istio import IstioRouter
from model_rollouts.traffic.optin import OPT_IN
from model_rollouts.traffic.router import RETIRED, Arm, RouterError

V1, V2 = "fraud-v1", "fraud-v2"


class Fake:
    def __init__(self, obj: dict[str, Any]) -> None:
        self.obj = obj
        self.patches: list[list[dict[str, Any]]] = []

    def get_namespaced_custom_object(self, *args: Any, **kw: Any) -> dict[str, Any]:
        return copy.deepcopy(self.obj)

    def patch_namespaced_custom_object(self, *args: Any, **kw: Any) -> dict[str, Any]:
        ops = args[5]
        self.patches.append(ops)
        try:
            self.obj = jsonpatch.apply_patch(self.obj, ops)
        except (jsonpatch.JsonPatchTestFailed, jsonpatch.JsonPointerException) as e:
            raise ApiException(status=422, reason=str(e)) from e
        return copy.deepcopy(self.obj)


def httproute() -> dict[str, Any]:
    return {
        "kind": "HTTPRoute",
        "metadata": {"name": "fraud", "namespace": "ml", "annotations": {OPT_IN: "*"}},
        "spec": {
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/predict"}}],
                    "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": []}}],
                    "backendRefs": [
                        {"name": V1, "port": 80, "weight": 100},
                        {"name": V2, "port": 80, "weight": 0},
                    ],
                },
                {
                    "name": "debug",
                    "matches": [{"headers": [{"name": "x-debug", "type": "Exact", "value": "1"}]}],
                    "backendRefs": [{"name": V1, "port": 80, "weight": 1}],
                },
            ]
        },
    }


def virtualservice() -> dict[str, Any]:
    return {
        "kind": "VirtualService",
        "metadata": {"name": "fraud", "namespace": "ml", "annotations": {OPT_IN: "*"}},
        "spec": {
            "http": [
                {
                    "name": "debug",
                    "match": [{"headers": {"x-debug": {"exact": "1"}}}],
                    "route": [{"destination": {"host": V1}}],
                },
                {
                    "name": "primary",
                    "match": [{"uri": {"prefix": "/predict"}}],
                    "route": [
                        {"destination": {"host": f"{V1}.ml.svc.cluster.local"}, "weight": 100},
                        {"destination": {"host": V2}, "weight": 0},
                    ],
                    "timeout": "5s",
                },
            ]
        },
    }


def gw(fake: Fake) -> GatewayAPIRouter:
    r = GatewayAPIRouter(None, "ml", "fraud", 0, owner=("ModelRollout", "fraud"))  # type: ignore[arg-type]
    r._co = fake  # type: ignore[assignment]
    return r


def istio(fake: Fake, route: str | None = "primary") -> IstioRouter:
    r = IstioRouter(None, "ml", "fraud", route, owner=("ModelRollout", "fraud"))  # type: ignore[arg-type]
    r._co = fake  # type: ignore[assignment]
    return r


def routing(**extra: Any) -> TrafficRouting:
    return TrafficRouting.model_validate({"gatewayAPI": {"httpRoute": "fraud"}, **extra})


MATCH = {"headers": [{"name": "X-Tester", "value": "yes"}], "cookies": [{"name": "beta", "value": "on"}]}


def weights(w2: int) -> dict[Arm, int]:
    return {Arm("stable", V1): 100 - w2, Arm("candidate", V2): w2}


def owned(w2: int, active: bool = True, **spec: Any) -> rules.Owned:
    return rules.desired("ModelRollout", "ml", "fraud", routing(**spec), weights(w2), active)


def write(router: Any, fake: Fake, w2: int, own: rules.Owned) -> None:
    router.write(router._state(copy.deepcopy(fake.obj)), weights(w2), owned=own)


def _others(obj: dict[str, Any], key: str) -> list[dict[str, Any]]:
    return [r for r in obj["spec"][key] if not rules.owned_name(r.get("name"))]


@pytest.mark.parametrize("kind", ["gatewayAPI", "istio"])
def test_match_rule_is_added_once_kept_and_removed_leaving_every_other_rule_identical(kind: str) -> None:
    doc = httproute() if kind == "gatewayAPI" else virtualservice()
    fake = Fake(copy.deepcopy(doc))
    router = gw(fake) if kind == "gatewayAPI" else istio(fake)
    key = "rules" if kind == "gatewayAPI" else "http"
    write(router, fake, 10, owned(10, match=MATCH))
    names = [r.get("name") for r in fake.obj["spec"][key]]
    mine = [n for n in names if rules.owned_name(n)]
    assert len(mine) == 1 and mine[0].endswith("-match")
    if kind == "istio":  # before the weighted route, so Istio tries it first
        assert names == ["debug", mine[0], "primary"]
    else:  # appended: the managed rule keeps its index
        assert names == [None, "debug", mine[0]]
    rule = next(r for r in fake.obj["spec"][key] if r.get("name") == mine[0])
    if kind == "gatewayAPI":
        assert rule["matches"] == [
            {
                "path": {"type": "PathPrefix", "value": "/predict"},
                "headers": [
                    {"name": "x-tester", "type": "Exact", "value": "yes"},
                    {
                        "name": "Cookie",
                        "type": "RegularExpression",
                        "value": rules.cookie_regex("beta", "on"),
                    },
                ],
            }
        ]
        assert [b["name"] for b in rule["backendRefs"]] == [V2]
        assert rule["filters"] == doc["spec"]["rules"][0]["filters"]  # the managed rule's own filters
    else:
        assert rule["match"] == [
            {
                "uri": {"prefix": "/predict"},
                "headers": {
                    "x-tester": {"exact": "yes"},
                    "cookie": {"regex": rules.cookie_regex("beta", "on")},
                },
            }
        ]
        assert [d["destination"]["host"] for d in rule["route"]] == [V2] and rule["timeout"] == "5s"
    # Only weights changed in the user's rules.
    before = _others(doc, key)
    assert len(_others(fake.obj, key)) == len(before)
    # The same desired state again: no request at all.
    n = len(fake.patches)
    write(router, fake, 10, owned(10, match=MATCH))
    write(router, fake, 30, owned(30, match=MATCH))
    assert len(fake.patches) == n + 1 and not any(
        "/spec/" + key + "/" in op["path"] and op["op"] == "remove" for op in fake.patches[-1]
    )
    # The end: the rule goes, everything else is as before (the weights back too).
    write(router, fake, 0, owned(0, active=False, match=MATCH))
    assert fake.obj == doc


@pytest.mark.parametrize("kind", ["gatewayAPI", "istio"])
def test_affinity_hands_out_the_arm_and_pins_it_while_two_arms_have_weight(kind: str) -> None:
    doc = httproute() if kind == "gatewayAPI" else virtualservice()
    fake = Fake(copy.deepcopy(doc))
    router = gw(fake) if kind == "gatewayAPI" else istio(fake)
    key = "rules" if kind == "gatewayAPI" else "http"
    aff = {"affinity": {"cookie": "arm"}}
    write(router, fake, 0, owned(0, **aff))
    assert fake.obj == doc  # before the first weight nobody is pinned
    write(router, fake, 20, owned(20, **aff))
    mine = [r for r in fake.obj["spec"][key] if rules.owned_name(r.get("name"))]
    assert [r["name"].rsplit("-sticky-", 1)[1] for r in mine] == [V1, V2]
    managed = fake.obj["spec"][key][0] if kind == "gatewayAPI" else fake.obj["spec"][key][-1]
    if kind == "gatewayAPI":
        for ref in managed["backendRefs"]:
            (f,) = ref["filters"]
            assert f["responseHeaderModifier"]["add"][0] == {
                "name": "Set-Cookie",
                "value": f"arm={ref['name']}; Path=/",
            }
        assert mine[1]["matches"][0]["headers"] == [
            {"name": "Cookie", "type": "RegularExpression", "value": rules.cookie_regex("arm", V2)}
        ]
    else:
        hosts = [d["headers"]["response"]["add"]["set-cookie"] for d in managed["route"]]
        assert hosts == [f"arm={V1}; Path=/", f"arm={V2}; Path=/"]
        assert mine[1]["match"][0]["headers"] == {"cookie": {"regex": rules.cookie_regex("arm", V2)}}
        assert [r.get("name") for r in fake.obj["spec"][key]][-1] == "primary"
    # An arm at weight 0 loses its sticky rule (its users are split again); the end removes all.
    write(router, fake, 100, owned(100, **aff))
    assert not [r for r in fake.obj["spec"][key] if rules.owned_name(r.get("name"))]
    write(router, fake, 100, owned(100, active=False, **aff))
    expected = copy.deepcopy(doc)
    if kind == "gatewayAPI":
        expected["spec"]["rules"][0]["backendRefs"][0]["weight"] = 0
        expected["spec"]["rules"][0]["backendRefs"][1]["weight"] = 100
    else:
        expected["spec"]["http"][1]["route"][0]["weight"] = 0
        expected["spec"]["http"][1]["route"][1]["weight"] = 100
    assert fake.obj == expected


def test_cookie_regex_matches_the_cookie_and_nothing_like_it() -> None:
    rx = re.compile(rules.cookie_regex("arm", "fraud-v2"))
    for header in ("arm=fraud-v2", "a=1; arm=fraud-v2", "arm=fraud-v2; b=2", "a=1;arm=fraud-v2;b=2"):
        assert rx.fullmatch(header), header
    for header in ("arm=fraud-v22", "xarm=fraud-v2", "arm=fraud-v1", "a=arm=fraud-v2", ""):
        assert not rx.fullmatch(header), header


def test_a_backendref_with_its_own_response_header_filter_is_refused_naming_affinity() -> None:
    doc = httproute()
    doc["spec"]["rules"][0]["backendRefs"][1]["filters"] = [
        {"type": "ResponseHeaderModifier", "responseHeaderModifier": {"add": [{"name": "x", "value": "y"}]}}
    ]
    fake = Fake(doc)
    with pytest.raises(RouterError) as e:
        write(gw(fake), fake, 20, owned(20, affinity={"cookie": "arm"}))
    assert e.value.field == rules.AFFINITY_FIELD and not fake.patches


def test_a_concurrent_change_of_the_operators_rule_fails_the_whole_patch() -> None:
    fake = Fake(virtualservice())
    router = istio(fake)
    write(router, fake, 10, owned(10, match=MATCH))
    stale = router._state(copy.deepcopy(fake.obj))
    fake.obj["spec"]["http"][1]["name"] = "renamed-by-someone"  # the operator's route, renamed
    before = copy.deepcopy(fake.obj)
    with pytest.raises(ApiException):
        router.write(stale, weights(0), owned=owned(0, active=False, match=MATCH))
    assert fake.obj == before


def test_an_istio_router_without_route_name_ignores_the_operators_routes() -> None:
    vs = virtualservice()
    del vs["spec"]["http"][0]  # one route of the user's
    fake = Fake(vs)
    router = istio(fake, route=None)
    write(router, fake, 10, owned(10, match=MATCH))
    assert len(fake.obj["spec"]["http"]) == 2
    assert router.read().weights == {V1: 90, V2: 10}


def test_desired_rules() -> None:
    assert owned(10, active=False, match=MATCH).match is None
    assert owned(0, affinity={"header": "X-Arm"}).affinity is None  # one arm with weight: no pinning
    o = owned(10, affinity={"header": "X-Arm"})
    assert o.affinity == ("header", "x-arm") and o.sticky == (V1, V2)
    retired = rules.desired(
        "ModelRollout",
        "ml",
        "fraud",
        routing(affinity={"cookie": "a"}),
        {**weights(10), Arm(RETIRED, "old"): 0},
        True,
    )
    assert retired.arms == (V1, V2)
    # Two owners never share a rule name.
    other = rules.desired(
        "ModelExperiment", "ml", "fraud", routing(affinity={"cookie": "a"}), weights(10), True
    )
    assert other.prefix != owned(10, match=MATCH).prefix


def test_match_variant_is_required_on_experiments_and_refused_on_rollouts() -> None:
    with pytest.raises(RouterError) as e:
        rules.check("ModelExperiment", routing(match=MATCH), [Arm("control", V1), Arm("b", V2)])
    assert e.value.field == "spec.trafficRouting.match.variant"
    with pytest.raises(RouterError):
        rules.check("ModelExperiment", routing(match={**MATCH, "variant": "c"}), [Arm("control", V1)])
    rules.check(
        "ModelExperiment", routing(match={**MATCH, "variant": "b"}), [Arm("control", V1), Arm("b", V2)]
    )
    with pytest.raises(RouterError):
        rules.check("ModelRollout", routing(match={**MATCH, "variant": "b"}), [Arm("candidate", V2)])
    exp = rules.desired(
        "ModelExperiment",
        "ml",
        "x",
        routing(match={**MATCH, "variant": "b"}),
        {Arm("control", V1): 50, Arm("b", V2): 50},
        True,
    )
    assert exp.match is not None and exp.match[1] == V2


def test_a_stale_or_trimmed_copy_of_the_route_never_duplicates_the_operators_rule() -> None:
    from model_rollouts.traffic import watched

    fake = Fake(httproute())
    router = gw(fake)
    old = watched.trim(fake.obj)  # what the watch kept, before the operator's rule existed
    write(router, fake, 10, owned(10, match=MATCH))
    for _ in range(3):
        router.write(router._state(copy.deepcopy(old)), weights(10), owned=owned(10, match=MATCH))
    assert len([r for r in fake.obj["spec"]["rules"] if rules.owned_name(r.get("name"))]) == 1
    # The end from the same stale copy still removes it.
    router.write(router._state(copy.deepcopy(old)), weights(0), owned=owned(0, active=False, match=MATCH))
    assert fake.obj == httproute()


def test_a_rule_list_changed_since_the_read_fails_the_patch() -> None:
    fake = Fake(virtualservice())
    router = istio(fake)
    stale = router._state(copy.deepcopy(fake.obj))
    fake.obj["spec"]["http"].insert(0, {"name": "new", "route": [{"destination": {"host": V1}}]})
    before = copy.deepcopy(fake.obj)
    with pytest.raises(ApiException):
        router.write(stale, weights(10), owned=owned(10, match=MATCH))
    assert fake.obj == before


def test_the_controller_asks_for_rules_only_while_the_object_runs() -> None:
    from model_rollouts.api.rollout import ModelRolloutSpec, ModelRolloutStatus
    from model_rollouts.handlers.rollout import RolloutController

    spec = ModelRolloutSpec.model_validate(
        {
            "stable": {"service": V1},
            "candidate": {"service": V2},
            "trafficRouting": {
                "gatewayAPI": {"httpRoute": "fraud"},
                "match": MATCH,
                "affinity": {"cookie": "a"},
            },
            "steps": [{"setWeight": 10}],
            "analysis": {"interval": "5s", "provider": "prometheus"},
        }
    )
    c = RolloutController("ml", "fraud")
    running = c.owned(spec, ModelRolloutStatus(phase="Progressing"), weights(10))
    assert running.match == owned(10, match=MATCH).match and running.sticky == (V1, V2)
    for phase in ("Promoted", "RolledBack", "Aborted"):
        done = c.owned(spec, ModelRolloutStatus(phase=phase), weights(0))
        assert done.match is None and done.affinity is None and done.uses, phase
    deleting = c.owned(spec, ModelRolloutStatus(phase="Progressing"), weights(0), active=False)
    assert deleting.match is None and deleting.affinity is None


@pytest.mark.parametrize("kind", ["gatewayAPI", "istio"])
def test_the_argocd_ignore_expressions_hide_exactly_what_the_operator_adds(kind: str) -> None:
    """Argo CD removes each jqPathExpression's paths from live and Git before it diffs (gojq; here jq)."""
    import json
    import shutil
    import subprocess
    from pathlib import Path

    import yaml

    jq = shutil.which("jq")
    if jq is None:
        pytest.skip("no jq binary on PATH (Debian package jq)")
    app = yaml.safe_load(
        (Path(__file__).parents[2] / "manifests" / "argocd" / "application-team-rollouts.yaml").read_text()
    )
    route_kind = "HTTPRoute" if kind == "gatewayAPI" else "VirtualService"
    exprs = [
        e for d in app["spec"]["ignoreDifferences"] if d["kind"] == route_kind for e in d["jqPathExpressions"]
    ]

    def normalized(obj: dict[str, Any]) -> Any:
        program = " | ".join(f"del({e})" for e in exprs)  # one at a time, in order, as Argo CD does
        out = subprocess.run(
            [jq, "-c", program], input=json.dumps(obj), capture_output=True, text=True, check=True
        )
        return json.loads(out.stdout)

    git = httproute() if kind == "gatewayAPI" else virtualservice()
    fake = Fake(copy.deepcopy(git))
    router = gw(fake) if kind == "gatewayAPI" else istio(fake)
    write(router, fake, 20, owned(20, match=MATCH, affinity={"cookie": "arm"}))
    live = fake.obj
    assert live != git
    assert normalized(live) == normalized(git)  # no drift shown for the operator's rules and weights
    # A change of the user's own rule still shows.
    edited = copy.deepcopy(live)
    key = "rules" if kind == "gatewayAPI" else "http"
    next(r for r in edited["spec"][key] if r.get("name") == "debug")["name"] = "debug2"
    assert normalized(edited) != normalized(git)
