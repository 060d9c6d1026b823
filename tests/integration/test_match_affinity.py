"""Header/cookie match (testers go to the candidate) and sticky cohorts (affinity), through the real proxy.

Both routers, parametrized: a real kube-apiserver with the Gateway API CRDs v1.6.3 or Istio's CRDs,
real Prometheus and model servers, the operator as its ServiceAccount, and Debian's nginx following
the route the operator writes (``tests/harness/gateway.py``). Every request goes through nginx and is
counted at the model servers; the route carries a rule of the user's (``debug``) next to the managed
one, which must come out of the rollout byte-identical.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from kubernetes import client

from model_rollouts.traffic.istio import GROUP as ISTIO_GROUP
from model_rollouts.traffic.istio import PLURAL as VS_PLURAL
from model_rollouts.traffic.istio import VERSION as ISTIO_VERSION
from model_rollouts.traffic.rules import PREFIX
from tests.harness.cluster import MissingComponent, istio_crds, kubectl_apply
from tests.harness.gateway import Gateway, find_nginx
from tests.harness.loadgen import LoadGenerator
from tests.harness.objects import CANDIDATE, ROUTE, STABLE, delete_all, phase, rollout
from tests.harness.stack import MANAGED_BY, Stack

ROUTERS = ("gatewayAPI", "istio")
ROLLOUTS = "modelrollouts"
TESTER = {"X-Tester": "yes"}


def route_doc(router: str, namespace: str) -> dict[str, Any]:
    """The managed rule (all on stable) and a rule of the user's that the operator must not touch."""
    meta = {"name": ROUTE, "namespace": namespace, "annotations": {MANAGED_BY: "*"}}
    if router == "istio":
        return {
            "apiVersion": f"{ISTIO_GROUP}/{ISTIO_VERSION}",
            "kind": "VirtualService",
            "metadata": meta,
            "spec": {
                "hosts": [ROUTE],
                "http": [
                    {
                        "name": "debug",
                        "match": [{"headers": {"x-debug": {"exact": "1"}}}],
                        "route": [{"destination": {"host": STABLE, "port": {"number": 80}}}],
                    },
                    {
                        "name": "primary",
                        "match": [{"uri": {"prefix": "/"}}],
                        "route": [
                            {"destination": {"host": STABLE, "port": {"number": 80}}, "weight": 100},
                            {"destination": {"host": CANDIDATE, "port": {"number": 80}}, "weight": 0},
                        ],
                        "timeout": "5s",
                    },
                ],
            },
        }
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": meta,
        "spec": {
            "parentRefs": [{"name": "gateway"}],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "backendRefs": [
                        {"name": STABLE, "port": 80, "weight": 100},
                        {"name": CANDIDATE, "port": 80, "weight": 0},
                    ],
                },
                {
                    "name": "debug",
                    "matches": [{"headers": [{"name": "x-debug", "value": "1"}]}],
                    "backendRefs": [{"name": STABLE, "port": 80}],
                },
            ],
        },
    }


@dataclass
class Env:
    stack: Stack
    router: str
    gateway: Gateway

    @property
    def gvp(self) -> tuple[str, str, str]:
        if self.router == "istio":
            return ISTIO_GROUP, ISTIO_VERSION, VS_PLURAL
        return "gateway.networking.k8s.io", "v1", "httproutes"

    def route(self) -> dict[str, Any]:
        g, v, p = self.gvp
        obj: dict[str, Any] = client.CustomObjectsApi(self.stack.api).get_namespaced_custom_object(
            g, v, self.stack.namespace, p, ROUTE
        )
        return obj

    def rules(self, route: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        spec = (route or self.route())["spec"]
        return copy.deepcopy(spec["http" if self.router == "istio" else "rules"])

    def managed_index(self, rules: list[dict[str, Any]]) -> int:
        if self.router == "istio":
            return next(i for i, r in enumerate(rules) if r.get("name") == "primary")
        return 0

    def weights(self) -> dict[str, int]:
        rules = self.rules()
        managed = rules[self.managed_index(rules)]
        if self.router == "istio":
            return {d["destination"]["host"]: int(d.get("weight", 0)) for d in managed["route"]}
        return {r["name"]: int(r.get("weight", 1)) for r in managed["backendRefs"]}

    def routing(self, **extra: Any) -> dict[str, Any]:
        base: dict[str, Any] = (
            {"istio": {"virtualService": ROUTE, "routeName": "primary"}}
            if self.router == "istio"
            else {"gatewayAPI": {"httpRoute": ROUTE}}
        )
        return {**base, **extra}

    def wait_route(self, pred: Any, timeout: float = 60.0) -> dict[str, Any]:
        """Until the route satisfies ``pred`` and nginx serves only that version (or a later one)."""
        deadline = time.monotonic() + timeout
        while True:
            route = self.route()
            if pred(route):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"route never got there: {json.dumps(self.rules(route))[:3000]}")
            time.sleep(0.2)
        self.gateway.wait_version(str(route["metadata"]["resourceVersion"]), timeout=20)
        return route


