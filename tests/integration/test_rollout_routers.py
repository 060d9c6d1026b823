"""The core rollout scenarios on both traffic routers, with every request through the real proxy.

Parametrized over the Gateway API router (HTTPRoute) and the Istio router (VirtualService, on
Istio's real CRDs from the istio.io/api module): real kube-apiserver, real Prometheus, real model
servers, the operator as its ServiceAccount, and Debian's nginx following the route the operator
writes (``tests/harness/gateway.py``). The traffic generator picks nothing itself: it sends every
request through nginx, so the split the model servers (and Prometheus) see is the proxy's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from model_rollouts.traffic.gateway_api import GatewayAPIRouter
from model_rollouts.traffic.istio import GROUP as ISTIO_GROUP
from model_rollouts.traffic.istio import PLURAL as VS_PLURAL
from model_rollouts.traffic.istio import VERSION as ISTIO_VERSION
from model_rollouts.traffic.istio import IstioRouter
from tests.harness.cluster import MissingComponent, istio_crds, kubectl_apply
from tests.harness.gateway import Gateway, find_nginx
from tests.harness.loadgen import LoadGenerator
from tests.harness.objects import CANDIDATE, ROUTE, STABLE, cond, delete_all, experiment, phase, rollout
from tests.harness.stack import MANAGED_BY, Stack, httproute

ROUTERS = ("gatewayAPI", "istio")
ROLLOUTS, EXPERIMENTS = "modelrollouts", "modelexperiments"


def virtualservice(
    name: str, namespace: str, weights: dict[str, int], managed_by: str | None = "*"
) -> dict[str, Any]:
    """A VirtualService whose ``primary`` http route weights the Services; ``managed_by``: its opt-in."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if managed_by is not None:
        meta["annotations"] = {MANAGED_BY: managed_by}
    return {
        "apiVersion": f"{ISTIO_GROUP}/{ISTIO_VERSION}",
        "kind": "VirtualService",
        "metadata": meta,
        "spec": {
            "hosts": [name],
            "http": [
                {
                    "name": "primary",
                    "route": [
                        {"destination": {"host": svc, "port": {"number": 80}}, "weight": w}
                        for svc, w in weights.items()
                    ],
                    "timeout": "5s",
                }
            ],
        },
    }


@dataclass
class Routed:
    """The stack, which router it runs, and the nginx following that router's route."""

    stack: Stack
    router: str
    gateway: Gateway

    @property
    def kind(self) -> str:
        return "VirtualService" if self.router == "istio" else "HTTPRoute"

    def routing(self, route: str = ROUTE) -> dict[str, Any]:
        if self.router == "istio":
            return {"istio": {"virtualService": route, "routeName": "primary"}}
        return {"gatewayAPI": {"httpRoute": route}}

    def route_doc(
        self, weights: dict[str, int], route: str = ROUTE, managed_by: str | None = "*"
    ) -> dict[str, Any]:
        if self.router == "istio":
            return virtualservice(route, self.stack.namespace, weights, managed_by)
        return httproute(route, self.stack.namespace, weights, managed_by)

    def reader(self, route: str = ROUTE) -> Any:
        if self.router == "istio":
            return IstioRouter(self.stack.api, self.stack.namespace, route, route_name="primary")
        return GatewayAPIRouter(self.stack.api, self.stack.namespace, route)

    def weights(self, route: str = ROUTE) -> dict[str, int]:
        return dict(self.reader(route).get_weights())

    def resource_version(self, route: str = ROUTE) -> str:
        group, version, plural = (
            (ISTIO_GROUP, ISTIO_VERSION, VS_PLURAL)
            if self.router == "istio"
            else ("gateway.networking.k8s.io", "v1", "httproutes")
        )
        obj: Any = client.CustomObjectsApi(self.stack.api).get_namespaced_custom_object(
            group, version, self.stack.namespace, plural, route
        )
        return str(obj["metadata"]["resourceVersion"])

    def wait_weights(self, expected: dict[str, int], timeout: float = 20.0) -> None:
        """Until the route carries ``expected`` and nginx serves only that version."""
        deadline = time.monotonic() + timeout
        while self.weights() != expected:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.kind} weights {self.weights()}, expected {expected}")
            time.sleep(0.1)
        self.gateway.wait_version(self.resource_version(), timeout=max(1.0, deadline - time.monotonic()))

    def rollout(self, name: str, steps: list[dict[str, Any]], route: str = ROUTE) -> dict[str, Any]:
        assert self.stack.prom is not None
        return rollout(name, self.stack.prom.url, steps, trafficRouting=self.routing(route))


