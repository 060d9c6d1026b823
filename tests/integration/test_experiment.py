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

from model_rollouts.metrics.provider import render
from tests.harness import objects
from tests.harness.objects import delete_all, event_reasons, items, merge_sections, status
from tests.harness.queries import FEEDBACK, REQUESTS
from tests.harness.stack import Stack, httproute

pytestmark = pytest.mark.integration

A, B, C = "rec-a", "rec-b", "rec-c"
ROUTE = "recsys"
PLURAL = "modelexperiments"


def experiment(name: str, prom: str, services: list[str], **extra: Any) -> dict[str, Any]:
    """Variants a (control), b, c on the given Services; ``extra`` merges into the spec's sections."""
    names = {A: "a", B: "b", C: "c"}
    doc = objects.experiment(
        name,
        prom,
        [{"name": names[svc], "service": svc, "control": svc == A} for svc in services],
        ROUTE,
        successCriteria={"method": "sequential"},
        stoppingRules={"minSamplesPerVariant": 150},
    )
    merge_sections(doc["spec"], extra)
    return doc


@pytest.fixture(scope="module")
def stack(real_components: None) -> Iterator[Stack]:
    with Stack(
        variants={A: {"positive_rate": 0.5}, B: {"positive_rate": 0.5}, C: {"positive_rate": 0.5}},
        route=ROUTE,
        rps=72,
        max_seconds=2700,
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
    delete_all(stack, PLURAL)


def start_split(stack: Stack, weights: dict[str, int]) -> None:
    """Route traffic by the experiment's starting split, so the samples since its start match the split."""
    stack.apply(httproute(ROUTE, stack.namespace, weights))
    time.sleep(2)  # the traffic generator re-reads the route every second


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status(obj).get("conditions", [])}


def variants(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in status(obj).get("variants", [])}


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
            # The anytime-valid SRM test needs more samples than a fixed-horizon chi-square: with a
            # small minSamplesPerVariant a decision can come before the SRM check has enough data.
            stoppingRules={"minSamplesPerVariant": 1000},
            analysis={"requests": REQUESTS},
        )
    )
    obj = fresh.wait_for(PLURAL, "srm", lambda o: status(o).get("phase") in ("Paused", "Concluded"), 150)
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


# --------------------------------------------------------------------------- the loop's promises


def _route_sum_watch(stack: Stack, sums: list[int]) -> Any:
    def watch(_obj: dict[str, Any]) -> None:
        sums.append(sum(stack.route_weights().values()))

    return watch


def test_concluded_stays_concluded_when_the_route_is_recreated_and_delete_leaves_the_winner(
    fresh: Stack,
) -> None:
    assert fresh.prom is not None
    fresh.servers[C].set(positive_rate=0.8)
    start_split(fresh, {A: 34, B: 33, C: 33})
    fresh.apply(experiment("ends", fresh.prom.url, [A, B, C]))
    obj = fresh.wait_for(PLURAL, "ends", lambda o: status(o).get("phase") == "Concluded", 150)
    assert status(obj)["winner"] == "c"
    fresh.wait_route({A: 0, B: 0, C: 100})
    history = len(status(obj)["history"])
    # Argo CD re-creates the route from Git: the old split, and without c's backendRef first.
    co = client.CustomObjectsApi(fresh.api)
    co.delete_namespaced_custom_object(
        "gateway.networking.k8s.io", "v1", fresh.namespace, "httproutes", ROUTE
    )
    time.sleep(3)
    fresh.apply(httproute(ROUTE, fresh.namespace, {A: 50, B: 50}))
    time.sleep(8)
    fresh.apply(httproute(ROUTE, fresh.namespace, {A: 34, B: 33, C: 33}))
    time.sleep(8)
    obj = fresh.get(PLURAL, "ends")
    st = status(obj)
    assert st["phase"] == "Concluded" and st["winner"] == "c", st
    assert conditions(obj)["Completed"]["status"] == "True"
    assert conditions(obj)["Concluded"]["status"] == "True"
    assert len(st["history"]) == history, st["history"][history:]
    assert fresh.route_weights() == {A: 34, B: 33, C: 33}  # the operator let go of the route
    assert not {"Started", "NewRevision", "Resumed", "SampleRatioMismatch"} & (
        event_reasons(fresh, "ends") - {"Started"}
    )
    # The user puts the winner in Git; then deletes the experiment: traffic stays on the winner.
    fresh.apply(httproute(ROUTE, fresh.namespace, {A: 0, B: 0, C: 100}))
    co.delete_namespaced_custom_object("mlrollouts.io", "v1alpha1", fresh.namespace, PLURAL, "ends")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(o["metadata"]["name"] == "ends" for o in items(fresh, PLURAL)):
        time.sleep(0.5)
    time.sleep(2)
    assert fresh.route_weights() == {A: 0, B: 0, C: 100}


