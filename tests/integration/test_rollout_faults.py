"""The ModelRollout control loop under real faults, on the real stack.

Every fault is injected for real: an admission policy denies the operator's route writes, a
TLS proxy in front of the API server answers 5xx/409, adds latency and drops connections,
Prometheus is frozen with SIGSTOP, the operator is SIGKILLed, two replicas run at once.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from model_rollouts.metrics.provider import render
from tests.harness import objects
from tests.harness.cluster import kubectl_apply, write_kubeconfig
from tests.harness.faultproxy import FaultProxy, Faults
from tests.harness.objects import cond, delete_all, phase, weight
from tests.harness.procs import stop_proc
from tests.harness.queries import ERROR_RATE, FEEDBACK, POSITIVE
from tests.harness.stack import Stack, httproute
from tests.harness.tenancy import cluster_provider

V1, V2, V3 = "scorer-v1", "scorer-v2", "scorer-v3"
ROUTE = "scorer"
G, V, P = "mlrollouts.io", "v1alpha1", "modelrollouts"
OPERATOR_USER = "system:serviceaccount:model-rollouts:model-rollouts"
OPERATOR_NS = "model-rollouts"


def rollout(name: str, prom: str, steps: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """Guardrail only (no comparison), V1 stable and V2 candidate behind ROUTE."""
    return objects.rollout(
        name, prom, steps, stable=V1, candidate={"service": V2}, route=ROUTE, compare=False, **extra
    )


@pytest.fixture(scope="module")
def stack(real_components: None) -> Iterator[Stack]:
    with Stack(
        variants={V1: {"error_rate": 0.0}, V2: {"error_rate": 0.0}, V3: {"error_rate": 0.0}},
        route=ROUTE,
        rps=40,
        max_seconds=2400,
    ) as s:
        s.start_operator()
        yield s


#: Set by a test that made the candidate fail: the next test waits until the guardrail's window
#: (objects.rollout: 10 s) no longer holds those errors.
_ERRORS_IN_WINDOW = [False]
ERROR_WINDOW_S = 12.0


def _wait_errors_left_the_window(stack: Stack, timeout: float = 4 * ERROR_WINDOW_S) -> None:
    """Until Prometheus answers the guardrail's own query (10 s window) for the candidate with no breach:
    no series, NaN (no traffic since) or at most the guardrail's 5%."""
    assert stack.prom is not None
    q = render(ERROR_RATE, {"service": V2, "window": "10s"})
    deadline = time.monotonic() + timeout
    while True:
        res = stack.prom.query(q)
        if not res or not float(res[0]["value"][1]) > 0.05:
            return
        assert time.monotonic() < deadline, f"{V2}'s errors stayed in the guardrail's window: {res}"
        time.sleep(0.5)


@pytest.fixture()
def fresh(stack: Stack) -> Iterator[Stack]:
    for svc in (V1, V2, V3):
        stack.servers[svc].set(error_rate=0.0, positive_rate=0.6)
    if _ERRORS_IN_WINDOW[0]:
        _wait_errors_left_the_window(stack)  # a guard that acts at once leaves no time for it to pass
        _ERRORS_IN_WINDOW[0] = False
    if stack.operator is None:
        stack.start_operator()
    stack.apply(httproute(ROUTE, stack.namespace, {V1: 100, V2: 0, V3: 0}))
    yield stack
    delete_all(stack, P, ignore_errors=True)