@pytest.fixture(scope="module", params=ROUTERS)
def routed(request: pytest.FixtureRequest, real_components: None) -> Iterator[Routed]:
    router = str(request.param)
    try:
        find_nginx()
        if router == "istio":
            istio_crds()
    except MissingComponent as e:
        import os

        if os.environ.get("MODEL_ROLLOUTS_REQUIRE_INTEGRATION") == "1":
            pytest.fail(f"integration components missing and required: {e}")
        print(f"\nSKIP routers ({router}): {e}")
        pytest.skip(str(e))
    with Stack(
        variants={STABLE: {"error_rate": 0.0}, CANDIDATE: {"error_rate": 0.0}},
        route=ROUTE,
        rps=50,
        max_seconds=900,
        istio=router == "istio",
    ) as stack:
        # Traffic through the real proxy, following the route the operator writes.
        assert stack.loadgen is not None and stack.workdir is not None
        stack.loadgen.stop()
        kind = "VirtualService" if router == "istio" else "HTTPRoute"
        if router == "istio":
            kubectl_apply(stack.api, [virtualservice(ROUTE, stack.namespace, {STABLE: 100, CANDIDATE: 0})])
        backends = {svc: s.url for svc, s in stack.servers.items()}
        gateway = Gateway(
            stack.api,
            stack.namespace,
            ROUTE,
            backends,
            kind=kind,
            rule_index="primary" if router == "istio" else 0,
            workdir=stack.workdir / "gateway",
        ).start()
        try:
            stack.loadgen = LoadGenerator(
                api=None,
                namespace=stack.namespace,
                httproute=ROUTE,
                backends=backends,
                rps=50,
                max_seconds=900,
                max_requests=50 * 900,
                workers=8,
                via=gateway.url,
            ).start()
            stack.start_operator()
            yield Routed(stack, router, gateway)
        finally:
            gateway.close()


@pytest.fixture()
def fresh(routed: Routed) -> Iterator[Routed]:
    """All traffic on a healthy stable; afterwards every rollout and experiment deleted."""
    stack = routed.stack
    stack.servers[CANDIDATE].set(error_rate=0.0)
    if stack.operator is None:
        stack.start_operator()
    kubectl_apply(stack.api, [routed.route_doc({STABLE: 100, CANDIDATE: 0})])
    routed.wait_weights({STABLE: 100, CANDIDATE: 0})
    yield routed
    delete_all(stack, ROLLOUTS, EXPERIMENTS)


def served(stack: Stack) -> dict[str, int]:
    """Prediction requests each model server has counted."""
    import re

    return {
        svc: int(
            sum(
                float(v) for v in re.findall(r"^model_requests_total\{[^}]*\} (\S+)$", s.metrics_text(), re.M)
            )
        )
        for svc, s in stack.servers.items()
    }


def test_good_candidate_is_promoted_with_weights_in_step_order(fresh: Routed) -> None:
    stack = fresh.stack
    seen: list[int] = []

    def record(_: dict[str, Any] | None = None) -> None:
        w = fresh.weights().get(CANDIDATE)
        if w is not None and (not seen or seen[-1] != w):
            seen.append(w)

    record()
    before = served(stack)
    stack.apply(
        fresh.rollout(
            "good",
            [
                {"setWeight": 20},
                {"pause": {"duration": "5s"}},
                {"setWeight": 50},
                {"analysis": {"duration": "5s"}},
                {"setWeight": 100},
            ],
        )
    )
    obj = stack.wait_for(ROLLOUTS, "good", lambda o: phase(o) == "Promoted", 150, on_poll=record)
    fresh.wait_weights({STABLE: 0, CANDIDATE: 100})
    record()
    after = served(stack)
    assert seen == [0, 20, 50, 100], seen
    assert cond(obj, "Completed").get("status") == "True"
    # nginx served each weight the operator wrote, and the candidate's server got real requests.
    proxied = [c.weights.get(CANDIDATE) for c in fresh.gateway.changes if c.settled_at is not None]
    assert {20, 50, 100} <= set(proxied), proxied
    assert after[CANDIDATE] - before[CANDIDATE] > 50, (before, after)
    print(f"\n{fresh.kind}: promoted; weights written {seen}; served by nginx {proxied}; counted {after}")