def test_removing_a_variant_at_33_percent_zeroes_it_in_the_same_write(fresh: Stack) -> None:
    assert fresh.prom is not None
    start_split(fresh, {A: 34, B: 33, C: 33})
    big = {"stoppingRules": {"minSamplesPerVariant": 100000}}
    fresh.apply(experiment("remove", fresh.prom.url, [A, B, C], **big))
    fresh.wait_for(PLURAL, "remove", lambda o: status(o).get("phase") == "Running", 30)
    fresh.wait_route({A: 34, B: 33, C: 33})
    sums: list[int] = []
    fresh.apply(experiment("remove", fresh.prom.url, [A, B], **big))
    obj = fresh.wait_for(
        PLURAL,
        "remove",
        lambda o: [v["name"] for v in status(o).get("variants", [])] == ["a", "b"],
        30,
        on_poll=_route_sum_watch(fresh, sums),
        poll=0.1,
    )
    weights = fresh.wait_route({A: 50, B: 50, C: 0})
    print(f"\nroute after removing c: {weights}; sums seen while it changed: {sorted(set(sums))}")
    assert sum(weights.values()) == 100 and set(sums) == {100}, sums
    assert "NewRevision" in event_reasons(fresh, "remove")
    obj = fresh.wait_for(PLURAL, "remove", lambda o: not status(o).get("retiredServices"), 20)
    assert status(obj)["phase"] == "Running"
    time.sleep(6)  # later analyses leave c at 0
    assert fresh.route_weights()[C] == 0


def test_a_weight_edit_takes_effect_and_is_recorded(fresh: Stack) -> None:
    assert fresh.prom is not None
    start_split(fresh, {A: 50, B: 25, C: 25})

    prom = fresh.prom.url

    def weighted(a: int, b: int, c: int) -> dict[str, Any]:
        doc = experiment("reweight", prom, [A, B, C], stoppingRules={"minSamplesPerVariant": 100000})
        for v, w in zip(doc["spec"]["variants"], (a, b, c), strict=True):
            v["weight"] = w
        return doc

    fresh.apply(weighted(50, 25, 25))
    fresh.wait_for(PLURAL, "reweight", lambda o: status(o).get("phase") == "Running", 30)
    fresh.wait_route({A: 50, B: 25, C: 25})
    fresh.apply(weighted(40, 30, 30))
    fresh.wait_route({A: 40, B: 30, C: 30}, timeout=15)
    obj = fresh.wait_for(PLURAL, "reweight", lambda o: variants(o).get("a", {}).get("weight") == 40, 10)
    last = status(obj)["history"][-1]
    assert last["reason"] == "NewRevision" and "a 50%" in last["message"], last
    assert "NewRevision" in event_reasons(fresh, "reweight")
    assert status(obj)["observedGeneration"] == obj["metadata"]["generation"]


