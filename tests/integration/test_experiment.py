"""ModelExperiment on the real stack: real API server, real Prometheus, real model servers and traffic.

The traffic generator splits requests by the HTTPRoute weights the operator writes, and posts user
feedback (positive with each server's ``positive_rate``), so the loop operator -> weights -> traffic
-> metrics -> Prometheus -> operator is closed for real.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from tests.harness.queries import ERROR_RATE, FEEDBACK, POSITIVE, REQUESTS
from tests.harness.stack import Stack, httproute

pytestmark = pytest.mark.integration

A, B, C = "rec-a", "rec-b", "rec-c"
ROUTE = "recsys"
PLURAL = "modelexperiments"


def experiment(name: str, prom: str, services: list[str], **extra: Any) -> dict[str, Any]:
    """Variants a (control), b, c on the given Services; ``extra`` merges into the spec's sections."""
    names = {A: "a", B: "b", C: "c"}
    spec: dict[str, Any] = {
        "variants": [{"name": names[svc], "service": svc, "control": svc == A} for svc in services],
        "trafficRouting": {"gatewayAPI": {"httpRoute": ROUTE}},
        "primaryMetric": {
            "name": "positive-feedback",
            "type": "proportion",
            "successes": POSITIVE,
            "trials": FEEDBACK,
        },
        "guardrails": [{"name": "error-rate", "query": ERROR_RATE, "max": 0.05, "failureLimit": 1}],
        "successCriteria": {"minimumDetectableEffect": 0.1, "alpha": 0.05, "method": "sequential"},
        "stoppingRules": {"minSamplesPerVariant": 150},
        "analysis": {"interval": "5s", "window": "30s", "prometheus": {"address": prom, "timeout": "2s"}},
    }
    for key, value in extra.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and key in spec else value
    return {
        "apiVersion": "mlrollouts.io/v1alpha1",
        "kind": "ModelExperiment",
        "metadata": {"name": name},
        "spec": spec,
    }


@pytest.fixture(scope="module")
def stack(real_components: None) -> Iterator[Stack]:
    with Stack(
        variants={A: {"positive_rate": 0.5}, B: {"positive_rate": 0.5}, C: {"positive_rate": 0.5}},
        route=ROUTE,
        rps=72,
        max_seconds=1500,
        initial_weights={A: 34, B: 33, C: 33},
    ) as s:
        s.start_operator()
        yield s


