"""The promises a ModelExperiment keeps around its statistics (pure engine, synthetic observations):
terminal phases, pacing from status, deletion and guard weights, removed variants, weight edits,
specs that can never decide, the shared no-data gate, the error limit, SRM counting only once the
split is in effect, and Thompson winners confirmed on a fixed split."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from model_rollouts.analysis.stats import ProportionData
from model_rollouts.api.common import get_condition
from model_rollouts.api.crdgen import openapi_schema
from model_rollouts.api.experiment import ModelExperimentSpec, ModelExperimentStatus
from model_rollouts.engine import experiment as engine
from model_rollouts.engine.experiment import (
    Decision,
    Observations,
    VariantObservation,
    analysis_due,
    deletion_weights,
    guard_weights,
    next_due,
    route_weights,
    validate,
)
from model_rollouts.metrics.provider import Result
from tests.unit.test_experiment_engine import (
    T0,
    decided,
    events,
    make_spec,
    obs,
    set_weights,
    start,
    started,
    step,
    weights,
)


def concluded(spec: ModelExperimentSpec) -> Decision:
    d = started(spec)
    d = step(spec, d, 60, obs({"control": ProportionData(500, 1000), "v1": ProportionData(800, 1000)}))
    assert d.status.phase == "Concluded" and d.status.winner == "v1"
    return d


def cond(d: Decision, kind: str) -> Any:
    return get_condition(d.status.conditions, kind)


# --------------------------------------------------------------------------- terminal is terminal


def test_concluded_stays_concluded_whatever_the_spec_or_observations_say() -> None:
    spec = make_spec(2)
    d = concluded(spec)
    assert cond(d, "Concluded").status == "True" and cond(d, "Completed").status == "True"
    # Observations after the end are ignored; nothing moves.
    again = step(spec, d, 120, obs({"control": ProportionData(900, 1000), "v1": ProportionData(100, 1000)}))
    assert again.status.phase == "Concluded" and again.actions == [] and weights(again) == weights(d)
    # A spec that became unusable after the end is a condition, not a phase, and moves no traffic.
    broken = make_spec(2, analysis={"interval": "10s"}, stoppingRules={"maxDuration": "5s"})
    assert validate(broken)
    bad = step(broken, d, 125, None)
    assert bad.status.phase == "Concluded" and set_weights(bad) == []
    assert cond(bad, "Valid").status == "False" and "maxDuration" in cond(bad, "Valid").message
    assert cond(bad, "Completed").status == "True"
    # And the same through invalid() (what the controller uses for a missing route or Secret).
    gone = engine.invalid(d.status, "spec.trafficRouting.gatewayAPI.httpRoute: not found", T0, 1)
    assert gone.status.phase == "Concluded" and cond(gone, "Valid").status == "False"


def test_a_finished_experiment_made_invalid_by_the_loop_returns_to_its_phase() -> None:
    """The controller may record Valid=False (a route or Secret gone) on a finished experiment whose
    spec changed; when it is usable again it is finished again, never Running."""
    spec = make_spec(2)
    d = concluded(spec)
    broken, _ = engine.status_.invalid(d.status, "spec.trafficRouting.gatewayAPI.httpRoute: gone", T0, 2)
    assert broken.phase == "Invalid"
    assert deletion_weights(spec, broken) is None  # deleting it leaves the winner serving
    back = engine.reconcile(spec, broken, now=T0 + timedelta(seconds=90), generation=2)
    decided(spec, d.status, back)  # the route still carries the concluded split (Invalid moved nothing)
    assert back.status.phase == "Concluded" and back.status.winner == "v1" and set_weights(back) == []
    assert cond(back, "Completed").status == "True" and cond(back, "Valid").status == "True"


def test_retry_annotation_restarts_a_finished_experiment_once() -> None:
    spec = make_spec(2)
    d = concluded(spec)
    retry = {engine.ANNOTATION_RETRY: "1"}
    assert engine.active(spec.model_dump(), d.status.model_dump(mode="json"), {}) is False
    assert engine.active(spec.model_dump(), d.status.model_dump(mode="json"), retry) is True
    r = step(spec, d, 70, None, annotations=retry)
    assert r.status.phase == "Running" and "Retried" in events(r)
    assert weights(r) == {"control": 50, "v1": 50} and r.status.handled.retry == "1"
    assert r.status.startedAt == T0 + timedelta(seconds=70) and r.status.winner is None
    # The same value does not act again; on a running experiment a retry is only recorded.
    r2 = step(spec, r, 71, None, annotations=retry)
    assert "Retried" not in events(r2) and r2.status.startedAt == r.status.startedAt
    r3 = step(spec, r2, 72, None, annotations={engine.ANNOTATION_RETRY: "2"})
    assert r3.status.phase == "Running" and r3.status.handled.retry == "2" and set_weights(r3) == []


def test_a_new_revision_leaves_a_finished_experiment_but_an_invalid_one_does_not() -> None:
    spec = make_spec(2)
    d = concluded(spec)
    three = make_spec(3)
    assert engine.active(three.model_dump(), d.status.model_dump(mode="json"), {}) is True
    assert next_due(three, d.status) == engine.EPOCH and next_due(spec, d.status) is None
    r = step(three, d, 70, None)
    assert r.status.phase == "Running" and "NewRevision" in events(r)
    invalid_three = make_spec(3, stoppingRules={"maxDuration": "1s"})
    stay = step(invalid_three, d, 70, None, annotations={engine.ANNOTATION_RETRY: "x"})
    assert stay.status.phase == "Concluded" and "RetryRejected" in events(stay)


def test_deletion_moves_traffic_only_while_running_and_guard_only_after_rollback() -> None:
    spec = make_spec(3)
    d = started(spec)
    assert deletion_weights(spec, d.status) == {"svc-a": 100, "svc-b": 0, "svc-c": 0}
    assert guard_weights(spec, d.status) is None
    assert deletion_weights(spec, ModelExperimentStatus()) is None  # never started: never touched
    two = make_spec(2)
    done = concluded(two)
    assert deletion_weights(two, done.status) is None and guard_weights(two, done.status) is None
    aborted = step(spec, d, 6, None, annotations={engine.ANNOTATION_ABORT: "now"})
    assert aborted.status.phase == "Aborted"
    assert deletion_weights(spec, aborted.status) is None
    assert guard_weights(spec, aborted.status) == {"svc-a": 100, "svc-b": 0, "svc-c": 0}


# --------------------------------------------------------------------------- pacing


def test_pacing_lives_in_status() -> None:
    spec = make_spec(2)
    d = start(spec)
    assert not analysis_due(spec, d.status, T0 + timedelta(seconds=4))
    assert analysis_due(spec, d.status, T0 + timedelta(seconds=5))
    assert next_due(spec, d.status) == T0 + timedelta(seconds=5)
    o = obs({"control": ProportionData(1, 10), "v1": ProportionData(1, 10)})
    early = step(spec, d, 3, o)  # observations before the due time are ignored
    assert early.status.lastAnalysisTime is None and early.status.lastAnalysis == []
    d = step(spec, d, 5, o)
    assert d.status.lastAnalysisTime == T0 + timedelta(seconds=5)
    assert next_due(spec, d.status) == T0 + timedelta(seconds=10)
    # A second tick (a retry, a restart, another replica) before the due time adds no analysis.
    again = step(spec, d, 7, obs({"control": ProportionData(2, 20), "v1": ProportionData(2, 20)}))
    assert again.status.lastAnalysisTime == d.status.lastAnalysisTime
    assert [v.n for v in again.status.variants] == [10, 10]
    paused = make_spec(2, paused=True)
    assert next_due(paused, ModelExperimentStatus()) is None
    assert next_due(spec, ModelExperimentStatus()) == engine.EPOCH


# --------------------------------------------------------------------------- variants and weights


def test_removing_a_variant_zeroes_it_in_the_same_write() -> None:
    spec = make_spec(3)
    d = started(spec)
    assert weights(d) == {"control": 34, "v1": 33, "v2": 33}
    two = make_spec(2)  # v2 (svc-c, 33%) removed
    r = step(two, d, 7, None)
    written = set_weights(r)
    assert written == [{"svc-c": 0, "svc-a": 50, "svc-b": 50}]
    assert sum(written[0].values()) == 100 and r.status.retiredServices == ["svc-c"]
    assert route_weights(two, r.status) == written[0]
    # Once that status is written (after the route), the next tick lets go of the removed Service.
    r2 = step(two, r, 8, None)
    assert r2.status.retiredServices == [] and route_weights(two, r2.status) == {"svc-a": 50, "svc-b": 50}


def test_a_fixed_weight_edit_starts_a_new_revision_and_is_recorded() -> None:
    def weighted(c: int, b: int, x: int) -> ModelExperimentSpec:
        return make_spec(
            3,
            variants=[
                {"name": "control", "service": "svc-a", "control": True, "weight": c},
                {"name": "v1", "service": "svc-b", "weight": b},
                {"name": "v2", "service": "svc-c", "weight": x},
            ],
        )

    a, b = weighted(50, 25, 25), weighted(40, 30, 30)
    d = started(a)
    r = step(b, d, 7, None)
    assert weights(r) == {"control": 40, "v1": 30, "v2": 30}
    assert set_weights(r) == [{"svc-a": 40, "svc-b": 30, "svc-c": 30}]
    assert "NewRevision" in events(r) and r.status.history[-1].reason == "NewRevision"
    assert "control 50%" in r.status.history[-1].message and "40%" in r.status.history[-1].message


def test_specs_that_can_never_decide_are_rejected() -> None:
    with pytest.raises(ValidationError):  # a zero weight: the schema says minimum 1
        make_spec(
            2,
            variants=[
                {"name": "control", "service": "svc-a", "control": True, "weight": 100},
                {"name": "v1", "service": "svc-b", "weight": 0},
            ],
        )
    unset = make_spec(
        3,
        variants=[
            {"name": "control", "service": "svc-a", "control": True, "weight": 60},
            {"name": "v1", "service": "svc-b", "weight": 40},
            {"name": "v2", "service": "svc-c"},
        ],
    )
    assert (validate(unset) or "").startswith("spec.variants[2].weight")
    d = start(unset)
    assert d.status.phase == "Invalid" and set_weights(d) == []
    mde = make_spec(2, successCriteria={"minimumDetectableEffect": 1.5})
    assert (validate(mde) or "").startswith("spec.successCriteria.minimumDetectableEffect")
    assert (validate(make_spec(2, stoppingRules={"maxDuration": "0s"})) or "").startswith(
        "spec.stoppingRules.maxDuration"
    )
    dup = make_spec(
        2,
        guardrails=[
            {"name": "error-rate", "query": "q", "max": 0.05},
            {"name": "error-rate", "query": "q2", "max": 0.5},
        ],
    )
    assert (validate(dup) or "").startswith("spec.guardrails[1].name")


def test_schema_makes_the_api_server_reject_what_can_never_decide() -> None:
    schema = openapi_schema(ModelExperimentSpec)
    props = schema["properties"]
    for field in ("variants", "guardrails"):
        assert props[field]["x-kubernetes-list-type"] == "map"
        assert props[field]["x-kubernetes-list-map-keys"] == ["name"]
    assert props["variants"]["items"]["properties"]["weight"]["minimum"] == 1
    rules = " ".join(r["rule"] for r in schema["x-kubernetes-validations"])
    assert "self.variants.all(v, has(v.weight))" in rules and "minimumDetectableEffect < 1.0" in rules
    stop = " ".join(r["rule"] for r in props["stoppingRules"]["x-kubernetes-validations"])
    assert "duration(self.maxDuration) > duration('0s')" in stop


# --------------------------------------------------------------------------- no data, errors


def _guard(results: dict[str, Result], primary: dict[str, ProportionData | Result]) -> Observations:
    out = {}
    for n, p in primary.items():
        g = {"error-rate": results.get(n, Result("value", 0.0))}
        if isinstance(p, Result):
            out[n] = VariantObservation(problem=p, guardrails=g)
        else:
            out[n] = VariantObservation(primary=p, guardrails=g)
    return Observations(variants=out)


def test_a_variant_without_data_holds_then_is_dropped_after_the_timeout() -> None:
    spec = make_spec(3, analysis={"noDataTimeout": "1m"})
    d = started(spec)
    data: dict[str, ProportionData | Result] = {n: ProportionData(50, 100) for n in ("control", "v1", "v2")}
    silent = {"v2": Result("noData")}
    for sec in range(10, 65, 5):
        d = step(spec, d, sec, _guard(silent, data))
        assert d.status.phase == "Running" and weights(d)["v2"] == 33, sec
        assert "holding (no data)" in d.status.message
    assert next(v for v in d.status.variants if v.name == "v2").noDataSince == T0 + timedelta(seconds=10)
    d = step(spec, d, 70, _guard(silent, data))
    v2 = next(v for v in d.status.variants if v.name == "v2")
    assert not v2.active and v2.weight == 0 and "noDataTimeout" in (v2.reason or "")
    assert weights(d) == {"control": 50, "v1": 50, "v2": 0} and "VariantDropped" in events(d)
    # Data again before the timeout resets the clock.
    d = started(spec)
    d = step(spec, d, 10, _guard(silent, data))
    d = step(spec, d, 15, _guard({}, data))
    assert all(v.noDataSince is None for v in d.status.variants)


def test_on_no_data_timeout_hold_keeps_holding() -> None:
    spec = make_spec(2, analysis={"noDataTimeout": "10s", "onNoDataTimeout": "hold"})
    d = started(spec)
    data: dict[str, ProportionData | Result] = {"control": ProportionData(5, 10), "v1": Result("noData")}
    for sec in (10, 15, 20, 25):
        d = step(spec, d, sec, _guard({}, data))
    assert d.status.phase == "Running" and weights(d) == {"control": 50, "v1": 50}
    assert "holding (no data)" in d.status.message


def test_max_duration_ends_a_hold_without_a_winner() -> None:
    spec = make_spec(2, analysis={"onNoDataTimeout": "hold"}, stoppingRules={"maxDuration": "20s"})
    d = started(spec)
    data: dict[str, ProportionData | Result] = {"control": ProportionData(50, 100), "v1": Result("noData")}
    d = step(spec, d, 10, _guard({}, data))
    assert d.status.phase == "Running"
    d = step(spec, d, 20, _guard({}, data))
    assert d.status.phase == "Concluded" and d.status.decision == "noWinner" and d.status.winner is None
    assert (
        weights(d) == {"control": 100, "v1": 0}
        and "maxDuration 20s elapsed while holding" in d.status.message
    )


def test_no_data_fail_drops_a_variant_at_once_and_rolls_back_a_control() -> None:
    spec = make_spec(3, analysis={"noData": "fail"})  # failureLimit 2 does not apply to no data
    d = started(spec)
    data: dict[str, ProportionData | Result] = {n: ProportionData(5, 10) for n in ("control", "v1", "v2")}
    d = step(spec, d, 10, _guard({"v2": Result("noData")}, data))
    assert weights(d) == {"control": 50, "v1": 50, "v2": 0} and d.status.phase == "Running"
    assert d.status.guardrailFailures.get("v2/error-rate", 0) == 0
    d = started(spec)
    d = step(spec, d, 10, _guard({"control": Result("nan")}, data))
    assert d.status.phase == "RolledBack" and weights(d) == {"control": 100, "v1": 0, "v2": 0}


def test_error_limit_rolls_back_or_holds_and_a_short_outage_does_neither() -> None:
    spec = make_spec(2, analysis={"errorLimit": 3})
    data: dict[str, ProportionData | Result] = {"control": ProportionData(5, 10), "v1": ProportionData(5, 10)}
    down = {"control": Result("error", message="timeout"), "v1": Result("error", message="timeout")}
    d = started(spec)
    d = step(spec, d, 10, _guard(down, data))
    d = step(spec, d, 15, _guard(down, data))
    assert d.status.consecutiveErrors == 2 and d.status.phase == "Running"
    d = step(spec, d, 20, _guard({}, data))  # back before the limit: reset, no rollback, no promotion
    assert d.status.consecutiveErrors == 0 and d.status.phase == "Running"
    for sec in (25, 30, 35):
        d = step(spec, d, sec, _guard(down, data))
    assert d.status.phase == "RolledBack" and d.status.decision == "errorLimit"
    assert "ErrorLimitReached" in events(d) and weights(d) == {"control": 100, "v1": 0}
    hold = make_spec(2, analysis={"errorLimit": 3, "onErrorLimit": "hold"})
    d = started(hold)
    for sec in (10, 15, 20, 25):
        d = step(hold, d, sec, _guard(down, data))
    assert d.status.phase == "Running" and weights(d) == {"control": 50, "v1": 50}
    assert cond(d, "Healthy").status == "False" and cond(d, "Healthy").reason == "ErrorLimitReached"


# --------------------------------------------------------------------------- SRM


def test_srm_does_not_count_the_start_up_transient() -> None:
    """From a production route (100% control), the first samples are nearly all the control's."""
    spec = make_spec(2, stoppingRules={"minSamplesPerVariant": 40, "futility": False})
    d = start(spec)
    d = step(spec, d, 5, obs({"control": ProportionData(300, 1000), "v1": ProportionData(2, 10)}))
    assert d.status.phase == "Running" and d.status.srmBaseline == {"control": 1000, "v1": 10}
    assert cond(d, engine.SRM_REASON).reason == "CountingStarted"
    d = step(spec, d, 10, obs({"control": ProportionData(330, 1100), "v1": ProportionData(32, 112)}))
    assert d.status.phase == "Running" and cond(d, engine.SRM_REASON).status == "False"
    # Counted from the start, the same samples would have paused it at once.
    assert engine.stats.srm_test([1100, 112], [50, 50]) < 1e-100