class Watcher:
    """Polls the route and the object in the background: every distinct route state, in order,
    every distinct lastAnalysisTime, and every phase.

    Entering the context takes one complete sample synchronously, so every sequence starts with
    the state before the test acted (the background thread may start late on a loaded machine).
    Leaving it without an error takes one more, so a sequence asserted after the context always
    ends with the state the test waited for: the background poll may not have seen the last
    route or status write yet when ``wait`` returned. Inside the context, ``wait_for`` waits
    until the watcher itself has seen a state.
    """

    def __init__(self, s: Stack, name: str) -> None:
        self.s, self.name = s, name
        self.routes: list[dict[str, int]] = []
        self.analyses: list[str] = []
        self.phases: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watcher:
        self.settle()  # the state before the test acts is the first in every sequence
        self._t.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._stop.set()
        self._t.join(5)
        if exc_type is None:
            self.settle()

    def _sample(self) -> bool:
        """One sample of the route and the object; False if either read failed."""
        try:
            r = self.s.route_weights()
            try:
                st = self.s.get(P, self.name).get("status") or {}
            except ApiException as e:
                if e.status != 404:  # not created yet: the route alone is the state
                    raise
                st = {}
        except Exception:
            return False
        with self._lock:
            if not self.routes or self.routes[-1] != r:
                self.routes.append(r)
            t = st.get("lastAnalysisTime")
            if t and (not self.analyses or self.analyses[-1] != t):
                self.analyses.append(t)
            ph = st.get("phase")
            if ph and (not self.phases or self.phases[-1] != ph):
                self.phases.append(ph)
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(0.1)

    def settle(self, timeout: float = 15) -> None:
        """Take one complete sample now: the sequence then ends with the current state."""
        deadline = time.monotonic() + timeout
        while not self._sample():
            if time.monotonic() > deadline:
                raise AssertionError(f"watcher of {self.name}: no complete sample in {timeout:.0f}s")
            time.sleep(0.2)

    def wait_for(self, pred: Callable[[Watcher], bool], timeout: float = 15) -> None:
        """Wait until what the watcher has seen satisfies ``pred``."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if pred(self):
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"watcher of {self.name} saw routes={self.routes} phases={self.phases}")
            time.sleep(0.1)

    def seen(self, svc: str) -> list[int]:
        out: list[int] = []
        for r in self.routes:
            w = r.get(svc, 0)
            if not out or out[-1] != w:
                out.append(w)
        return out

    def gaps(self) -> list[float]:
        ts = [datetime.fromisoformat(a.replace("Z", "+00:00")) for a in self.analyses]
        return [(b - a).total_seconds() for a, b in itertools.pairwise(ts)]


def wait(s: Stack, name: str, pred: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
    return s.wait_for(P, name, pred, timeout)


def events(s: Stack, name: str) -> list[str]:
    items = client.CoreV1Api(s.api).list_namespaced_event(
        s.namespace, field_selector=f"involvedObject.name={name}"
    )
    return [e.reason for e in items.items]


def test_denied_route_write_holds_the_weight_and_resumes_when_allowed(fresh: Stack) -> None:
    assert fresh.prom is not None
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": "deny-operator-route-writes"},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": ["gateway.networking.k8s.io"],
                        "apiVersions": ["*"],
                        "operations": ["UPDATE"],
                        "resources": ["httproutes"],
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
        "metadata": {"name": "deny-operator-route-writes"},
        "spec": {"policyName": "deny-operator-route-writes", "validationActions": ["Deny"]},
    }
    adm = client.AdmissionregistrationV1Api(fresh.api)
    with Watcher(fresh, "denied") as w:
        fresh.apply(
            rollout("denied", fresh.prom.url, [{"setWeight": 20}, {"setWeight": 50}, {"setWeight": 100}])
        )
        wait(fresh, "denied", lambda o: weight(o) == 20, 60)
        kubectl_apply(fresh.api, [policy, binding])
        try:
            obj = wait(fresh, "denied", lambda o: cond(o, "ReconcileError").get("status") == "True", 60)
            assert cond(obj, "ReconcileError")["reason"] == "RouteWriteFailed"
            time.sleep(15)  # several intervals: nothing may advance while the route cannot be written
            obj = fresh.get(P, "denied")
            assert weight(obj) == 20 and fresh.route_weights()[V2] == 20 and phase(obj) == "Progressing"
            assert "RouteWriteFailed" in events(fresh, "denied")
        finally:
            adm.delete_validating_admission_policy_binding("deny-operator-route-writes")
            adm.delete_validating_admission_policy("deny-operator-route-writes")
        obj = wait(fresh, "denied", lambda o: phase(o) == "Promoted", 120)
    assert w.seen(V2) == [0, 20, 50, 100]
    assert cond(obj, "ReconcileError")["status"] == "False"
    errors = fresh.prom.query('sum(mlrollouts_reconcile_errors_total{name="denied"})')
    assert errors and float(errors[0]["value"][1]) >= 1


def test_fault_proxy_weights_follow_the_steps_and_no_analysis_comes_early(fresh: Stack) -> None:
    assert fresh.prom is not None and fresh.workdir is not None
    fresh.stop_operator()
    proxy = FaultProxy(upstream=fresh.cluster.server, pki=fresh.workdir / "pki")
    proxy.faults = Faults(
        error5xx=0.15, conflict409=0.15, latency=0.1, latency_seconds=0.7, drop=0.05, ensure_each=True
    )
    proxy.start()
    import yaml

    token = yaml.safe_load(fresh.operator_kubeconfig.read_text())["users"][0]["user"]["token"]
    kc = fresh.workdir / "operator-proxy.kubeconfig"
    write_kubeconfig(kc, proxy.url, fresh.workdir / "pki" / "ca.crt", token)
    original = fresh.operator_kubeconfig
    fresh.operator_kubeconfig = kc
    try:
        fresh.start_operator()
        steps = [{"setWeight": 20}, {"setWeight": 40}, {"setWeight": 60}, {"setWeight": 100}]
        with Watcher(fresh, "proxied") as w:
            fresh.apply(rollout("proxied", fresh.prom.url, steps))
            obj = wait(fresh, "proxied", lambda o: phase(o) == "Promoted", 240)
            time.sleep(1)
    finally:
        fresh.stop_operator()
        fresh.operator_kubeconfig = original
        proxy.stop()
    assert w.seen(V2) == [0, 20, 40, 60, 100], w.routes
    assert all(sum(r.values()) == 100 for r in w.routes)
    assert min(w.gaps()) >= 5, w.analyses  # never an analysis before lastAnalysisTime + interval
    changes = [h["weight"] for h in obj["status"]["history"] if h["event"] == "WeightChanged"]
    assert changes == [20, 40, 60, 100]
    assert proxy.injected["5xx"] > 0 and proxy.injected["409"] > 0 and proxy.injected["drop"] > 0, (
        proxy.injected
    )


def _prom_pid(s: Stack) -> int:
    assert s.prom is not None and s.prom._proc is not None
    return s.prom._proc.pid


def test_prometheus_sigstop_holds_then_the_error_limit_rolls_back(fresh: Stack) -> None:
    assert fresh.prom is not None
    doc = rollout(
        "frozen",
        fresh.prom.url,
        [{"setWeight": 20}, {"setWeight": 100}],
        analysis={"errorLimit": 3},
    )
    doc["spec"]["analysis"]["prometheus"]["timeout"] = "1s"
    with Watcher(fresh, "frozen") as w:
        fresh.apply(doc)
        wait(fresh, "frozen", lambda o: weight(o) == 20, 60)
        os.kill(_prom_pid(fresh), signal.SIGSTOP)
        try:
            obj = wait(fresh, "frozen", lambda o: cond(o, "Healthy").get("reason") == "MeasurementError", 30)
            assert weight(obj) == 20 and phase(obj) == "Progressing"
            obj = wait(fresh, "frozen", lambda o: phase(o) == "RolledBack", 60)
        finally:
            os.kill(_prom_pid(fresh), signal.SIGCONT)
    assert weight(obj) == 0 and fresh.route_weights()[V2] == 0
    assert obj["status"]["history"][-1]["reason"] == "ErrorLimitReached"
    assert "Promoted" not in w.phases and w.seen(V2) == [0, 20, 0]


def test_an_outage_shorter_than_the_error_limit_neither_rolls_back_nor_promotes(fresh: Stack) -> None:
    assert fresh.prom is not None
    doc = rollout("blip", fresh.prom.url, [{"setWeight": 20}, {"setWeight": 100}], analysis={"errorLimit": 8})
    doc["spec"]["analysis"]["prometheus"]["timeout"] = "1s"
    with Watcher(fresh, "blip") as w:
        fresh.apply(doc)
        wait(fresh, "blip", lambda o: weight(o) == 20, 60)
        os.kill(_prom_pid(fresh), signal.SIGSTOP)
        try:
            time.sleep(14)
            obj = fresh.get(P, "blip")
            assert phase(obj) == "Progressing" and weight(obj) == 20
        finally:
            os.kill(_prom_pid(fresh), signal.SIGCONT)
        wait(fresh, "blip", lambda o: phase(o) == "Promoted", 90)
    assert "RolledBack" not in w.phases and w.seen(V2) == [0, 20, 100]


def test_operator_sigkill_three_times_never_brings_an_analysis_forward(fresh: Stack) -> None:
    assert fresh.prom is not None
    steps = [
        {"setWeight": 20},
        {"analysis": {"duration": "10s"}},
        {"setWeight": 40},
        {"analysis": {"duration": "10s"}},
        {"setWeight": 100},
    ]
    with Watcher(fresh, "killed") as w:
        fresh.apply(rollout("killed", fresh.prom.url, steps))
        wait(fresh, "killed", lambda o: weight(o) == 20, 60)
        for _ in range(3):
            time.sleep(3)
            fresh.stop_operator(kill=True)
            fresh.start_operator()
        wait(fresh, "killed", lambda o: phase(o) == "Promoted", 180)
    assert w.seen(V2) == [0, 20, 40, 100]
    assert min(w.gaps()) >= 5, w.analyses


def _decisions(log: str, name: str) -> int:
    return sum(
        1 for line in log.splitlines() if f"/{name} WeightChanged" in line or f"/{name} Promoted" in line
    )


def test_two_replicas_exactly_one_acts_and_the_standby_takes_over(fresh: Stack) -> None:
    assert fresh.prom is not None and fresh.workdir is not None
    fresh.stop_operator()
    a = fresh.start_operator(log_name="replica-a.log")
    time.sleep(4)  # a holds the Lease
    b = fresh.start_operator(log_name="replica-b.log")
    log_a, log_b = fresh.workdir / "replica-a.log", fresh.workdir / "replica-b.log"
    steps = [
        {"setWeight": 20},
        {"pause": {"duration": "10s"}},
        {"setWeight": 40},
        {"pause": {"duration": "10s"}},
        {"setWeight": 60},
        {"pause": {"duration": "10s"}},
        {"setWeight": 100},
    ]
    try:
        with Watcher(fresh, "ha") as w:
            fresh.apply(rollout("ha", fresh.prom.url, steps))
            wait(fresh, "ha", lambda o: weight(o) == 40, 90)
            deadline = time.monotonic() + 10  # a decision is logged just after its status write
            while _decisions(log_a.read_text(), "ha") < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert _decisions(log_a.read_text(), "ha") >= 2 and _decisions(log_b.read_text(), "ha") == 0
            killed_at = time.monotonic()
            a.kill()
            a.wait(10)
            fresh.operator = b
            wait(fresh, "ha", lambda o: (weight(o) or 0) >= 60, 60)
            takeover = time.monotonic() - killed_at
            wait(fresh, "ha", lambda o: phase(o) == "Promoted", 90)
    finally:
        stop_proc(a)
        fresh.stop_operator()
    assert _decisions(log_b.read_text(), "ha") >= 1
    assert w.seen(V2) == [0, 20, 40, 60, 100]
    # Takeover: the Lease (6 s here) must expire, then the pause step (10 s) finishes.
    assert takeover < 6 + 10 + 2 * 5 + 5, takeover


def _rolled_back(s: Stack, name: str, **extra: Any) -> dict[str, Any]:
    assert s.prom is not None
    s.servers[V2].set(error_rate=0.5)
    _ERRORS_IN_WINDOW[0] = True
    s.apply(rollout(name, s.prom.url, [{"setWeight": 30}, {"pause": {}}], **extra))
    obj = wait(s, name, lambda o: phase(o) == "RolledBack", 60)
    s.servers[V2].set(error_rate=0.0)
    return obj


def test_after_rollback_the_candidate_gets_no_traffic_again(fresh: Stack) -> None:
    co = client.CustomObjectsApi(fresh.api)
    # The provider's credentials live in the operator's namespace, behind a ClusterMetricProvider.
    secret = client.V1Secret(metadata=client.V1ObjectMeta(name="prom-token"), string_data={"token": "t0k3n"})
    client.CoreV1Api(fresh.api).create_namespaced_secret(OPERATOR_NS, secret)
    try:
        assert fresh.prom is not None
        fresh.apply(cluster_provider("faults-prom", fresh.prom.url, token_secret="prom-token"))
        fresh.servers[V2].set(error_rate=0.5)
        _ERRORS_IN_WINDOW[0] = True
        doc = rollout("bad", fresh.prom.url, [{"setWeight": 30}, {"pause": {}}])
        del doc["spec"]["analysis"]["prometheus"]
        doc["spec"]["analysis"]["provider"] = "faults-prom"
        fresh.apply(doc)
        wait(fresh, "bad", lambda o: phase(o) == "RolledBack", 60)
        fresh.servers[V2].set(error_rate=0.0)
        with Watcher(fresh, "bad") as w:
            # Argo CD re-creates the route; the Secret goes away and comes back; the candidate's
            # backendRef is removed and restored.
            co.delete_namespaced_custom_object(
                "gateway.networking.k8s.io", "v1", fresh.namespace, "httproutes", ROUTE
            )
            fresh.apply(httproute(ROUTE, fresh.namespace, {V1: 100, V2: 0, V3: 0}))
            client.CoreV1Api(fresh.api).delete_namespaced_secret("prom-token", OPERATOR_NS)
            time.sleep(8)
            fresh.apply(httproute(ROUTE, fresh.namespace, {V1: 100, V3: 0}))
            time.sleep(4)
            client.CoreV1Api(fresh.api).create_namespaced_secret(OPERATOR_NS, secret)
            fresh.apply(httproute(ROUTE, fresh.namespace, {V1: 100, V2: 0, V3: 0}))
            time.sleep(8)
            obj = fresh.get(P, "bad")
        assert phase(obj) == "RolledBack" and weight(obj) == 0
        assert all(r.get(V2, 0) == 0 for r in w.routes), w.routes
        assert set(w.phases) == {"RolledBack"}
    finally:
        with contextlib.suppress(ApiException):
            client.CoreV1Api(fresh.api).delete_namespaced_secret("prom-token", OPERATOR_NS)
        with contextlib.suppress(ApiException):
            client.CustomObjectsApi(fresh.api).delete_cluster_custom_object(
                "mlrollouts.io", "v1alpha1", "clustermetricproviders", "faults-prom"
            )


def test_after_rollback_a_route_that_gives_the_candidate_traffic_is_set_back(fresh: Stack) -> None:
    _rolled_back(fresh, "guarded")
    fresh.apply(httproute(ROUTE, fresh.namespace, {V1: 50, V2: 50, V3: 0}))  # e.g. a sync from stale Git
    fresh.wait_route({V2: 0}, timeout=45)
    assert "RouteRestored" in events(fresh, "guarded")


def test_after_promotion_the_operator_lets_go_of_the_route(fresh: Stack) -> None:
    assert fresh.prom is not None
    fresh.apply(rollout("done", fresh.prom.url, [{"setWeight": 50}]))
    obj = wait(fresh, "done", lambda o: phase(o) == "Promoted", 90)
    assert obj["status"]["stableService"] == V2
    assert cond(obj, "Promoted")["status"] == "True" and cond(obj, "Completed")["status"] == "True"
    fresh.apply(httproute(ROUTE, fresh.namespace, {V1: 30, V2: 70, V3: 0}))  # a hand edit
    time.sleep(10)
    assert fresh.route_weights() == {V1: 30, V2: 70, V3: 0}
    client.CustomObjectsApi(fresh.api).delete_namespaced_custom_object(G, V, fresh.namespace, P, "done")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            fresh.get(P, "done")
        except ApiException:
            break
        time.sleep(0.5)
    assert fresh.route_weights() == {V1: 30, V2: 70, V3: 0}  # deletion after the end moves nothing


def test_after_promotion_a_new_candidate_ramps_from_the_serving_version(fresh: Stack) -> None:
    assert fresh.prom is not None
    with Watcher(fresh, "chain") as w:
        fresh.apply(rollout("chain", fresh.prom.url, [{"setWeight": 50}]))
        wait(fresh, "chain", lambda o: phase(o) == "Promoted", 90)
        # Git still says stable=v1; only the candidate changes to v3.
        co = client.CustomObjectsApi(fresh.api)
        co.patch_namespaced_custom_object(
            G, V, fresh.namespace, P, "chain", {"spec": {"candidate": {"service": V3}}}
        )
        obj = wait(
            fresh, "chain", lambda o: phase(o) == "Promoted" and o["status"].get("stableService") == V3, 120
        )
    assert all(r.get(V1, 0) == 0 for r in w.routes[w.routes.index({V1: 0, V2: 100, V3: 0}) :]), w.routes
    assert w.seen(V3) == [0, 50, 100] and all(sum(r.values()) == 100 for r in w.routes)
    assert obj["status"]["history"][-1]["event"] == "Promoted"


def test_candidate_change_at_40_zeroes_the_old_candidate_in_the_same_write(fresh: Stack) -> None:
    assert fresh.prom is not None
    with Watcher(fresh, "swap") as w:
        fresh.apply(rollout("swap", fresh.prom.url, [{"setWeight": 40}, {"pause": {}}]))
        wait(fresh, "swap", lambda o: weight(o) == 40 and phase(o) == "Paused", 60)
        client.CustomObjectsApi(fresh.api).patch_namespaced_custom_object(
            G, V, fresh.namespace, P, "swap", {"spec": {"candidate": {"service": V3}}}
        )
        wait(fresh, "swap", lambda o: weight(o) == 40 and o["status"].get("candidateService") == V3, 60)
        time.sleep(1)
    assert all(sum(r.values()) == 100 for r in w.routes), w.routes
    assert not any(r.get(V2, 0) > 0 and r.get(V3, 0) > 0 for r in w.routes), w.routes
    assert fresh.route_weights() == {V1: 60, V2: 0, V3: 40}


def test_duplicate_guardrail_names_are_rejected_by_the_api_server(fresh: Stack) -> None:
    assert fresh.prom is not None
    doc = rollout("dupes", fresh.prom.url, [{"setWeight": 50}])
    doc["spec"]["analysis"]["guardrails"].append({"name": "error-rate", "query": ERROR_RATE, "max": 0.5})
    with pytest.raises(ApiException) as e:
        fresh.apply(doc)
    assert e.value.status == 422 and "error-rate" in str(e.value.body)


def test_two_rollouts_on_one_route_the_second_is_invalid_and_the_route_never_flips(fresh: Stack) -> None:
    assert fresh.prom is not None
    with Watcher(fresh, "first") as w:
        fresh.apply(rollout("first", fresh.prom.url, [{"setWeight": 20}, {"pause": {}}]))
        wait(fresh, "first", lambda o: weight(o) == 20, 60)
        fresh.apply(rollout("second", fresh.prom.url, [{"setWeight": 50}, {"pause": {}}]))
        obj = wait(fresh, "second", lambda o: phase(o) == "Invalid", 30)
        time.sleep(10)
    assert "ModelRollout ml/first" in cond(obj, "Valid")["message"]
    assert w.seen(V2) == [20] or w.seen(V2) == [0, 20], w.routes


def test_an_early_resume_does_not_release_a_later_gate(fresh: Stack) -> None:
    assert fresh.prom is not None
    steps = [{"setWeight": 20}, {"pause": {"duration": "10s"}}, {"pause": {}}, {"setWeight": 100}]
    fresh.apply(rollout("gate", fresh.prom.url, steps))
    wait(fresh, "gate", lambda o: weight(o) == 20, 60)
    fresh.annotate(P, "gate", {"mlrollouts.io/resume": "early"})
    wait(fresh, "gate", lambda o: phase(o) == "Paused" and o["status"]["currentStep"] == 2, 60)
    time.sleep(8)
    obj = fresh.get(P, "gate")
    assert phase(obj) == "Paused" and weight(obj) == 20
    fresh.annotate(P, "gate", {"mlrollouts.io/resume": "now"})
    wait(fresh, "gate", lambda o: phase(o) == "Promoted", 60)


def test_a_comparison_with_a_typo_never_promotes(fresh: Stack) -> None:
    assert fresh.prom is not None
    typo = POSITIVE.replace("model_feedback_total", "model_feedbak_total")
    doc = rollout(
        "typo",
        fresh.prom.url,
        [{"setWeight": 50}, {"setWeight": 100}],
        analysis={
            "comparisons": [{"name": "feedback", "successes": typo, "trials": FEEDBACK, "margin": 0.1}]
        },
        progressDeadline="25s",
    )
    with Watcher(fresh, "typo") as w:
        fresh.apply(doc)
        obj = wait(fresh, "typo", lambda o: phase(o) in ("RolledBack", "Promoted"), 90)
    assert phase(obj) == "RolledBack" and "Promoted" not in w.phases and max(w.seen(V2)) == 50
    assert obj["status"]["history"][-1]["reason"] == "ProgressDeadlineExceeded"
    m = next(m for m in obj["status"]["lastAnalysis"] if m["name"] == "feedback")
    assert m["verdict"] == "noData"


def test_a_ramped_rollout_under_a_common_drift_is_not_rolled_back(fresh: Stack) -> None:
    """Both arms' positive-feedback rate falls from 0.9 to 0.4 while the weight ramps 10 -> 50.
    Pooled counts would compare the candidate's mostly-late data with the stable's mostly-early
    data and see a drop of ~0.2; within-epoch comparison sees none."""
    assert fresh.prom is not None
    for svc in (V1, V2):
        fresh.servers[svc].set(positive_rate=0.9)
    stop = threading.Event()

    def drift() -> None:
        t0 = time.monotonic()
        while not stop.is_set():
            rate = max(0.4, 0.9 - 0.5 * (time.monotonic() - t0) / 60)
            for svc in (V1, V2):
                fresh.servers[svc].set(positive_rate=rate)
            time.sleep(1)

    steps = [
        {"setWeight": 10},
        {"analysis": {"duration": "15s"}},
        {"setWeight": 25},
        {"analysis": {"duration": "15s"}},
        {"setWeight": 50},
        {"analysis": {"duration": "20s"}},
        {"pause": {}},
    ]
    doc = rollout(
        "drift",
        fresh.prom.url,
        steps,
        analysis={
            "comparisons": [
                {
                    "name": "feedback",
                    "successes": POSITIVE,
                    "trials": FEEDBACK,
                    "margin": 0.05,
                    "advisory": True,
                }
            ]
        },
    )
    t = threading.Thread(target=drift, daemon=True)
    t.start()
    try:
        fresh.apply(doc)
        obj = wait(
            fresh, "drift", lambda o: phase(o) in ("Paused", "RolledBack") and weight(o) in (0, 50), 150
        )
    finally:
        stop.set()
        t.join(5)
    assert phase(obj) == "Paused" and weight(obj) == 50, obj["status"]["message"]
    m = next(m for m in obj["status"]["lastAnalysis"] if m["name"] == "feedback")
    assert m["verdict"] != "fail" and m["details"]["epochs"] >= 3