def test_guardrail_breach_rolls_back_to_weight_zero(fresh: Routed) -> None:
    stack = fresh.stack
    stack.apply(fresh.rollout("bad", [{"setWeight": 30}, {"pause": {"duration": "10m"}}, {"setWeight": 100}]))
    stack.wait_for(ROLLOUTS, "bad", lambda o: (o.get("status") or {}).get("weight") == 30, 60)
    fresh.wait_weights({STABLE: 70, CANDIDATE: 30})
    time.sleep(6)  # one healthy analysis at 30%
    stack.servers[CANDIDATE].set(error_rate=0.5)
    t0 = time.monotonic()
    obj = stack.wait_for(ROLLOUTS, "bad", lambda o: phase(o) == "RolledBack", 90)
    fresh.wait_weights({STABLE: 100, CANDIDATE: 0})
    print(
        f"\n{fresh.kind}: breach injected -> nginx serving weight 0: "
        f"{time.monotonic() - t0:.1f}s (interval 5s)"
    )
    assert "error-rate" in obj["status"]["message"]
    # After the rollback nginx sends the candidate nothing.
    time.sleep(1.0)
    quiet = served(stack)[CANDIDATE]
    time.sleep(2.0)
    assert served(stack)[CANDIDATE] == quiet


def test_deleting_a_rollout_sends_all_traffic_back_to_stable(fresh: Routed) -> None:
    stack = fresh.stack
    stack.apply(fresh.rollout("gone", [{"setWeight": 40}, {"pause": {}}]))
    stack.wait_for(ROLLOUTS, "gone", lambda o: (o.get("status") or {}).get("weight") == 40, 60)
    fresh.wait_weights({STABLE: 60, CANDIDATE: 40})
    client.CustomObjectsApi(stack.api).delete_namespaced_custom_object(
        "mlrollouts.io", "v1alpha1", stack.namespace, ROLLOUTS, "gone"
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            stack.get(ROLLOUTS, "gone")
        except ApiException as e:
            assert e.status == 404
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the finalizer was not removed within 20s")
    fresh.wait_weights({STABLE: 100, CANDIDATE: 0}, timeout=5)


def test_a_route_without_the_opt_in_is_never_written(fresh: Routed) -> None:
    stack = fresh.stack
    closed = "closed"
    kubectl_apply(stack.api, [fresh.route_doc({STABLE: 100, CANDIDATE: 0}, route=closed, managed_by=None)])
    rv = fresh.resource_version(closed)
    stack.apply(fresh.rollout("canary", [{"setWeight": 30}, {"pause": {}}], route=closed))
    field = (
        "spec.trafficRouting.istio.virtualService"
        if fresh.router == "istio"
        else "spec.trafficRouting.gatewayAPI.httpRoute"
    )

    def invalid_naming_the_route(o: dict[str, Any]) -> bool:
        valid = cond(o, "Valid")
        return valid.get("status") == "False" and field in (valid.get("message") or "")

    obj = stack.wait_for(ROLLOUTS, "canary", invalid_naming_the_route, 60)
    assert MANAGED_BY in cond(obj, "Valid")["message"]
    time.sleep(20)  # re-checks come and go: still no write
    assert fresh.resource_version(closed) == rv, f"the operator wrote a {fresh.kind} that did not opt in"
    assert fresh.weights(closed) == {STABLE: 100, CANDIDATE: 0}


def test_operator_sigkill_resumes_from_status_without_repeating_steps(fresh: Routed) -> None:
    stack = fresh.stack
    seen: list[int] = []

    def record(_: dict[str, Any] | None = None) -> None:
        w = fresh.weights().get(CANDIDATE)
        if w is not None and (not seen or seen[-1] != w):
            seen.append(w)

    record()
    steps: list[dict[str, Any]] = []
    for w in (20, 40, 60):
        steps += [{"setWeight": w}, {"pause": {"duration": "5s"}}]
    stack.apply(fresh.rollout("restart", [*steps, {"setWeight": 100}]))
    stack.wait_for(
        ROLLOUTS, "restart", lambda o: (o.get("status") or {}).get("weight") == 40, 90, on_poll=record
    )
    step_before = stack.get(ROLLOUTS, "restart")["status"]["currentStep"]
    stack.stop_operator(kill=True)
    time.sleep(7)
    record()
    assert stack.get(ROLLOUTS, "restart")["status"]["currentStep"] == step_before
    stack.start_operator()
    obj = stack.wait_for(ROLLOUTS, "restart", lambda o: phase(o) == "Promoted", 150, on_poll=record, poll=0.2)
    fresh.wait_weights({STABLE: 0, CANDIDATE: 100})
    record()
    changes = [h["weight"] for h in obj["status"]["history"] if h["event"] == "WeightChanged"]
    assert seen == [0, 20, 40, 60, 100], seen
    assert changes == [20, 40, 60, 100]


OPERATOR_USER = "system:serviceaccount:model-rollouts:model-rollouts"


def test_a_denied_route_write_holds_the_weight_and_resumes_when_allowed(fresh: Routed) -> None:
    stack = fresh.stack
    group, plural = (
        (ISTIO_GROUP, VS_PLURAL) if fresh.router == "istio" else ("gateway.networking.k8s.io", "httproutes")
    )
    name = "deny-operator-route-writes"
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": [group],
                        "apiVersions": ["*"],
                        "operations": ["UPDATE"],
                        "resources": [plural],
                    }
                ]
            },
            "validations": [
                {"expression": f"request.userInfo.username != '{OPERATOR_USER}'", "message": "denied by test"}
            ],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {"policyName": name, "validationActions": ["Deny"]},
    }
    adm = client.AdmissionregistrationV1Api(stack.api)
    stack.apply(fresh.rollout("denied", [{"setWeight": 20}, {"setWeight": 50}, {"setWeight": 100}]))
    stack.wait_for(ROLLOUTS, "denied", lambda o: (o.get("status") or {}).get("weight") == 20, 60)
    kubectl_apply(stack.api, [policy, binding])
    try:
        obj = stack.wait_for(
            ROLLOUTS, "denied", lambda o: cond(o, "ReconcileError").get("status") == "True", 60
        )
        assert cond(obj, "ReconcileError")["reason"] == "RouteWriteFailed"
        time.sleep(12)  # several intervals: nothing may advance while the route cannot be written
        obj = stack.get(ROLLOUTS, "denied")
        assert (obj["status"]["weight"], phase(obj)) == (20, "Progressing")
        assert fresh.weights()[CANDIDATE] == 20
    finally:
        adm.delete_validating_admission_policy_binding(name)
        adm.delete_validating_admission_policy(name)
    stack.wait_for(ROLLOUTS, "denied", lambda o: phase(o) == "Promoted", 120)
    fresh.wait_weights({STABLE: 0, CANDIDATE: 100})


