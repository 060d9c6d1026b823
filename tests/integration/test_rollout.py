"""ModelRollout on the real stack: real API server, real Prometheus, real model servers and traffic."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from model_rollouts.metrics.provider import render
from tests.harness.objects import CANDIDATE, STABLE, fraud_stack, fresh_fraud, phase, rollout
from tests.harness.queries import ERROR_RATE
from tests.harness.stack import Stack, WeightRecorder


@pytest.fixture(scope="module")
def stack(real_components: None) -> Iterator[Stack]:
    with fraud_stack(max_seconds=1200) as s:
        yield s


@pytest.fixture()
def fresh(stack: Stack) -> Iterator[Stack]:
    """Each test starts with all traffic on stable and a healthy candidate."""
    yield from fresh_fraud(stack, "modelrollouts", restart_operator=True)


def test_good_candidate_is_promoted_with_weights_in_step_order(fresh: Stack) -> None:
    assert fresh.prom is not None
    rec = WeightRecorder(fresh, CANDIDATE)
    rec.poll()  # the route before the rollout exists: 0
    fresh.apply(
        rollout(
            "good",
            fresh.prom.url,
            [
                {"setWeight": 20},
                {"pause": {"duration": "5s"}},
                {"setWeight": 50},
                {"analysis": {"duration": "5s"}},
                {"setWeight": 100},
            ],
        )
    )
    obj = fresh.wait_for("modelrollouts", "good", lambda o: phase(o) == "Promoted", 150, on_poll=rec.poll)
    fresh.wait_route({STABLE: 0, CANDIDATE: 100})
    rec.poll()
    assert rec.seen == [0, 20, 50, 100]
    st = obj["status"]
    assert {c["type"]: c["status"] for c in st["conditions"]}["Completed"] == "True"
    assert st["observedGeneration"] == obj["metadata"]["generation"]
    guard = next(m for m in st["lastAnalysis"] if m["name"] == "error-rate")
    assert guard["verdict"] == "pass" and guard["value"] <= 0.05
    comp = next(m for m in st["lastAnalysis"] if m["name"] == "positive-feedback")
    assert comp["verdict"] in ("pass", "inconclusive") and "pValue" in comp["details"]
    events = (
        client.CoreV1Api(fresh.api)
        .list_namespaced_event(fresh.namespace, field_selector="involvedObject.name=good")
        .items
    )
    assert {"WeightChanged", "Promoted"} <= {e.reason for e in events}
    # The operator's own metrics, scraped by the same Prometheus.
    time.sleep(2)
    weight = fresh.prom.query('mlrollouts_weight{kind="ModelRollout",name="good",variant="candidate"}')
    promoted = fresh.prom.query('mlrollouts_phase{kind="ModelRollout",name="good",phase="Promoted"}')
    changes = fresh.prom.query('mlrollouts_decisions_total{name="good",decision="WeightChanged"}')
    assert float(weight[0]["value"][1]) == 100 and float(promoted[0]["value"][1]) == 1
    assert float(changes[0]["value"][1]) == 3


def test_guardrail_breach_rolls_back_to_weight_zero(fresh: Stack) -> None:
    assert fresh.prom is not None
    rec = WeightRecorder(fresh, CANDIDATE)
    rec.poll()  # the route before the rollout exists: 0
    fresh.apply(
        rollout(
            "bad", fresh.prom.url, [{"setWeight": 30}, {"pause": {"duration": "10m"}}, {"setWeight": 100}]
        )
    )
    fresh.wait_for(
        "modelrollouts", "bad", lambda o: (o.get("status") or {}).get("weight") == 30, 60, on_poll=rec.poll
    )
    time.sleep(6)  # one healthy analysis at 30%
    fresh.servers[CANDIDATE].set(error_rate=0.5)
    breach_at = _wait_breach_visible(fresh, CANDIDATE, 0.05)
    obj = fresh.wait_for("modelrollouts", "bad", lambda o: phase(o) == "RolledBack", 60, on_poll=rec.poll)
    fresh.wait_route({STABLE: 100, CANDIDATE: 0})
    zero_at = time.monotonic()
    rec.poll()
    print(f"\nbreach visible in Prometheus -> candidate weight 0: {zero_at - breach_at:.1f}s (interval 5s)")
    assert rec.seen[-1] == 0 and fresh.route_weights()[CANDIDATE] == 0
    assert 100 not in rec.seen
    assert "error-rate" in obj["status"]["message"]
    last = obj["status"]["history"][-1]
    assert last["event"] == "RolledBack" and last["values"]["error-rate"] > 0.05


def _wait_breach_visible(stack: Stack, service: str, limit: float, timeout: float = 60) -> float:
    assert stack.prom is not None
    q = render(ERROR_RATE, {"service": service, "window": "10s"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = stack.prom.query(q)
        if res and float(res[0]["value"][1]) > limit:
            return time.monotonic()
        time.sleep(0.2)
    raise TimeoutError("the breach never became visible in Prometheus")


def test_no_data_holds_and_progress_resumes_when_prometheus_returns(fresh: Stack) -> None:
    assert fresh.prom is not None
    rec = WeightRecorder(fresh, CANDIDATE)
    rec.poll()  # the route before the rollout exists: 0
    fresh.apply(
        rollout(
            "nodata",
            fresh.prom.url,
            [{"setWeight": 20}, {"pause": {"duration": "5s"}}, {"setWeight": 60}, {"setWeight": 100}],
            analysis={"errorLimit": 12},  # the 15 s outage stays shorter than the error limit
        )
    )
    fresh.wait_for(
        "modelrollouts", "nodata", lambda o: (o.get("status") or {}).get("weight") == 20, 60, on_poll=rec.poll
    )
    fresh.prom.stop()
    try:
        t_end = time.monotonic() + 15  # three analyses without Prometheus
        while time.monotonic() < t_end:
            rec.poll()
            obj = fresh.get("modelrollouts", "nodata")
            assert phase(obj) not in ("Promoted", "RolledBack"), obj["status"]
            assert obj["status"]["weight"] == 20, "advanced without data"
            time.sleep(0.5)
        healthy = {c["type"]: c for c in obj["status"]["conditions"]}["Healthy"]
        assert healthy["status"] == "Unknown" and healthy["reason"] == "MeasurementError", healthy
        assert "holding" in obj["status"]["message"]
    finally:
        fresh.prom.start()
    fresh.wait_for("modelrollouts", "nodata", lambda o: phase(o) == "Promoted", 120, on_poll=rec.poll)
    fresh.wait_route({CANDIDATE: 100})
    rec.poll()
    assert rec.seen == [0, 20, 60, 100]


def test_operator_sigkill_resumes_from_status_without_repeating_steps(fresh: Stack) -> None:
    assert fresh.prom is not None
    rec = WeightRecorder(fresh, CANDIDATE)
    rec.poll()  # the route before the rollout exists: 0
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            rec.poll()
            time.sleep(0.1)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        fresh.apply(
            rollout(
                "restart",
                fresh.prom.url,
                [
                    {"setWeight": 20},
                    {"pause": {"duration": "5s"}},
                    {"setWeight": 40},
                    {"pause": {"duration": "5s"}},
                    {"setWeight": 60},
                    {"pause": {"duration": "5s"}},
                    {"setWeight": 80},
                    {"setWeight": 100},
                ],
            )
        )
        fresh.wait_for("modelrollouts", "restart", lambda o: (o.get("status") or {}).get("weight") == 40, 90)
        step_before = fresh.get("modelrollouts", "restart")["status"]["currentStep"]
        fresh.stop_operator(kill=True)
        time.sleep(7)
        assert fresh.get("modelrollouts", "restart")["status"]["currentStep"] == step_before
        fresh.start_operator()
        obj = fresh.wait_for("modelrollouts", "restart", lambda o: phase(o) == "Promoted", 150)
    finally:
        stop.set()
        t.join()
    fresh.wait_route({CANDIDATE: 100})
    rec.poll()
    changes = [h["weight"] for h in obj["status"]["history"] if h["event"] == "WeightChanged"]
    assert rec.seen == [0, 20, 40, 60, 80, 100]
    assert changes == [20, 40, 60, 80, 100]


def test_impossible_spec_is_invalid_and_traffic_untouched(fresh: Stack) -> None:
    assert fresh.prom is not None
    doc = rollout("ghost", fresh.prom.url, [{"setWeight": 50}])
    doc["spec"]["trafficRouting"]["gatewayAPI"]["httpRoute"] = "does-not-exist"
    before = fresh.route_weights()
    fresh.apply(doc)
    obj = fresh.wait_for("modelrollouts", "ghost", lambda o: phase(o) == "Invalid", 30)
    valid = {c["type"]: c for c in obj["status"]["conditions"]}["Valid"]
    assert valid["status"] == "False"
    assert "spec.trafficRouting.gatewayAPI.httpRoute" in valid["message"] and "not found" in valid["message"]
    time.sleep(3)
    assert fresh.route_weights() == before


INVALID: list[tuple[str, Any, str]] = [
    ("weight over 100", lambda d: d["spec"]["steps"].__setitem__(0, {"setWeight": 101}), "setWeight"),
    ("negative weight", lambda d: d["spec"]["steps"].__setitem__(0, {"setWeight": -5}), "setWeight"),
    (
        "bad duration",
        lambda d: d["spec"]["steps"].__setitem__(0, {"pause": {"duration": "5 minutes"}}),
        "duration",
    ),
    ("interval under 5s", lambda d: d["spec"]["analysis"].__setitem__("interval", "2s"), "interval"),
    ("no steps", lambda d: d["spec"].__setitem__("steps", []), "steps"),
    (
        "duplicate guardrail names",
        lambda d: d["spec"]["analysis"]["guardrails"].append(dict(d["spec"]["analysis"]["guardrails"][0])),
        "guardrails",
    ),
    (
        "two routers",
        lambda d: d["spec"]["trafficRouting"].__setitem__("istio", {"virtualService": "vs"}),
        "trafficRouting",
    ),
    ("no router", lambda d: d["spec"].__setitem__("trafficRouting", {}), "trafficRouting"),
    (
        "negative failureLimit",
        lambda d: d["spec"]["analysis"]["guardrails"][0].__setitem__("failureLimit", -1),
        "failureLimit",
    ),
    (
        "step with two actions",
        lambda d: d["spec"]["steps"].__setitem__(0, {"setWeight": 5, "pause": {}}),
        "steps[0]",
    ),
    ("negative maxWeightStep", lambda d: d["spec"].__setitem__("maxWeightStep", -10), "maxWeightStep"),
    (
        "guardrail without bounds",
        lambda d: d["spec"]["analysis"]["guardrails"][0].pop("max"),
        "guardrails[0]",
    ),
]


def test_invalid_manifests_are_rejected_on_apply_naming_the_field(stack: Stack) -> None:
    co = client.CustomObjectsApi(stack.api)
    for label, mutate, field in INVALID:
        doc = rollout("invalid", "http://127.0.0.1:9090", [{"setWeight": 10}])
        doc["metadata"]["namespace"] = stack.namespace
        mutate(doc)
        with pytest.raises(ApiException) as e:
            co.create_namespaced_custom_object(
                "mlrollouts.io", "v1alpha1", stack.namespace, "modelrollouts", doc
            )
        assert e.value.status == 422, (label, e.value.body)
        assert field in e.value.body, (label, e.value.body)
    assert len(INVALID) >= 8


def test_a_bearer_token_secret_in_a_rollout_is_refused_naming_the_field(fresh: Stack) -> None:
    """A tenant's object never names a credential and a destination together (see test_tenancy.py)."""
    assert fresh.prom is not None
    client.CoreV1Api(fresh.api).create_namespaced_secret(
        fresh.namespace,
        client.V1Secret(metadata=client.V1ObjectMeta(name="prom-token"), string_data={"token": "abc"}),
    )
    try:
        doc = rollout("token", fresh.prom.url, [{"setWeight": 20}, {"setWeight": 100}])
        doc["spec"]["analysis"]["prometheus"]["bearerTokenSecret"] = {"name": "prom-token", "key": "token"}
        fresh.apply(doc)
        obj = fresh.wait_for("modelrollouts", "token", lambda o: phase(o) == "Invalid", 30)
        assert "spec.analysis.prometheus.bearerTokenSecret" in obj["status"]["message"]
        assert fresh.route_weights()[CANDIDATE] == 0
    finally:
        client.CoreV1Api(fresh.api).delete_namespaced_secret("prom-token", fresh.namespace)


def test_deleting_a_rollout_sends_all_traffic_back_to_stable(fresh: Stack) -> None:
    assert fresh.prom is not None
    fresh.apply(rollout("gone", fresh.prom.url, [{"setWeight": 40}, {"pause": {}}]))
    fresh.wait_for("modelrollouts", "gone", lambda o: (o.get("status") or {}).get("weight") == 40, 60)
    fresh.wait_route({STABLE: 60, CANDIDATE: 40})
    co = client.CustomObjectsApi(fresh.api)
    co.delete_namespaced_custom_object("mlrollouts.io", "v1alpha1", fresh.namespace, "modelrollouts", "gone")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            fresh.get("modelrollouts", "gone")
        except ApiException as e:
            assert e.status == 404
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the finalizer was not removed within 20s")
    assert fresh.route_weights() == {STABLE: 100, CANDIDATE: 0}