@pytest.fixture()
def fresh(stack: Stack) -> Iterator[Stack]:
    """Healthy servers at positive rate 0.5, no skew; each test sets the route to its starting split."""
    for svc in (A, B, C):
        stack.servers[svc].set(error_rate=0.0, positive_rate=0.5)
    assert stack.loadgen is not None
    stack.loadgen.set_skew({})
    if stack.operator is None:
        stack.start_operator()
    yield stack
    stack.loadgen.set_skew({})
    co = client.CustomObjectsApi(stack.api)
    for obj in _experiments(stack):
        co.delete_namespaced_custom_object(
            "mlrollouts.io", "v1alpha1", stack.namespace, PLURAL, obj["metadata"]["name"]
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _experiments(stack):
        time.sleep(0.5)


def _experiments(stack: Stack) -> list[dict[str, Any]]:
    got: dict[str, Any] = client.CustomObjectsApi(stack.api).list_namespaced_custom_object(  # type: ignore[assignment]
        "mlrollouts.io", "v1alpha1", stack.namespace, PLURAL
    )
    items: list[dict[str, Any]] = got["items"]
    return items


def start_split(stack: Stack, weights: dict[str, int]) -> None:
    """Route traffic by the experiment's starting split, so the samples since its start match the split."""
    stack.apply(httproute(ROUTE, stack.namespace, weights))
    time.sleep(2)  # the traffic generator re-reads the route every second


def status(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("status") or {}


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status(obj).get("conditions", [])}


def variants(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in status(obj).get("variants", [])}


def event_reasons(stack: Stack, name: str) -> set[str]:
    evs = (
        client.CoreV1Api(stack.api)
        .list_namespaced_event(stack.namespace, field_selector=f"involvedObject.name={name}")
        .items
    )
    return {str(e.reason) for e in evs}


def test_better_variant_is_promoted_with_the_numbers(fresh: Stack) -> None:
    assert fresh.prom is not None
    fresh.servers[C].set(positive_rate=0.8)
    start_split(fresh, {A: 34, B: 33, C: 33})
    t0 = time.monotonic()
    fresh.apply(experiment("winner", fresh.prom.url, [A, B, C]))
    obj = fresh.wait_for(
        PLURAL,
        "winner",
        lambda o: status(o).get("phase") in ("Concluded", "RolledBack", "Aborted", "Invalid"),
        150,
    )
    print(f"\nwinner promoted after {time.monotonic() - t0:.1f}s: {status(obj).get('decisionReason')}")
    st = status(obj)
    assert st["phase"] == "Concluded", st
    assert st["decision"] == "promoted" and st["winner"] == "c", st
    fresh.wait_route({A: 0, B: 0, C: 100})
    v = variants(obj)
    assert v["c"]["weight"] == 100 and v["c"]["adjustedPValue"] < 0.05
    assert v["c"]["ciLow"] > 0 and v["c"]["n"] >= 150 and v["c"]["probabilityToBeBest"] > 0.95
    assert v["b"]["adjustedPValue"] >= v["b"]["pValue"]
    assert "Holm-adjusted p" in st["decisionReason"] and "n=" in st["decisionReason"]
    assert conditions(obj)["Completed"]["status"] == "True"
    last = st["history"][-1]
    assert last["event"] == "Concluded" and last["values"]["c/estimate"] > last["values"]["a/estimate"]
    assert {"Started", "WinnerPromoted"} <= event_reasons(fresh, "winner")


def test_null_result_concludes_without_promoting(fresh: Stack) -> None:
    assert fresh.prom is not None
    start_split(fresh, {A: 34, B: 33, C: 33})
    t0 = time.monotonic()
    fresh.apply(
        experiment(
            "null",
            fresh.prom.url,
            [A, B, C],
            successCriteria={"alpha": 0.01},
            stoppingRules={"minSamplesPerVariant": 100, "maxSamplesPerVariant": 500},
        )
    )
    promoted: list[dict[str, int]] = []

    def watch(_obj: dict[str, Any]) -> None:
        w = fresh.route_weights()
        if w.get(B) == 100 or w.get(C) == 100:
            promoted.append(w)

    obj = fresh.wait_for(PLURAL, "null", lambda o: status(o).get("phase") == "Concluded", 150, on_poll=watch)
    st = status(obj)
    print(f"\nnull result concluded after {time.monotonic() - t0:.1f}s: {st['decision']}: {st['message']}")
    assert st["decision"] in ("noWinner", "futile"), st
    assert st.get("winner") is None and not promoted
    fresh.wait_route({A: 100, B: 0, C: 0})
    assert all(v["n"] >= 100 for v in variants(obj).values())


def test_guardrail_breach_drops_the_variant(fresh: Stack) -> None:
    assert fresh.prom is not None
    fresh.servers[C].set(error_rate=0.4)
    start_split(fresh, {A: 34, B: 33, C: 33})
    t0 = time.monotonic()
    fresh.apply(
        experiment("guard", fresh.prom.url, [A, B, C], stoppingRules={"minSamplesPerVariant": 100000})
    )
    obj = fresh.wait_for(PLURAL, "guard", lambda o: variants(o).get("c", {}).get("active") is False, 90)
    print(f"\nvariant c dropped after {time.monotonic() - t0:.1f}s: {variants(obj)['c'].get('reason')}")
    assert status(obj)["phase"] == "Running", status(obj)
    weights = fresh.wait_route({C: 0})
    assert weights[C] == 0 and weights[A] + weights[B] == 100 and weights[A] >= 50
    v = variants(obj)
    assert v["c"]["weight"] == 0 and "error-rate" in v["c"]["reason"]
    assert v["a"]["active"] and v["b"]["active"]
    drop = next(h for h in status(obj)["history"] if h["event"] == "VariantDropped")
    assert drop["values"]["c/error-rate"] > 0.05
    assert "VariantDropped" in event_reasons(fresh, "guard")
    time.sleep(6)  # the next analysis keeps it out
    assert fresh.route_weights()[C] == 0


def test_skewed_split_pauses_for_sample_ratio_mismatch(fresh: Stack) -> None:
    assert fresh.prom is not None
    assert fresh.loadgen is not None
    start_split(fresh, {A: 50, B: 50, C: 0})
    fresh.loadgen.set_skew({B: 2.0})
    time.sleep(1)
    t0 = time.monotonic()
    fresh.apply(
        experiment(
            "srm",
            fresh.prom.url,
            [A, B],
            stoppingRules={"minSamplesPerVariant": 200},
            analysis={"requests": REQUESTS},
        )
    )
    obj = fresh.wait_for(PLURAL, "srm", lambda o: status(o).get("phase") in ("Paused", "Concluded"), 90)
    st = status(obj)
    print(f"\nSRM pause after {time.monotonic() - t0:.1f}s: {st['message']}")
    assert st["phase"] == "Paused", st
    assert conditions(obj)["Progressing"]["reason"] == "SampleRatioMismatch"
    srm = conditions(obj)["SampleRatioMismatch"]
    assert srm["status"] == "True" and "p = " in srm["message"]
    assert st["srmPValue"] < 0.001
    counted = {v["name"]: v.get("requests") for v in st["variants"]}
    assert counted["b"] > 1.5 * counted["a"], counted  # the real request counts from Prometheus
    assert fresh.route_weights() == {A: 50, B: 50, C: 0}
    assert "SampleRatioMismatch" in event_reasons(fresh, "srm")
    time.sleep(6)  # paused: no decision and no weight change at the next analysis
    obj = fresh.get(PLURAL, "srm")
    assert status(obj)["phase"] == "Paused" and fresh.route_weights() == {A: 50, B: 50, C: 0}
