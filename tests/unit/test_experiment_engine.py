"""The ModelExperiment state machine, driven with synthetic observations (pure, fast)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from model_rollouts.analysis.stats import MeanData, ProportionData
from model_rollouts.api.common import dump, get_condition
from model_rollouts.api.experiment import ModelExperimentSpec, ModelExperimentStatus
from model_rollouts.engine import experiment as engine
from model_rollouts.engine.experiment import (
    Decision,
    Event,
    Observations,
    VariantObservation,
    fixed_weights,
    needs_measurement,
    reconcile,
    revision_of,
)
from model_rollouts.metrics.provider import Result

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def make_spec(n: int = 2, **over: Any) -> ModelExperimentSpec:
    variants = [{"name": "control", "service": "svc-a", "control": True}] + [
        {"name": f"v{i}", "service": f"svc-{chr(ord('a') + i)}"} for i in range(1, n)
    ]
    doc: dict[str, Any] = {
        "variants": variants,
        "trafficRouting": {"gatewayAPI": {"httpRoute": "model"}},
        "primaryMetric": {"name": "ctr", "type": "proportion", "successes": "s", "trials": "t"},
        "guardrails": [{"name": "error-rate", "query": "q", "max": 0.05, "failureLimit": 2}],
        "successCriteria": {"minimumDetectableEffect": 0.05, "alpha": 0.05},
        "stoppingRules": {"minSamplesPerVariant": 200},
        "analysis": {"interval": "5s", "window": "30s", "prometheus": {"address": "http://prom:9090"}},
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    return ModelExperimentSpec.model_validate(doc)


def obs(
    data: Mapping[str, ProportionData | MeanData | Result], errors: dict[str, float] | None = None
) -> Observations:
    errors = errors or {}
    out = {}
    for name, d in data.items():
        g = {"error-rate": Result("value", errors.get(name, 0.0))}
        if isinstance(d, Result):
            out[name] = VariantObservation(problem=d, guardrails=g)
        else:
            out[name] = VariantObservation(primary=d, guardrails=g)
    return Observations(variants=out)


#: id(decision) -> (spec, the status it was decided from, the decision): see set_weights.
_FROM: dict[int, tuple[ModelExperimentSpec, ModelExperimentStatus, Decision]] = {}


def decided(spec: ModelExperimentSpec, before: ModelExperimentStatus, d: Decision) -> Decision:
    """Record that ``d`` was decided from ``before`` (whose weights the route carries)."""
    _FROM[id(d)] = (spec, before, d)
    return d


def start(spec: ModelExperimentSpec, **kw: Any) -> Decision:
    before = ModelExperimentStatus()
    return decided(spec, before, reconcile(spec, before, now=T0, generation=1, **kw))


def started(spec: ModelExperimentSpec, **kw: Any) -> Decision:
    """Started, and one analysis done with no samples yet: the SRM count starts there (at T0 + 5s)."""
    d = start(spec, **kw)
    zero = {v.name: ProportionData(0, 0) for v in spec.variants}
    return step(spec, d, 5, obs(zero), **kw)


def step(
    spec: ModelExperimentSpec, d: Decision, seconds: float, o: Observations | None, **kw: Any
) -> Decision:
    new = reconcile(spec, d.status, now=T0 + timedelta(seconds=seconds), generation=1, observations=o, **kw)
    return decided(spec, d.status, new)


def weights(d: Decision) -> dict[str, int]:
    return {v.name: v.weight for v in d.status.variants}


def set_weights(d: Decision) -> list[dict[str, int]]:
    """The weights a decision moves the route to: the engine's ``route_weights`` of the status it
    decided (what the controller writes, the one source of weights) when they differ from those of
    the status it was decided from; [] when the route is left as it was."""
    spec, before, _ = _FROM[id(d)]
    new, old = engine.route_weights(spec, d.status), engine.route_weights(spec, before)
    return [new] if new is not None and new != old else []


def events(d: Decision) -> list[str]:
    return [a.reason for a in d.actions if isinstance(a, Event)]


# --------------------------------------------------------------------------- start and weights


def test_start_sets_fixed_weights_per_service() -> None:
    spec = make_spec(2)
    d = start(spec)
    assert d.status.phase == "Running"
    assert d.status.startedAt == T0
    assert weights(d) == {"control": 50, "v1": 50}
    assert set_weights(d) == [{"svc-a": 50, "svc-b": 50}]
    assert "Started" in events(d)
    assert get_condition(d.status.conditions, "Valid").status == "True"  # type: ignore[union-attr]
    assert get_condition(d.status.conditions, "Progressing").status == "True"  # type: ignore[union-attr]


def test_equal_split_rounding_gives_the_remainder_to_the_control() -> None:
    spec = make_spec(3)
    assert fixed_weights(spec) == {"control": 34, "v1": 33, "v2": 33}
    spec7 = make_spec(7)
    w = fixed_weights(spec7)
    assert sum(w.values()) == 100 and w["control"] == 16 and all(w[f"v{i}"] == 14 for i in range(1, 7))
    # Dropping a variant spreads its share over the others, still summing to 100.
    assert fixed_weights(spec, {"control", "v2"}) == {"control": 50, "v1": 0, "v2": 50}


def test_explicit_weights_are_used() -> None:
    spec = make_spec(
        3,
        variants=[
            {"name": "control", "service": "svc-a", "control": True, "weight": 60},
            {"name": "v1", "service": "svc-b", "weight": 30},
            {"name": "v2", "service": "svc-c", "weight": 10},
        ],
    )
    assert weights(start(spec)) == {"control": 60, "v1": 30, "v2": 10}
    # Dropping v2 (10) spreads proportionally: 60/90 and 30/90.
    assert fixed_weights(spec, {"control", "v1"}) == {"control": 67, "v1": 33, "v2": 0}


def test_invalid_spec_sets_valid_false_and_moves_no_traffic() -> None:
    spec = make_spec(2, variants=[{"name": "a", "service": "svc-a"}, {"name": "b", "service": "svc-b"}])
    d = start(spec)
    assert d.status.phase == "Invalid"
    cond = get_condition(d.status.conditions, "Valid")
    assert cond is not None and cond.status == "False" and "spec.variants" in cond.message
    assert set_weights(d) == []
    dup = make_spec(
        2, variants=[{"name": "a", "service": "s", "control": True}, {"name": "b", "service": "s"}]
    )
    d = start(dup)
    assert d.status.phase == "Invalid" and "spec.variants[1].service" in d.status.message
    assert set_weights(d) == []


def test_paused_before_start_moves_nothing_then_starts_when_unpaused() -> None:
    spec = make_spec(2, paused=True)
    d = start(spec)
    assert d.status.phase == "Paused" and d.status.startedAt is None and set_weights(d) == []
    d = step(make_spec(2), d, 5, None)
    assert d.status.phase == "Running" and weights(d) == {"control": 50, "v1": 50}


# --------------------------------------------------------------------------- guardrails


def test_guardrail_breach_drops_variant_after_failure_limit_and_redistributes() -> None:
    spec = make_spec(3)
    d = start(spec)
    data = {n: ProportionData(10, 50) for n in ("control", "v1", "v2")}
    d = step(spec, d, 5, obs(data, errors={"v2": 0.3}))
    assert weights(d) == {"control": 34, "v1": 33, "v2": 33}  # one breach, failureLimit 2
    assert d.status.guardrailFailures["v2/error-rate"] == 1
    d = step(spec, d, 10, obs(data, errors={"v2": 0.3}))
    v2 = next(v for v in d.status.variants if v.name == "v2")
    assert not v2.active and v2.weight == 0 and "0.3" in (v2.reason or "")
    assert weights(d) == {"control": 50, "v1": 50, "v2": 0}
    assert {"svc-a": 50, "svc-b": 50, "svc-c": 0} in set_weights(d)
    assert "VariantDropped" in events(d)
    drop = next(h for h in d.status.history if h.event == "VariantDropped")
    assert drop.values and drop.values["v2/error-rate"] == pytest.approx(0.3)
    assert d.status.phase == "Running"


def test_control_breach_rolls_back_to_control() -> None:
    spec = make_spec(2, guardrails=[{"name": "error-rate", "query": "q", "max": 0.05}])
    d = start(spec)
    d = step(
        spec, d, 5, obs({"control": ProportionData(5, 50), "v1": ProportionData(5, 50)}, {"control": 0.5})
    )
    assert d.status.phase == "RolledBack" and d.status.decision == "rolledBack"
    assert weights(d) == {"control": 100, "v1": 0}
    assert set_weights(d)[-1] == {"svc-a": 100, "svc-b": 0}


# --------------------------------------------------------------------------- SRM


def test_srm_pauses_on_a_skewed_split_and_resume_restarts_the_check() -> None:
    spec = make_spec(2, stoppingRules={"minSamplesPerVariant": 400, "futility": False})
    d = started(spec)
    d = step(spec, d, 10, obs({"control": ProportionData(300, 1000), "v1": ProportionData(150, 500)}))
    assert d.status.phase == "Paused"
    assert d.status.srmPValue is not None and d.status.srmPValue < 1e-6
    cond = get_condition(d.status.conditions, "SampleRatioMismatch")
    assert cond is not None and cond.status == "True" and "1000" in cond.message
    assert "SampleRatioMismatch" in events(d) and "p = " in d.status.message
    assert set_weights(d) == []
    # Still paused at the next analysis (weights unchanged) until the resume annotation.
    d = step(spec, d, 15, obs({"control": ProportionData(600, 2000), "v1": ProportionData(300, 1000)}))
    assert d.status.phase == "Paused" and set_weights(d) == []
    ann = {engine.ANNOTATION_RESUME: "1"}
    d = step(
        spec,
        d,
        20,
        obs({"control": ProportionData(630, 2100), "v1": ProportionData(330, 1100)}),
        annotations=ann,
    )
    assert d.status.phase == "Running" and d.status.srmBaseline == {}
    # The same annotation value does not act twice; the SRM count restarts at the next analysis.
    for sec, c, v1 in ((25, 2200, 1200), (30, 2300, 1300)):
        o = obs({"control": ProportionData(c * 0.3, c), "v1": ProportionData(v1 * 0.3, v1)})
        d = step(spec, d, sec, o, annotations=ann)
        assert d.status.phase == "Running"
    assert d.status.srmBaseline == {"control": 2200, "v1": 1200}


def test_no_srm_on_matched_counts() -> None:
    spec = make_spec(3, stoppingRules={"futility": False})
    d = started(spec)
    data = {
        "control": ProportionData(100, 1020),
        "v1": ProportionData(100, 990),
        "v2": ProportionData(100, 1000),
    }
    d = step(spec, d, 10, obs(data))
    assert d.status.phase == "Running"
    assert d.status.srmPValue is not None and d.status.srmPValue > 0.1
    cond = get_condition(d.status.conditions, "SampleRatioMismatch")
    assert cond is not None and cond.status == "False"


def test_no_srm_with_tiny_counts() -> None:
    spec = make_spec(2)
    d = start(spec)
    d = step(spec, d, 5, obs({"control": ProportionData(3, 15), "v1": ProportionData(0, 2)}))
    assert d.status.phase == "Running" and d.status.srmPValue is None


# --------------------------------------------------------------------------- decisions


def test_winner_is_promoted_with_holm_adjusted_p_values() -> None:
    spec = make_spec(3)
    d = start(spec)
    data = {
        "control": ProportionData(500, 1000),
        "v1": ProportionData(505, 1000),
        "v2": ProportionData(800, 1000),
    }
    d = step(spec, d, 60, obs(data))
    assert d.status.phase == "Concluded" and d.status.decision == "promoted" and d.status.winner == "v2"
    assert weights(d) == {"control": 0, "v1": 0, "v2": 100}
    assert set_weights(d)[-1] == {"svc-a": 0, "svc-b": 0, "svc-c": 100}
    v = {x.name: x for x in d.status.variants}
    assert v["v2"].adjustedPValue is not None and v["v2"].pValue is not None
    assert v["v2"].adjustedPValue == pytest.approx(2 * v["v2"].pValue)  # Holm: the smallest p times 2
    assert v["v1"].adjustedPValue is not None and v["v1"].adjustedPValue >= v["v1"].pValue  # type: ignore[operator]
    assert v["v2"].probabilityToBeBest is not None and v["v2"].probabilityToBeBest > 0.99
    assert v["v2"].ciLow is not None and v["v2"].ciLow > 0
    assert "0.8" in (d.status.decisionReason or "") and "Holm" in (d.status.decisionReason or "")
    assert get_condition(d.status.conditions, "Completed").status == "True"  # type: ignore[union-attr]
    # Terminal: holds its weights and does not re-decide.
    d2 = step(spec, d, 65, obs(data))
    assert d2.status.phase == "Concluded" and set_weights(d2) == []


def test_onsuccess_keep_concludes_without_moving_traffic() -> None:
    spec = make_spec(2, onSuccess="keep")
    d = start(spec)
    d = step(spec, d, 60, obs({"control": ProportionData(500, 1000), "v1": ProportionData(800, 1000)}))
    assert d.status.phase == "Concluded" and d.status.winner == "v1" and d.status.decision == "winnerKept"
    assert weights(d) == {"control": 50, "v1": 50} and set_weights(d) == []


def test_no_decision_before_min_samples() -> None:
    spec = make_spec(2)
    d = start(spec)
    d = step(spec, d, 5, obs({"control": ProportionData(50, 100), "v1": ProportionData(90, 100)}))
    assert d.status.phase == "Running" and d.status.winner is None
    assert "collecting samples" in d.status.message


def test_null_result_stops_at_max_samples_without_promotion() -> None:
    spec = make_spec(
        2, stoppingRules={"minSamplesPerVariant": 100, "maxSamplesPerVariant": 400, "futility": False}
    )
    d = start(spec)
    d = step(spec, d, 5, obs({"control": ProportionData(100, 200), "v1": ProportionData(101, 200)}))
    assert d.status.phase == "Running"
    d = step(spec, d, 10, obs({"control": ProportionData(200, 400), "v1": ProportionData(201, 400)}))
    assert d.status.phase == "Concluded" and d.status.decision == "noWinner" and d.status.winner is None
    assert weights(d) == {"control": 100, "v1": 0}
    assert "maxSamplesPerVariant 400" in d.status.message


def test_futility_stops_early() -> None:
    spec = make_spec(
        2, successCriteria={"minimumDetectableEffect": 0.1}, stoppingRules={"minSamplesPerVariant": 100}
    )
    d = start(spec)
    d = step(spec, d, 5, obs({"control": ProportionData(5000, 10000), "v1": ProportionData(5000, 10000)}))
    assert d.status.phase == "Concluded" and d.status.decision == "futile" and d.status.winner is None


def test_no_data_holds_and_says_which() -> None:
    spec = make_spec(2)
    d = start(spec)
    d = step(spec, d, 5, obs({"control": ProportionData(500, 1000), "v1": Result("noData")}))
    assert d.status.phase == "Running" and d.status.winner is None and "no data" in d.status.message
    d = step(
        spec, d, 10, obs({"control": ProportionData(500, 1000), "v1": Result("error", message="timeout")})
    )
    assert (
        d.status.phase == "Running"
        and "measurement error" in d.status.message
        and "timeout" in d.status.message
    )
    assert set_weights(d) == []


def test_guardrail_error_does_not_count_as_a_breach() -> None:
    spec = make_spec(2, guardrails=[{"name": "error-rate", "query": "q", "max": 0.05}])
    d = start(spec)
    o = Observations(
        variants={
            "control": VariantObservation(ProportionData(1, 10), guardrails={"error-rate": Result("error")}),
            "v1": VariantObservation(ProportionData(1, 10), guardrails={"error-rate": Result("nan")}),
        }
    )
    d = step(spec, d, 5, o)
    assert d.status.phase == "Running" and all(v.active for v in d.status.variants)
    assert get_condition(d.status.conditions, "Healthy").status == "Unknown"  # type: ignore[union-attr]


def test_mean_metric_sample_size_from_pooled_sd() -> None:
    spec = make_spec(
        2,
        primaryMetric={"name": "reward", "type": "mean", "sum": "a", "count": "b", "sumSquares": "c"},
        successCriteria={"minimumDetectableEffect": 0.1, "method": "fixedHorizon"},
    )
    d = start(spec)
    assert d.status.sampleSizePerVariant is None
    # mean 1, sd 0.5 in each arm: sum of squares = n * (sd^2 + mean^2)
    data = {n: MeanData(100, 100.0, 100 * 1.25) for n in ("control", "v1")}
    d = step(spec, d, 5, obs(data))
    assert d.status.sampleSizePerVariant is not None and 350 < d.status.sampleSizePerVariant < 450
    assert d.status.phase == "Running"


# --------------------------------------------------------------------------- annotations, pause


def test_abort_annotation_acts_once_and_old_annotations_are_ignored() -> None:
    spec = make_spec(2)
    d = start(spec, annotations={engine.ANNOTATION_ABORT: "old"})
    assert d.status.phase == "Running"
    d = step(spec, d, 5, None, annotations={engine.ANNOTATION_ABORT: "old"})
    assert d.status.phase == "Running"
    d = step(spec, d, 6, None, annotations={engine.ANNOTATION_ABORT: "now"})
    assert d.status.phase == "Aborted" and d.status.decision == "aborted"
    assert weights(d) == {"control": 100, "v1": 0}


def test_spec_paused_holds_weights_and_decisions() -> None:
    spec = make_spec(2)
    d = start(spec)
    paused = make_spec(2, paused=True)
    data = {"control": ProportionData(500, 1000), "v1": ProportionData(800, 1000)}
    d = step(paused, d, 60, obs(data))
    assert d.status.phase == "Paused" and d.status.winner is None and set_weights(d) == []
    d = step(spec, d, 65, obs(data))
    assert d.status.phase == "Concluded" and d.status.winner == "v1"


# --------------------------------------------------------------------------- thompson


def test_thompson_weights_respect_min_weight_and_sum_to_100() -> None:
    spec = make_spec(3, allocation={"strategy": "thompson", "minWeight": 10, "maxStep": 20})
    d = start(spec)
    assert weights(d) == {"control": 34, "v1": 33, "v2": 33}
    data = {"control": ProportionData(50, 100), "v1": ProportionData(40, 100), "v2": ProportionData(80, 100)}
    seen = []
    for i in range(1, 6):
        d = step(spec, d, 5 * i, obs(data))
        w = weights(d)
        seen.append(w)
        assert sum(w.values()) == 100 and min(w.values()) >= 10
    assert seen[-1]["v2"] > 33 and seen[0] != {"control": 34, "v1": 33, "v2": 33}
    cond = get_condition(d.status.conditions, "SampleRatioMismatch")
    assert cond is not None and cond.reason == "NotCheckedForThompson"
    # Pure: same inputs, same weights.
    again = step(spec, d, 30, obs(data))
    assert weights(again) == weights(step(spec, d, 30, obs(data)))


def test_history_is_bounded_and_holds_no_state() -> None:
    spec, paused = make_spec(2), make_spec(2, paused=True)
    ann = {engine.ANNOTATION_ABORT: "x"}
    d = start(spec, annotations=ann)
    data = {"control": ProportionData(10, 100), "v1": ProportionData(9, 100)}
    for i in range(1, 81):  # every toggle of spec.paused adds an entry
        d = step(paused if i % 2 else spec, d, 5 * i, obs(data), annotations=ann)
    assert len(d.status.history) == engine.HISTORY_LIMIT
    assert d.status.history[0].event != "Started"  # trimmed
    assert d.status.phase == "Running" and d.status.handled.abort == "x"


def test_bayesian_winner_needs_probability_to_be_best() -> None:
    spec = make_spec(3, successCriteria={"method": "bayesian", "probabilityToBeBest": 0.95})
    d = start(spec)
    close = {
        "control": ProportionData(500, 1000),
        "v1": ProportionData(520, 1000),
        "v2": ProportionData(515, 1000),
    }
    d = step(spec, d, 30, obs(close))
    assert d.status.phase == "Running" and d.status.winner is None
    clear = {
        "control": ProportionData(500, 1000),
        "v1": ProportionData(520, 1000),
        "v2": ProportionData(700, 1000),
    }
    d = step(spec, d, 60, obs(clear))
    assert d.status.winner == "v2" and d.status.decision == "promoted"
    assert "P(best)" in (d.status.decisionReason or "")
    assert all(v.adjustedPValue is None for v in d.status.variants)


def test_thompson_drop_excludes_the_arm() -> None:
    spec = make_spec(3, allocation={"strategy": "thompson", "minWeight": 10, "maxStep": 10})
    d = start(spec)
    data = {n: ProportionData(50, 100) for n in ("control", "v1", "v2")}
    d = step(spec, d, 5, obs(data, errors={"v1": 0.5}))
    d = step(spec, d, 10, obs(data, errors={"v1": 0.5}))
    w = weights(d)
    assert w["v1"] == 0 and sum(w.values()) == 100 and min(w["control"], w["v2"]) >= 10


def test_no_data_fail_counts_a_missing_guardrail_as_a_breach() -> None:
    spec = make_spec(
        2, analysis={"noData": "fail"}, guardrails=[{"name": "error-rate", "query": "q", "max": 0.05}]
    )
    d = start(spec)
    o = Observations(
        variants={
            "control": VariantObservation(
                ProportionData(1, 10), guardrails={"error-rate": Result("value", 0.0)}
            ),
            "v1": VariantObservation(ProportionData(1, 10), guardrails={"error-rate": Result("noData")}),
        }
    )
    d = step(spec, d, 5, o)
    assert d.status.phase == "RolledBack"  # the only non-control variant was dropped
    assert weights(d) == {"control": 100, "v1": 0}


def test_changing_the_variants_restarts_the_experiment() -> None:
    spec = make_spec(2)
    d = start(spec)
    d = step(make_spec(3), d, 5, None)
    assert d.status.startedAt == T0 + timedelta(seconds=5)
    assert weights(d) == {"control": 34, "v1": 33, "v2": 33} and "NewRevision" in events(d)


# --------------------------------------------------------------------------- state lives in status


def roundtrip(d: Decision, history: bool = True) -> ModelExperimentStatus:
    """The status as the API server stores it (JSON, no nulls), optionally with no history left."""
    doc = json.loads(json.dumps(dump(d.status)))
    if not history:
        doc["history"] = []
    return ModelExperimentStatus.model_validate(doc)


def test_restart_from_stored_status_resumes_identically() -> None:
    spec = make_spec(3, stoppingRules={"minSamplesPerVariant": 400, "futility": False})
    old = {engine.ANNOTATION_ABORT: "old", engine.ANNOTATION_RESUME: "r0"}
    resumed = {**old, engine.ANNOTATION_RESUME: "r1"}

    def counts(c: int, v1: int, v2: int) -> dict[str, ProportionData]:
        return {n: ProportionData(0.3 * t, t) for n, t in (("control", c), ("v1", v1), ("v2", v2))}

    # (seconds, observations, annotations): the SRM count starts, SRM pause, an old resume value, a new
    # one, a drop (the count restarts after it), aborts.
    steps: list[tuple[float, Observations | None, dict[str, str]]] = [
        (5, obs(counts(0, 0, 0)), old),
        (10, obs(counts(1000, 500, 500)), old),
        (15, obs(counts(2000, 1000, 1000)), old),
        (20, obs(counts(2100, 1100, 1100)), resumed),
        (25, obs(counts(2200, 1200, 1200), {"v2": 0.3}), resumed),
        (30, obs(counts(2300, 1300, 1300), {"v2": 0.3}), resumed),
        (35, obs(counts(2500, 1500, 1300)), resumed),
        (40, None, resumed),
        (45, None, {**resumed, engine.ANNOTATION_ABORT: "now"}),
    ]
    run = [start(spec, annotations=old)]
    for sec, o, ann in steps:
        run.append(step(spec, run[-1], sec, o, annotations=ann))
    phases = [d.status.phase for d in run]
    assert phases == ["Running", "Running", "Paused", "Paused", "Running", "Running", "Running", "Running",
                      "Running", "Aborted"]  # fmt: skip
    assert "Resumed" in events(run[4]) and "VariantDropped" in events(run[6])
    assert run[6].status.srmBaseline == {} and run[6].status.srmSince == T0 + timedelta(seconds=30)
    assert run[7].status.srmBaseline == {"control": 2500, "v1": 1500, "v2": 1300}
    assert run[7].status.srmSince == T0 + timedelta(seconds=35)
    assert run[4].status.handled.resume == "r1" and run[-1].status.handled.abort == "now"

    def without_history(d: Decision) -> dict[str, Any]:
        return d.status.model_dump(exclude={"history"})

    for i in range(len(steps)):
        for history in (True, False):
            d = Decision(roundtrip(run[i], history), [])
            for j, (sec, o, ann) in enumerate(steps[i:], start=i + 1):
                d = step(spec, d, sec, o, annotations=ann)
                assert d.actions == run[j].actions, (i, history, j)
                assert without_history(d) == without_history(run[j]), (i, history, j)


def test_srm_baseline_is_what_keeps_a_resumed_experiment_running() -> None:
    spec = make_spec(2, stoppingRules={"minSamplesPerVariant": 400, "futility": False})
    d = started(spec)
    d = step(spec, d, 10, obs({"control": ProportionData(300, 1000), "v1": ProportionData(150, 500)}))
    assert d.status.phase == "Paused"
    d = step(spec, d, 15, obs({"control": ProportionData(330, 1100), "v1": ProportionData(180, 600)}),
             annotations={engine.ANNOTATION_RESUME: "go"})  # fmt: skip
    d = step(spec, d, 20, obs({"control": ProportionData(360, 1200), "v1": ProportionData(210, 700)}))
    assert d.status.phase == "Running" and d.status.srmBaseline == {"control": 1200, "v1": 700}
    later = obs({"control": ProportionData(480, 1600), "v1": ProportionData(330, 1100)})
    kept = step(spec, Decision(roundtrip(d, history=False), []), 25, later)
    assert kept.status.phase == "Running" and kept.status.srmPValue is not None
    # Counted from the start instead, the same samples are still skewed: the field carries the state.
    lost = roundtrip(d).model_copy(update={"srmBaseline": {"control": 0.0, "v1": 0.0}})
    assert step(spec, Decision(lost, []), 25, later).status.phase == "Paused"


def test_a_new_revision_restarts_from_scratch() -> None:
    spec = make_spec(2, stoppingRules={"futility": False})
    d = start(spec)
    rev = d.status.revision
    assert rev == revision_of(spec) and needs_measurement(spec, d.status)
    d = step(
        spec, d, 5, obs({"control": ProportionData(30, 100), "v1": ProportionData(40, 100)}, {"v1": 0.3})
    )
    assert d.status.guardrailFailures and d.status.variants[0].n == 100
    # Guardrails and stopping rules are not part of the revision; fixed weights are.
    same = make_spec(2, guardrails=[], stoppingRules={"minSamplesPerVariant": 500})
    assert revision_of(same) == rev
    weighted = make_spec(
        2,
        variants=[
            {"name": "control", "service": "svc-a", "control": True, "weight": 70},
            {"name": "v1", "service": "svc-b", "weight": 30},
        ],
    )
    assert revision_of(weighted) != rev
    # A new service for a variant (same names) or a new primary metric query is a new revision.
    moved = make_spec(
        2,
        variants=[
            {"name": "control", "service": "svc-a", "control": True},
            {"name": "v1", "service": "svc-z"},
        ],
        stoppingRules={"futility": False},
    )
    requery = make_spec(
        2, primaryMetric={"name": "ctr", "type": "proportion", "successes": "s2", "trials": "t"}
    )
    assert len({rev, revision_of(moved), revision_of(requery)}) == 3
    assert not needs_measurement(moved, d.status)
    ann = {engine.ANNOTATION_ABORT: "during-change"}
    d = step(moved, d, 10, None, annotations=ann)
    s = d.status
    assert (
        s.revision == revision_of(moved)
        and s.phase == "Running"
        and s.startedAt == T0 + timedelta(seconds=10)
    )
    assert "NewRevision" in events(d) and s.history[-1].reason == "NewRevision"
    # The variant's old Service is set to 0 in the same write: the route sums to 100.
    assert set_weights(d) == [{"svc-b": 0, "svc-a": 50, "svc-z": 50}] and s.retiredServices == ["svc-b"]
    assert all(v.n == 0 and v.active for v in s.variants) and not s.guardrailFailures
    assert s.srmBaseline == {} and s.srmSince == s.startedAt
    # The abort annotation present when the new revision started is recorded, not acted on.
    assert s.handled.abort == "during-change"
    d = step(moved, d, 15, None, annotations=ann)
    assert d.status.phase == "Running" and "NewRevision" not in events(d)
    # A concluded experiment also restarts for a new revision.
    done = step(moved, d, 20, None, annotations={engine.ANNOTATION_ABORT: "stop"})
    assert done.status.phase == "Aborted"
    again = step(spec, done, 25, None, annotations={engine.ANNOTATION_ABORT: "stop"})
    assert again.status.phase == "Running" and again.status.revision == rev and again.status.decision is None


def test_resume_annotation_present_at_start_is_ignored() -> None:
    spec = make_spec(2, stoppingRules={"minSamplesPerVariant": 400, "futility": False})
    ann = {engine.ANNOTATION_RESUME: "before"}
    d = started(spec, annotations=ann)
    assert d.status.handled.resume == "before" and d.status.handled.abort is None
    d = step(spec, d, 10, obs({"control": ProportionData(300, 1000), "v1": ProportionData(150, 500)}),
             annotations=ann)  # fmt: skip
    assert d.status.phase == "Paused"
    d = step(spec, d, 15, obs({"control": ProportionData(330, 1100), "v1": ProportionData(180, 600)}),
             annotations=ann)  # fmt: skip
    assert d.status.phase == "Paused" and "Resumed" not in events(d)


def test_status_without_the_new_fields_still_parses() -> None:
    legacy = {"phase": "Running", "startedAt": "2025-01-01T00:00:00Z", "variants": [{"name": "control"}]}
    s = ModelExperimentStatus.model_validate(legacy)
    assert s.revision is None and s.handled.abort is None and s.srmBaseline == {} and s.srmSince is None


def _with_requests(o: Observations, requests: dict[str, float]) -> Observations:
    return Observations(variants={n: replace(v, requests=requests[n]) for n, v in o.variants.items()})


def test_srm_counts_requests_when_a_requests_query_is_set() -> None:
    spec = make_spec(
        2,
        analysis={"requests": "sum(increase(requests[{{ window }}]))"},
        stoppingRules={"minSamplesPerVariant": 400, "futility": False},
    )
    d = started(spec)
    # Feedback (the primary metric's trials) is balanced, but the requests are 2:1: the split is off.
    balanced = obs({"control": ProportionData(300, 1000), "v1": ProportionData(300, 1000)})
    d = step(spec, d, 10, _with_requests(balanced, {"control": 2000, "v1": 1000}))
    assert d.status.phase == "Paused" and "2000" in d.status.message
    # And the other way round: skewed feedback with balanced requests is no mismatch.
    d = started(spec)
    skewed = obs({"control": ProportionData(300, 1000), "v1": ProportionData(150, 500)})
    d = step(spec, d, 10, _with_requests(skewed, {"control": 1500, "v1": 1500}))
    assert d.status.phase == "Running" and d.status.srmPValue is not None and d.status.srmPValue > 0.5