def test_two_rollouts_on_one_route_the_second_is_invalid_and_the_route_never_flips(fresh: Routed) -> None:
    stack = fresh.stack
    stack.apply(fresh.rollout("first", [{"setWeight": 20}, {"pause": {}}]))
    stack.wait_for(ROLLOUTS, "first", lambda o: (o.get("status") or {}).get("weight") == 20, 60)
    fresh.wait_weights({STABLE: 80, CANDIDATE: 20})
    stack.apply(fresh.rollout("second", [{"setWeight": 50}, {"pause": {}}]))
    seen: set[int] = set()
    obj = stack.wait_for(
        ROLLOUTS,
        "second",
        lambda o: phase(o) == "Invalid",
        30,
        on_poll=lambda _: seen.add(fresh.weights()[CANDIDATE]),
        poll=0.2,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        seen.add(fresh.weights()[CANDIDATE])
        time.sleep(0.2)
    assert "ModelRollout ml/first" in cond(obj, "Valid")["message"]
    assert seen == {20}, seen


def test_an_experiment_writes_its_allocation_and_nginx_splits_by_it(fresh: Routed) -> None:
    stack = fresh.stack
    assert stack.prom is not None
    variants = [
        {"name": "control", "service": STABLE, "control": True, "weight": 60},
        {"name": "b", "service": CANDIDATE, "weight": 40},
    ]
    # The servers have carried traffic for minutes, so a 30 s window has enough samples at the
    # first analysis: without a sample floor the experiment can conclude (and move the weights)
    # inside the measurement below.
    doc = experiment("ab", stack.prom.url, variants, ROUTE, stoppingRules={"minSamplesPerVariant": 1000000})
    doc["spec"]["trafficRouting"] = fresh.routing()
    stack.apply(doc)
    fresh.wait_weights({STABLE: 60, CANDIDATE: 40}, timeout=60)
    version = fresh.resource_version()
    t0 = served(stack)
    time.sleep(8)  # 50 requests/s through nginx
    after = served(stack)
    # The split measured is the one written: the route did not change during the window.
    assert fresh.resource_version() == version and fresh.weights() == {STABLE: 60, CANDIDATE: 40}
    assert phase(stack.get(EXPERIMENTS, "ab")) in ("Running", "Paused")
    counted = {svc: after[svc] - t0[svc] for svc in after}
    share = counted[CANDIDATE] / max(1, sum(counted.values()))
    print(
        f"\n{fresh.kind}: experiment 60/40 written; counted at the servers {counted} (candidate {share:.3f})"
    )
    assert sum(counted.values()) >= 200 and abs(share - 0.4) <= 0.05, counted
