"""Per-segment comparison ("no cohort left behind") on the real stack: real API server, Prometheus,
model servers emitting the ``region`` label, and traffic."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from tests.harness.objects import CANDIDATE, STABLE, fraud_stack, fresh_fraud, phase, rollout
from tests.harness.stack import Stack

REGIONS = ["north", "south", "east", "west"]
SEG_POSITIVE = (
    'sum(increase(model_segment_feedback_total{service="{{ service }}",region="{{ segment }}",'
    'feedback="positive"}[{{ window }}]))'
)
SEG_FEEDBACK = (
    'sum(increase(model_segment_feedback_total{service="{{ service }}",'
    'region="{{ segment }}"}[{{ window }}]))'
)
MARGIN = 0.15


@pytest.fixture(scope="module")
def stack(real_components: None) -> Iterator[Stack]:
    with fraud_stack(max_seconds=1500, rps=60) as s:
        yield s


@pytest.fixture()
def fresh(stack: Stack) -> Iterator[Stack]:
    for svc in (STABLE, CANDIDATE):
        stack.servers[svc].set(positive_rate=0.5, segment_positive_rate={}, segment_share={})
    yield from fresh_fraud(stack, "modelrollouts", restart_operator=True)
    for svc in (STABLE, CANDIDATE):
        stack.servers[svc].set(positive_rate=0.6, segment_positive_rate={}, segment_share={})


def _segmented(name: str, prom: str, min_samples: int = 100) -> dict[str, Any]:
    comparison = {
        "name": "positive-feedback",
        "successes": SEG_POSITIVE,
        "trials": SEG_FEEDBACK,
        "test": "nonInferiority",
        "margin": MARGIN,
        "segments": {"label": "region", "values": REGIONS, "minSamples": min_samples},
    }
    return rollout(
        name,
        prom,
        [{"setWeight": 50}, {"analysis": {"duration": "5s"}}, {"setWeight": 100}],
        analysis={"comparisons": [comparison]},
    )


def _rows(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    comp = next(m for m in obj["status"]["lastAnalysis"] if m["name"] == "positive-feedback")
    return {r["segment"]: r for r in comp.get("segments") or []}


def test_better_overall_but_harmed_in_one_region_is_rolled_back_naming_it(fresh: Stack) -> None:
    assert fresh.prom is not None
    # Better by 0.2 in three regions, worse by 2x the margin in the west: better on average.
    better = {r: 0.7 for r in REGIONS[:3]}
    fresh.servers[CANDIDATE].set(segment_positive_rate={**better, "west": 0.5 - 2 * MARGIN})
    fresh.apply(_segmented("harmed", fresh.prom.url))
    obj = fresh.wait_for("modelrollouts", "harmed", lambda o: phase(o) in ("RolledBack", "Promoted"), 300)
    assert phase(obj) == "RolledBack", obj["status"].get("message")
    fresh.wait_route({STABLE: 100, CANDIDATE: 0})
    rows = _rows(obj)
    assert rows["west"]["status"] == "fail", rows
    assert all(rows[r]["status"] != "fail" for r in REGIONS[:3]), rows
    assert "west" in obj["status"]["message"]
    events = (
        client.CoreV1Api(fresh.api)
        .list_namespaced_event(fresh.namespace, field_selector="involvedObject.name=harmed")
        .items
    )
    assert any(e.reason == "RolledBack" and "west" in (e.message or "") for e in events)


def test_equal_candidate_is_promoted_with_every_region_passing(fresh: Stack) -> None:
    assert fresh.prom is not None
    fresh.apply(_segmented("equal", fresh.prom.url))
    obj = fresh.wait_for("modelrollouts", "equal", lambda o: phase(o) in ("RolledBack", "Promoted"), 420)
    assert phase(obj) == "Promoted", obj["status"].get("message")
    rows = _rows(obj)
    assert set(rows) == set(REGIONS)
    assert all(r["status"] == "pass" for r in rows.values()), rows


def test_a_too_small_region_is_reported_as_such_and_never_passed(fresh: Stack) -> None:
    assert fresh.prom is not None
    for svc in (STABLE, CANDIDATE):
        fresh.servers[svc].set(segment_share={"west": 0.003})
    fresh.apply(_segmented("small", fresh.prom.url, min_samples=200))
    obj = fresh.wait_for("modelrollouts", "small", lambda o: phase(o) in ("RolledBack", "Promoted"), 420)
    assert phase(obj) == "Promoted", obj["status"].get("message")
    rows = _rows(obj)
    assert rows["west"]["status"] == "tooSmall", rows
    assert min(rows["west"]["stableN"], rows["west"]["candidateN"]) < 200
    assert all(rows[r]["status"] == "pass" for r in REGIONS[:3]), rows
    comp = next(m for m in obj["status"]["lastAnalysis"] if m["name"] == "positive-feedback")
    assert "too small to judge: west" in comp["message"]