def ours(rules: list[dict[str, Any]]) -> list[str]:
    return [str(r.get("name")) for r in rules if str(r.get("name") or "").startswith(PREFIX)]


def served(stack: Stack) -> dict[str, int]:
    import re

    return {
        svc: int(
            sum(
                float(v) for v in re.findall(r"^model_requests_total\{[^}]*\} (\S+)$", s.metrics_text(), re.M)
            )
        )
        for svc, s in stack.servers.items()
    }


def send(env: Env, n: int, **kwargs: Any) -> tuple[dict[str, int], LoadGenerator]:
    """Send ``n`` requests through nginx; the requests each model server counted meanwhile."""
    before = served(env.stack)
    gen = LoadGenerator(
        api=None,
        namespace=env.stack.namespace,
        httproute=ROUTE,
        backends={svc: s.url for svc, s in env.stack.servers.items()},
        rps=250,
        max_seconds=60,
        max_requests=n,
        feedback=False,
        workers=16,
        via=env.gateway.url,
        **kwargs,
    ).start()
    assert gen.wait(90), "the load generator did not finish"
    time.sleep(0.5)
    after = served(env.stack)
    return {k: after[k] - before[k] for k in after}, gen


@pytest.fixture(scope="module", params=ROUTERS)
def env(request: pytest.FixtureRequest, real_components: None) -> Iterator[Env]:
    router = str(request.param)
    try:
        find_nginx()
        if router == "istio":
            istio_crds()
    except MissingComponent as e:
        import os

        if os.environ.get("MODEL_ROLLOUTS_REQUIRE_INTEGRATION") == "1":
            pytest.fail(f"integration components missing and required: {e}")
        print(f"\nSKIP match/affinity ({router}): {e}")
        pytest.skip(str(e))
    with Stack(
        variants={STABLE: {"error_rate": 0.0}, CANDIDATE: {"error_rate": 0.0}},
        route=ROUTE,
        rps=5,
        max_seconds=900,
        istio=router == "istio",
    ) as stack:
        assert stack.loadgen is not None and stack.workdir is not None
        stack.loadgen.stop()  # only the tests' own requests reach the servers
        kubectl_apply(stack.api, [route_doc(router, stack.namespace)])
        gateway = Gateway(
            stack.api,
            stack.namespace,
            ROUTE,
            {svc: s.url for svc, s in stack.servers.items()},
            kind="VirtualService" if router == "istio" else "HTTPRoute",
            rule_index="primary" if router == "istio" else 0,
            workdir=stack.workdir / "gateway",
        ).start()
        try:
            stack.start_operator()
            yield Env(stack, router, gateway)
        finally:
            gateway.close()


@pytest.fixture()
def fresh(env: Env) -> Iterator[Env]:
    kubectl_apply(env.stack.api, [route_doc(env.router, env.stack.namespace)])
    env.wait_route(lambda r: not ours(env.rules(r)) and env.weights() == {STABLE: 100, CANDIDATE: 0})
    yield env
    delete_all(env.stack, ROLLOUTS)


def _rollout(env: Env, name: str, **routing: Any) -> dict[str, Any]:
    assert env.stack.prom is not None
    doc = rollout(
        name, env.stack.prom.url, [{"setWeight": 30}, {"pause": {}}], trafficRouting=env.routing(**routing)
    )
    doc["spec"]["analysis"]["noData"] = "hold"
    return doc