# --------------------------------------------------------------------------- thompson


def test_thompson_leader_is_confirmed_on_its_own_fixed_split_samples() -> None:
    spec = make_spec(3, allocation={"strategy": "thompson", "minWeight": 10, "maxStep": 20})
    d = started(spec)
    big = {
        "control": ProportionData(500, 1000),
        "v1": ProportionData(510, 1000),
        "v2": ProportionData(800, 1000),
    }
    d = step(spec, d, 10, obs(big))
    assert d.status.phase == "Running" and d.status.winner is None
    assert d.status.confirmation is not None and d.status.confirmation.variant == "v2"
    assert weights(d) == {"control": 50, "v1": 0, "v2": 50} and "ConfirmationStarted" in events(d)
    assert d.status.confirmation.baseline == {"control": [500, 1000], "v2": [800, 1000]}
    # Pooled counts still favour v2, but the confirmation's own samples show no difference: no winner yet.
    even = {
        "control": ProportionData(600, 1200),
        "v1": ProportionData(510, 1000),
        "v2": ProportionData(900, 1200),
    }
    d = step(spec, d, 15, obs(even))
    assert d.status.phase == "Running" and weights(d) == {"control": 50, "v1": 0, "v2": 50}
    # The SRM check runs on the confirmation's fixed split.
    assert cond(d, engine.SRM_REASON).reason != "NotCheckedForThompson"
    # Then a real difference on fresh samples: v2 wins.
    better = {
        "control": ProportionData(600 + 250, 1200 + 500),
        "v1": ProportionData(510, 1000),
        "v2": ProportionData(900 + 400, 1200 + 500),
    }
    d = step(spec, d, 20, obs(better))
    assert d.status.phase == "Concluded" and d.status.winner == "v2"
    assert "confirmation of v2" in (d.status.decisionReason or "")