def test_specs_that_can_never_decide_are_rejected_by_the_api_server(fresh: Stack) -> None:
    from kubernetes.client.exceptions import ApiException

    assert fresh.prom is not None
    co = client.CustomObjectsApi(fresh.api)

    def create(doc: dict[str, Any]) -> ApiException:
        doc["metadata"]["namespace"] = fresh.namespace
        with pytest.raises(ApiException) as e:
            co.create_namespaced_custom_object("mlrollouts.io", "v1alpha1", fresh.namespace, PLURAL, doc)
        return e.value

    zero = experiment("zero", fresh.prom.url, [A, B, C])
    for v, w in zip(zero["spec"]["variants"], (100, 0, 0), strict=True):
        v["weight"] = w
    err = create(zero)
    assert err.status == 422 and "weight" in str(err.body), err.body
    unset = experiment("unset", fresh.prom.url, [A, B, C])
    unset["spec"]["variants"][0]["weight"] = 60
    unset["spec"]["variants"][1]["weight"] = 40
    err = create(unset)
    assert err.status == 422 and "every variant or on none" in str(err.body), err.body
    mde = experiment("mde", fresh.prom.url, [A, B], successCriteria={"minimumDetectableEffect": 1.5})
    err = create(mde)
    assert err.status == 422 and "minimumDetectableEffect" in str(err.body), err.body
    forever = experiment("forever", fresh.prom.url, [A, B], stoppingRules={"maxDuration": "0s"})
    err = create(forever)
    assert err.status == 422 and "maxDuration" in str(err.body), err.body
    dup = experiment("dup", fresh.prom.url, [A, B])
    dup["spec"]["variants"][1]["name"] = "a"
    err = create(dup)
    assert err.status == 422 and "Duplicate value" in str(err.body), err.body
    guard = experiment("dupguard", fresh.prom.url, [A, B])
    guard["spec"]["guardrails"].append({**guard["spec"]["guardrails"][0], "max": 0.9})
    err = create(guard)
    assert err.status == 422 and "Duplicate value" in str(err.body), err.body
    assert not items(fresh, PLURAL)


def test_srm_ignores_the_start_up_transient_from_a_production_route(fresh: Stack) -> None:
    """The route still sends 100% to the control when the experiment starts: no false SRM pause."""
    assert fresh.prom is not None
    start_split(fresh, {A: 100, B: 0, C: 0})
    time.sleep(3)
    fresh.apply(
        experiment(
            "transient",
            fresh.prom.url,
            [A, B],
            stoppingRules={"minSamplesPerVariant": 40, "maxSamplesPerVariant": 100000, "futility": False},
            analysis={"requests": REQUESTS},
        )
    )
    phases: list[str] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < 40:
        obj = fresh.get(PLURAL, "transient")
        phases.append(status(obj).get("phase", ""))
        time.sleep(1)
    srm = conditions(obj).get("SampleRatioMismatch", {})
    print(f"\nSRM after 40s from a 100% control route: {srm.get('reason')}: {srm.get('message')}")
    assert "Paused" not in phases, phases
    assert srm.get("status") != "True" and srm.get("reason") in ("SplitMatches", "NotEnoughSamples"), srm