def test_testers_reach_the_candidate_the_rest_follow_the_weights_and_the_rule_goes_at_the_end(
    fresh: Env,
) -> None:
    env, stack = fresh, fresh.stack
    before = env.rules()
    match = {"headers": [{"name": "X-Tester", "value": "yes"}]}
    stack.apply(_rollout(env, "testers", match=match))
    route = env.wait_route(lambda r: len(ours(env.rules(r))) == 1 and env.weights()[CANDIDATE] == 30)
    during = env.rules(route)
    mine = ours(during)
    # Istio: the operator's route comes right before the weighted one; Gateway API: appended last.
    idx = next(i for i, r in enumerate(during) if r.get("name") == mine[0])
    if env.router == "istio":
        assert during[idx + 1]["name"] == "primary", [r.get("name") for r in during]
    else:
        assert idx == len(during) - 1
    others = [r for r in during if r.get("name") not in mine]
    m = env.managed_index(before)
    assert [r for i, r in enumerate(others) if i != m] == [r for i, r in enumerate(before) if i != m]

    testers, tgen = send(env, 600, headers=TESTER)
    assert not any(tgen.errors.values()), tgen.errors
    # Counted at the servers: every tester request the proxy passed on reached the candidate (an
    # open-loop generator may drop a few it could not send in time: it never sent those).
    assert testers[STABLE] == 0 and testers[CANDIDATE] == sum(tgen.ok.values()) >= 500, (
        testers,
        tgen.stats(),
    )
    rest, rgen = send(env, 2400)
    total = sum(rest.values())
    assert total >= 2000 and total == sum(rgen.ok.values()) and not any(rgen.errors.values()), (
        rest,
        rgen.stats(),
    )
    share = 100.0 * rest[CANDIDATE] / total
    assert abs(share - 30) <= 3, rest
    print(f"\n{env.router}: testers {testers}; others {rest} ({share:.1f}% on the candidate at weight 30)")

    stack.annotate(ROLLOUTS, "testers", {"mlrollouts.io/abort": "test"})
    stack.wait_for(ROLLOUTS, "testers", lambda o: phase(o) == "Aborted", 60)
    route = env.wait_route(lambda r: not ours(env.rules(r)) and env.weights() == {STABLE: 100, CANDIDATE: 0})
    assert env.rules(route) == before  # the operator's rule is gone; every other rule as it was
    after, agen = send(env, 200, headers=TESTER)
    assert after[CANDIDATE] == 0 and after[STABLE] == sum(agen.ok.values()) > 150, after


def test_each_user_stays_on_one_arm_and_the_sticky_rules_go_at_promotion(fresh: Env) -> None:
    env, stack = fresh, fresh.stack
    before = env.rules()
    stack.apply(_rollout(env, "sticky", affinity={"cookie": "mlr-arm"}))
    route = env.wait_route(lambda r: len(ours(env.rules(r))) == 2 and env.weights()[CANDIDATE] == 30)
    users, per_user = 200, 20
    counted, gen = send(env, users * (per_user + 2), users=users, cookies=True)
    assert sum(counted.values()) == sum(gen.ok.values()) and not any(gen.errors.values()), (
        counted,
        gen.stats(),
    )
    seen = gen.user_backends
    assert len(seen) == users
    mixed = {u: s for u, s in seen.items() if len(s) != 1}
    assert not mixed, f"{len(mixed)} users saw two arms, e.g. {list(mixed.items())[:3]}"
    assert min(sum(s.values()) for s in seen.values()) >= per_user, sorted(
        sum(s.values()) for s in seen.values()
    )[:5]
    on_candidate = sum(1 for s in seen.values() if CANDIDATE in s)
    assert 0.2 * users <= on_candidate <= 0.4 * users, on_candidate
    print(f"\n{env.router}: {users} users x {per_user} requests, each on one arm; {on_candidate} on v2")
    assert len(env.rules(route)) == len(before) + 2

    stack.annotate(ROLLOUTS, "sticky", {"mlrollouts.io/promote-full": "test"})
    stack.wait_for(ROLLOUTS, "sticky", lambda o: phase(o) == "Promoted", 60)
    route = env.wait_route(lambda r: not ours(env.rules(r)) and env.weights() == {STABLE: 0, CANDIDATE: 100})
    after = env.rules(route)
    m = env.managed_index(before)
    strip = "route" if env.router == "istio" else "backendRefs"
    for rules in (before, after):
        for ref in rules[m][strip]:
            ref.pop("weight", None)
    assert after == before  # no sticky rule, no response-header filter left; the rest untouched
    # Users with a stable cookie now follow the weights: all go to the promoted candidate.
    counted, pgen = send(env, 200, users=20, cookies=True)
    assert counted[STABLE] == 0 and counted[CANDIDATE] == sum(pgen.ok.values()) > 150, counted


def test_the_api_server_refuses_matches_and_affinities_it_cannot_route(env: Env) -> None:
    from kubernetes.client.exceptions import ApiException

    bad = [
        ({"match": {}}, "at least one header or cookie"),
        ({"match": {"headers": [{"name": "Cookie", "value": "a=1"}]}}, "match.cookies"),
        (
            {"match": {"headers": [{"name": "x-a", "value": "1"}, {"name": "X-A", "value": "2"}]}},
            "at most once",
        ),
        ({"match": {"cookies": [{"name": "a", "value": "1"}, {"name": "b", "value": "2"}]}}, "cookies"),
        ({"match": {"cookies": [{"name": "a", "value": "1; b=2"}]}}, "value"),
        ({"affinity": {}}, "exactly one of cookie, header"),
        ({"affinity": {"cookie": "a", "header": "b"}}, "exactly one of cookie, header"),
    ]
    co = client.CustomObjectsApi(env.stack.api)
    for i, (routing, words) in enumerate(bad):
        doc = _rollout(env, f"bad-{i}", **routing)
        with pytest.raises(ApiException) as e:
            co.create_namespaced_custom_object(
                "mlrollouts.io", "v1alpha1", env.stack.namespace, ROLLOUTS, doc
            )
        assert e.value.status == 422 and words in str(e.value.body), (routing, e.value.body)