def test_sample_size_is_the_running_designs_at_the_split_in_force() -> None:
    data = {"control": ProportionData(500, 1000), "v1": ProportionData(500, 1000)}
    uncapped = make_spec(2, stoppingRules={"futility": False, "minSamplesPerVariant": 5000})
    capped = make_spec(
        2, stoppingRules={"futility": False, "minSamplesPerVariant": 5000, "maxSamplesPerVariant": 9000}
    )
    sizes: dict[str, int] = {}
    for name, spec in (("mixture", uncapped), ("sequential", capped)):
        d = step(spec, started(spec), 10, obs(data))
        assert d.status.sampleSizePerVariant is not None
        sizes[name] = d.status.sampleSizePerVariant
        plan = engine.stats.sample_plan_proportions(0.5, 0.05, alpha=0.05, power=0.8, design=name)  # type: ignore[arg-type]
        assert sizes[name] == plan.smaller_arm, name
    assert sizes["mixture"] > sizes["sequential"]  # the uncapped test needs more: never the capped size
    lopsided = make_spec(
        2,
        variants=[
            {"name": "control", "service": "svc-a", "control": True, "weight": 80},
            {"name": "v1", "service": "svc-b", "weight": 20},
        ],
        stoppingRules={"futility": False, "minSamplesPerVariant": 5000},
    )
    d = step(lopsided, started(lopsided), 10, obs(data))
    plan = engine.stats.sample_plan_proportions(
        0.5, 0.05, alpha=0.05, power=0.8, allocation=0.2, design="mixture"
    )
    assert d.status.sampleSizePerVariant == plan.smaller_arm
    v1 = next(v for v in d.status.variants if v.name == "v1")
    assert "more samples" in (v1.reason or "")
    assert bayes_size(make_spec(2, successCriteria={"method": "bayesian"}), data) is None


def bayes_size(spec: ModelExperimentSpec, data: dict[str, ProportionData]) -> int | None:
    return step(spec, started(spec), 10, obs(data)).status.sampleSizePerVariant