def test_a_variant_without_data_is_dropped_after_the_no_data_timeout(fresh: Stack) -> None:
    """c's server gets no requests (its error rate is 0/0): it holds, then is dropped like a breach."""
    assert fresh.prom is not None and fresh.loadgen is not None
    fresh.loadgen.set_skew({C: 0.0})
    start_split(fresh, {A: 34, B: 33, C: 33})
    # c's 10 s window empties: Prometheus has neither a request nor feedback of c's in it.
    quiet = [render(q, {"service": C, "window": "10s"}) for q in (REQUESTS, FEEDBACK)]
    deadline = time.monotonic() + 60
    while any(float(r[0]["value"][1]) > 0 for q in quiet if (r := fresh.prom.query(q))):
        assert time.monotonic() < deadline, "c's requests never left the 10 s window"
        time.sleep(0.5)
    t0 = time.monotonic()
    fresh.apply(
        experiment(
            "silent",
            fresh.prom.url,
            [A, B, C],
            stoppingRules={"minSamplesPerVariant": 100000},
            analysis={"noDataTimeout": "15s", "window": "10s"},
        )
    )
    held = fresh.wait_for(PLURAL, "silent", lambda o: "holding (no data)" in status(o).get("message", ""), 30)
    assert variants(held)["c"]["active"] and fresh.route_weights()[C] == 33
    obj = fresh.wait_for(PLURAL, "silent", lambda o: variants(o).get("c", {}).get("active") is False, 60)
    print(f"\nsilent variant dropped after {time.monotonic() - t0:.1f}s: {variants(obj)['c'].get('reason')}")
    assert status(obj)["phase"] == "Running" and "noDataTimeout" in variants(obj)["c"]["reason"]
    weights = fresh.wait_route({C: 0})
    assert weights[A] + weights[B] == 100
    assert "VariantDropped" in event_reasons(fresh, "silent")


def test_a_second_experiment_on_a_managed_route_is_invalid_and_the_route_never_flips(fresh: Stack) -> None:
    assert fresh.prom is not None
    start_split(fresh, {A: 34, B: 33, C: 33})
    fresh.apply(
        experiment("owner", fresh.prom.url, [A, B, C], stoppingRules={"minSamplesPerVariant": 100000})
    )
    fresh.wait_for(PLURAL, "owner", lambda o: status(o).get("phase") == "Running", 30)
    time.sleep(1)
    second = experiment("intruder", fresh.prom.url, [A, B], stoppingRules={"minSamplesPerVariant": 100000})
    fresh.apply(second)
    seen: list[dict[str, int]] = []
    obj = fresh.wait_for(
        PLURAL,
        "intruder",
        lambda o: status(o).get("phase") == "Invalid",
        30,
        on_poll=lambda _o: seen.append(fresh.route_weights()),
    )
    valid = conditions(obj)["Valid"]
    assert valid["status"] == "False" and "owner" in valid["message"], valid
    time.sleep(6)
    seen.append(fresh.route_weights())
    assert all(w == {A: 34, B: 33, C: 33} for w in seen), seen


def test_thompson_leader_is_confirmed_on_a_fixed_split_before_it_wins(fresh: Stack) -> None:
    assert fresh.prom is not None
    fresh.servers[C].set(positive_rate=0.8)
    start_split(fresh, {A: 34, B: 33, C: 33})
    t0 = time.monotonic()
    fresh.apply(
        experiment(
            "bandit",
            fresh.prom.url,
            [A, B, C],
            allocation={"strategy": "thompson", "minWeight": 10, "maxStep": 20},
            stoppingRules={"minSamplesPerVariant": 100},
        )
    )
    routes: list[dict[str, int]] = []
    obj = fresh.wait_for(
        PLURAL,
        "bandit",
        lambda o: status(o).get("phase") in ("Concluded", "RolledBack", "Aborted", "Invalid"),
        240,
        on_poll=lambda _o: routes.append(fresh.route_weights()),
    )
    st = status(obj)
    print(f"\nthompson winner after {time.monotonic() - t0:.1f}s: {st.get('decisionReason')}")
    assert st["phase"] == "Concluded" and st["winner"] == "c", st
    assert st["confirmation"]["variant"] == "c"
    assert {A: 50, B: 0, C: 50} in routes, routes  # the confirmation's fixed split was served
    assert "confirmation of c" in st["decisionReason"]
    # Events are sent after the status write the phase came with: give them a moment.
    until = time.monotonic() + 15
    while not {"ConfirmationStarted", "WinnerPromoted"} <= event_reasons(fresh, "bandit"):
        assert time.monotonic() < until, event_reasons(fresh, "bandit")
        time.sleep(0.5)
    fresh.wait_route({A: 0, B: 0, C: 100})