def test_an_experiment_match_without_a_variant_is_invalid_naming_the_field(fresh: Env) -> None:
    from tests.harness.objects import cond, experiment

    env, stack = fresh, fresh.stack
    before = env.route()["metadata"]["resourceVersion"]
    assert stack.prom is not None
    variants = [{"name": "control", "service": STABLE, "control": True}, {"name": "b", "service": CANDIDATE}]
    doc = experiment("exp-match", stack.prom.url, variants, ROUTE)
    doc["spec"]["trafficRouting"] = env.routing(match={"headers": [{"name": "x-t", "value": "1"}]})
    stack.apply(doc)
    obj = stack.wait_for(
        "modelexperiments", "exp-match", lambda o: cond(o, "Valid").get("status") == "False", 60
    )
    assert "spec.trafficRouting.match.variant" in cond(obj, "Valid")["message"]
    assert env.route()["metadata"]["resourceVersion"] == before  # traffic not touched
    delete_all(stack, "modelexperiments")


def test_an_experiment_routes_its_beta_cohort_to_the_variant_keeps_users_sticky_and_cleans_up_on_delete(
    fresh: Env,
) -> None:
    from tests.harness.objects import experiment

    env, stack = fresh, fresh.stack
    before = env.rules()
    assert stack.prom is not None
    variants = [{"name": "control", "service": STABLE, "control": True}, {"name": "b", "service": CANDIDATE}]
    doc = experiment("ab", stack.prom.url, variants, ROUTE)
    doc["spec"]["trafficRouting"] = env.routing(
        match={"cookies": [{"name": "beta", "value": "1"}], "variant": "b"}, affinity={"cookie": "arm"}
    )
    stack.apply(doc)
    env.wait_route(lambda r: len(ours(env.rules(r))) == 3 and env.weights() == {STABLE: 50, CANDIDATE: 50})
    beta, bgen = send(env, 300, headers={"Cookie": "lang=en; beta=1"})
    assert beta[STABLE] == 0 and beta[CANDIDATE] == sum(bgen.ok.values()) >= 250, beta
    users, per_user = 200, 20
    counted, gen = send(env, users * (per_user + 2), users=users, cookies=True)
    assert sum(counted.values()) == sum(gen.ok.values()) and not any(gen.errors.values()), gen.stats()
    seen = gen.user_backends
    assert len(seen) == users and all(len(s) == 1 for s in seen.values()), [
        s for s in seen.values() if len(s) > 1
    ]
    assert min(sum(s.values()) for s in seen.values()) >= per_user
    on_b = sum(1 for s in seen.values() if CANDIDATE in s)
    assert 0.35 * users <= on_b <= 0.65 * users, on_b
    print(f"\n{env.router}: experiment: beta cohort {beta}; {users} users each on one arm, {on_b} on b")

    client.CustomObjectsApi(stack.api).delete_namespaced_custom_object(
        "mlrollouts.io", "v1alpha1", stack.namespace, "modelexperiments", "ab"
    )
    route = env.wait_route(lambda r: not ours(env.rules(r)) and env.weights() == {STABLE: 100, CANDIDATE: 0})
    assert env.rules(route) == before


def test_a_guardrail_rollback_removes_the_operators_rules_and_filters(fresh: Env) -> None:
    env, stack = fresh, fresh.stack
    before = env.rules()
    stack.servers[CANDIDATE].set(error_rate=0.5)
    try:
        match = {"headers": [{"name": "X-Tester", "value": "yes"}]}
        stack.apply(_rollout(env, "breach", match=match, affinity={"cookie": "arm"}))
        env.wait_route(lambda r: len(ours(env.rules(r))) == 3 and env.weights()[CANDIDATE] == 30)
        gen = LoadGenerator(
            api=None,
            namespace=stack.namespace,
            httproute=ROUTE,
            backends={svc: s.url for svc, s in stack.servers.items()},
            rps=60,
            max_seconds=90,
            max_requests=60 * 90,
            feedback=False,
            via=env.gateway.url,
            users=50,
            cookies=True,
        ).start()
        try:
            obj = stack.wait_for(ROLLOUTS, "breach", lambda o: phase(o) == "RolledBack", 80)
        finally:
            gen.stop()
        assert "error-rate" in obj["status"]["message"]
        route = env.wait_route(
            lambda r: not ours(env.rules(r)) and env.weights() == {STABLE: 100, CANDIDATE: 0}
        )
        assert env.rules(route) == before
    finally:
        stack.servers[CANDIDATE].set(error_rate=0.0)
