"""The ModelRollout state machine, driven with synthetic observations and a fake clock."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from model_rollouts.analysis.stats import ProportionData
from model_rollouts.api.rollout import (
    ANNOTATION_ABORT,
    ANNOTATION_PROMOTE,
    ANNOTATION_PROMOTE_FULL,
    ANNOTATION_RESUME,
    ModelRolloutSpec,
    ModelRolloutStatus,
)
from model_rollouts.engine import rollout as eng
from model_rollouts.metrics.provider import Result

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def spec(steps: list[dict[str, Any]], **extra: Any) -> ModelRolloutSpec:
    analysis = {
        "interval": "10s",
        "prometheus": {"address": "http://prom:9090"},
        "guardrails": [{"name": "errors", "query": "q", "max": 0.05, "failureLimit": 2}],
    }
    analysis.update(extra.pop("analysis", {}))
    return ModelRolloutSpec.model_validate(
        {
            "stable": {"service": "v1"},
            "candidate": {"service": "v2"},
            "trafficRouting": {"gatewayAPI": {"httpRoute": "r"}},
            "steps": steps,
            "analysis": analysis,
            **extra,
        }
    )


def ok(value: float = 0.01) -> eng.Observations:
    return eng.Observations(guardrails={"errors": Result("value", value)})


class Driver:
    """Runs reconcile the way the handler does: one call per interval, weights recorded."""

    def __init__(self, s: ModelRolloutSpec) -> None:
        self.spec, self.status, self.now = s, ModelRolloutStatus(), T0
        self.weights: list[int] = [0]
        self.events: list[str] = []
        #: Every analysis's series point, as the operator archives them (status.series keeps the last 5).
        self.points: list[Any] = []

    def tick(self, obs: eng.Observations | None = None, advance: float = 10, **kw: Any) -> ModelRolloutStatus:
        if obs is None and eng.needs_measurement(self.spec, self.status, self.now):
            obs = ok()
        if obs is not None and not eng.needs_measurement(self.spec, self.status, self.now):
            obs = None  # the handler measures only when an analysis is due
        d = eng.reconcile(self.spec, self.status, now=self.now, generation=1, observations=obs, **kw)
        seen = {p.time for p in self.status.series}
        self.points += [p for p in d.status.series if p.time not in seen]
        self.status = d.status
        if d.status.revision is not None and (not self.weights or self.weights[-1] != d.status.weight):
            self.weights.append(d.status.weight)
        for a in d.actions:
            self.events.append(a.reason)
        self.now += timedelta(seconds=advance)
        return self.status


def run_until_done(d: Driver, limit: int = 50, **kw: Any) -> ModelRolloutStatus:
    for _ in range(limit):
        st = d.tick(**kw)
        if st.phase in ("Promoted", "RolledBack", "Aborted"):
            return st
    raise AssertionError(f"not finished: {d.status.phase} {d.status.message}")


def test_healthy_rollout_walks_the_steps_in_order_and_promotes() -> None:
    d = Driver(
        spec([{"setWeight": 10}, {"pause": {"duration": "30s"}}, {"setWeight": 50}, {"setWeight": 100}])
    )
    st = run_until_done(d)
    assert st.phase == "Promoted" and st.weight == 100
    assert d.weights == [0, 10, 50, 100]
    conds = {c.type: c.status for c in st.conditions}
    assert conds == {
        "Valid": "True",
        "Progressing": "False",
        "Completed": "True",
        "Healthy": "True",
        "Promoted": "True",
    }
    assert st.history[0].event == "Started" and st.history[-1].event == "Promoted"


def test_timed_pause_is_respected() -> None:
    d = Driver(spec([{"setWeight": 10}, {"pause": {"duration": "60s"}}, {"setWeight": 100}]))
    d.tick()  # start + weight 10
    for _ in range(5):  # 50 s into a 60 s pause
        assert d.tick().weight == 10
    assert "pause" in d.status.message


def test_max_weight_step_splits_jumps() -> None:
    d = Driver(spec([{"setWeight": 100}], maxWeightStep=30))
    run_until_done(d)
    assert d.weights == [0, 30, 60, 90, 100]


def test_guardrail_breach_needs_failure_limit_consecutive_failures() -> None:
    d = Driver(spec([{"setWeight": 20}, {"pause": {}}]))
    d.tick()
    assert d.status.weight == 20
    d.tick(ok(0.2))
    assert d.status.phase != "RolledBack" and d.status.guardrailFailures["errors"] == 1
    d.tick(ok(0.01))  # a pass resets the count
    assert d.status.guardrailFailures["errors"] == 0
    d.tick(ok(0.2))
    st = d.tick(ok(0.3))
    assert st.phase == "RolledBack" and st.weight == 0 and d.weights[-1] == 0
    assert "failureLimit 2" in st.message and st.history[-1].values == {"errors": 0.3}
    assert {c.type: c.status for c in st.conditions}["Healthy"] == "False"


@pytest.mark.parametrize("outcome", ["noData", "nan", "error"])
def test_missing_data_never_advances_or_promotes(outcome: str) -> None:
    d = Driver(
        spec([{"setWeight": 20}, {"setWeight": 100}], analysis={"errorLimit": 50}, progressDeadline="1h")
    )
    d.tick()
    bad = eng.Observations(guardrails={"errors": Result(outcome, None, "x")})  # type: ignore[arg-type]
    for _ in range(20):
        st = d.tick(bad)
        assert st.weight == 20 and st.phase == "Progressing"
    assert "holding" in st.message
    healthy = {c.type: c for c in st.conditions}["Healthy"]
    assert healthy.status == "Unknown"
    assert healthy.reason == ("MeasurementError" if outcome == "error" else "NoData")
    assert run_until_done(d).phase == "Promoted"  # data returns: progress resumes


def test_no_data_fail_policy_rolls_back() -> None:
    d = Driver(spec([{"setWeight": 20}, {"setWeight": 100}], analysis={"noData": "fail"}))
    d.tick()
    st = d.tick(eng.Observations(guardrails={"errors": Result("noData")}))
    assert st.phase == "RolledBack" and st.weight == 0
    # An error is not "no data": it holds even under noData=fail.
    d2 = Driver(spec([{"setWeight": 20}, {"setWeight": 100}], analysis={"noData": "fail"}))
    d2.tick()
    assert d2.tick(eng.Observations(guardrails={"errors": Result("error", message="timeout")})).weight == 20


def test_manual_gate_waits_for_resume_annotation_once() -> None:
    d = Driver(spec([{"setWeight": 20}, {"pause": {}}, {"setWeight": 100}]))
    d.tick()
    for _ in range(3):
        assert d.tick().phase == "Paused"
    d.tick(annotations={ANNOTATION_RESUME: "go-1"})
    assert d.status.weight == 100 and d.status.handled.resume == "go-1"
    assert run_until_done(d, annotations={ANNOTATION_RESUME: "go-1"}).phase == "Promoted"


def test_abort_and_promote_annotations() -> None:
    d = Driver(spec([{"setWeight": 20}, {"pause": {}}]))
    d.tick()
    st = d.tick(annotations={ANNOTATION_ABORT: "now"})
    assert st.phase == "Aborted" and st.weight == 0
    d = Driver(spec([{"setWeight": 20}, {"pause": {}}, {"setWeight": 60}]))
    d.tick()
    st = d.tick(annotations={ANNOTATION_PROMOTE_FULL: "yes"})
    assert st.phase == "Promoted" and st.weight == 100
    assert st.history[-1].reason == "PromoteFullRequested"


def test_a_promotion_below_100_takes_all_traffic_off_the_replaced_stable() -> None:
    d = Driver(spec([{"setWeight": 40}, {"pause": {}}]))
    d.tick()
    assert eng.route_weights(d.spec, d.status) == {"v1": 60, "v2": 40}
    st = d.tick(annotations={ANNOTATION_PROMOTE_FULL: "full"})
    assert st.phase == "Promoted" and st.stableService == "v2"
    assert eng.route_weights(d.spec, st) == {"v1": 0, "v2": 100}


def test_promote_moves_past_a_timed_pause_and_analysis_still_gates_the_next_weight() -> None:
    d = Driver(
        spec([{"setWeight": 20}, {"pause": {"duration": "1h"}}, {"setWeight": 50}, {"setWeight": 100}])
    )
    d.tick()
    assert d.tick().weight == 20 and "pause" in d.status.message
    # A breach (below failureLimit) when the promote arrives: the pause is skipped, the weight is not.
    st = d.tick(ok(0.2), annotations={ANNOTATION_PROMOTE: "p1"})
    assert st.currentStep == 2 and st.weight == 20 and st.handled.promote == "p1"
    assert st.history[-1].reason == "PromoteRequested" and "pause step 1 skipped" in st.history[-1].message
    assert "holding at weight 20" in st.message
    # The same token does nothing more; the next passing analysis moves on, one step at a time.
    st = d.tick(annotations={ANNOTATION_PROMOTE: "p1"})
    assert st.weight == 50 and st.phase == "Progressing"
    st = run_until_done(d, annotations={ANNOTATION_PROMOTE: "p1"})
    assert st.phase == "Promoted" and d.weights == [0, 20, 50, 100]
    assert st.history[-1].reason == "AnalysisPassed"


def test_promote_ends_an_analysis_step_but_never_skips_a_required_comparison() -> None:
    d = Driver(
        spec(
            [{"setWeight": 20}, {"analysis": {"duration": "1h"}}],
            analysis={"comparisons": [{"name": "fb", "successes": "s", "trials": "t", "margin": 0.01}]},
        )
    )
    undecided = eng.Observations(
        guardrails={"errors": Result("value", 0.01)},
        comparisons={"fb": eng.ComparisonData(ProportionData(50, 100), ProportionData(10, 20))},
    )
    d.tick()
    d.tick(undecided)
    st = d.tick(undecided, annotations={ANNOTATION_PROMOTE: "p"})
    assert st.currentStep == 2 and st.weight == 20
    for _ in range(5):  # past the steps, but the comparison has not passed: no full traffic
        st = d.tick(undecided, annotations={ANNOTATION_PROMOTE: "p"})
        assert st.weight == 20 and st.phase == "Progressing"
    assert "before full traffic" in st.message


def test_promote_releases_a_manual_gate_like_resume() -> None:
    d = Driver(spec([{"setWeight": 20}, {"pause": {}}, {"setWeight": 100}]))
    d.tick()
    assert d.tick().phase == "Paused"
    st = d.tick(annotations={ANNOTATION_PROMOTE: "go"})  # with a passing analysis: the next weight at once
    assert st.phase == "Progressing" and st.weight == 100
    assert any("manual gate step 1 skipped" in h.message for h in st.history)
    assert run_until_done(d, annotations={ANNOTATION_PROMOTE: "go"}).phase == "Promoted"


def test_promote_at_a_weight_step_is_ignored_and_never_skips_a_later_pause() -> None:
    d = Driver(spec([{"setWeight": 20}, {"setWeight": 40}, {"pause": {}}, {"setWeight": 100}]))
    d.tick()
    st = d.tick(ok(0.2), annotations={ANNOTATION_PROMOTE: "early"})  # at step 1 (setWeight), held
    assert st.handled.promote == "early" and "PromoteIgnored" in d.events and st.weight == 20
    assert "promote-full" in st.history[-1].message
    for _ in range(4):
        st = d.tick(annotations={ANNOTATION_PROMOTE: "early"})
    assert st.phase == "Paused" and st.currentStep == 2 and st.weight == 40


def test_promote_and_promote_full_are_separate_requests() -> None:
    d = Driver(spec([{"setWeight": 20}, {"pause": {}}, {"setWeight": 60}, {"pause": {}}]))
    d.tick()
    d.tick()
    st = d.tick(annotations={ANNOTATION_PROMOTE: "a"})
    assert st.weight == 60 and st.phase == "Progressing"
    st = d.tick(annotations={ANNOTATION_PROMOTE: "a", ANNOTATION_PROMOTE_FULL: "b"})
    assert st.phase == "Promoted" and st.weight == 100 and st.handled.promoteFull == "b"


def test_annotation_present_at_start_is_not_acted_on() -> None:
    d = Driver(spec([{"setWeight": 20}, {"setWeight": 100}]))
    st = d.tick(annotations={ANNOTATION_ABORT: "old"})
    assert st.phase == "Progressing"


def test_spec_paused_holds_weight_but_guardrails_still_protect() -> None:
    d = Driver(spec([{"setWeight": 20}, {"setWeight": 100}]))
    d.tick()
    d.spec = d.spec.model_copy(update={"paused": True})
    for _ in range(5):
        assert d.tick().phase == "Paused" and d.status.weight == 20
    d.tick(ok(0.5))
    assert d.tick(ok(0.5)).phase == "RolledBack"


def test_candidate_change_restarts_from_zero_as_new_revision() -> None:
    d = Driver(spec([{"setWeight": 20}, {"pause": {}}]))
    d.tick()
    d.tick()
    rev = d.status.revision
    d.spec = d.spec.model_copy(update={"candidate": d.spec.candidate.model_copy(update={"service": "v3"})})
    st = d.tick()
    assert st.revision != rev and st.weight == 0 and st.currentStep == 0
    assert "NewRevision" in d.events and d.weights[-1] == 0


def test_restart_from_status_continues_exactly() -> None:
    s = spec([{"setWeight": 10}, {"setWeight": 30}, {"setWeight": 60}, {"setWeight": 100}])
    d = Driver(s)
    d.tick()
    d.tick()
    saved = ModelRolloutStatus.model_validate_json(d.status.model_dump_json())  # what the API server holds
    d2 = Driver(s)
    d2.status, d2.now, d2.weights = saved, d.now, list(d.weights)
    run_until_done(d2)
    assert d2.weights == [0, 10, 30, 60, 100]


def test_invalid_touches_no_traffic() -> None:
    from model_rollouts.engine.status import invalid

    status, actions = invalid(
        ModelRolloutStatus(), "spec.trafficRouting.gatewayAPI.httpRoute: not found", T0, 3
    )
    assert status.phase == "Invalid" and status.weight == 0 and [a.reason for a in actions] == ["InvalidSpec"]
    valid = {c.type: c for c in status.conditions}["Valid"]
    assert valid.status == "False" and "httpRoute" in valid.message and valid.observedGeneration == 3


def _comparison_obs(stable: tuple[float, float], cand: tuple[float, float]) -> eng.Observations:
    return eng.Observations(
        guardrails={"errors": Result("value", 0.0)},
        comparisons={
            "fb": eng.ComparisonData(stable=ProportionData(*stable), candidate=ProportionData(*cand))
        },
    )


def test_comparison_showing_harm_rolls_back() -> None:
    s = spec(
        [{"setWeight": 50}, {"pause": {}}],
        analysis={
            "comparisons": [
                {"name": "fb", "successes": "s", "trials": "t", "test": "nonInferiority", "margin": 0.01}
            ]
        },
    )
    d = Driver(s)
    d.tick()
    st = d.tick(_comparison_obs((6000, 10000), (4000, 10000)))
    assert st.phase == "RolledBack" and "worse than stable" in st.message


def test_required_comparison_blocks_promotion_until_it_passes() -> None:
    s = spec(
        [{"setWeight": 50}],
        analysis={
            "comparisons": [
                {
                    "name": "fb",
                    "successes": "s",
                    "trials": "t",
                    "test": "nonInferiority",
                    "margin": 0.05,
                }
            ]
        },
    )
    d = Driver(s)
    d.tick()
    for _ in range(4):
        st = d.tick(_comparison_obs((30, 50), (30, 50)))  # far too little data to show anything
        assert st.phase != "Promoted"
    assert "has not passed" in st.message and st.weight == 50
    for _ in range(3):
        st = d.tick(_comparison_obs((60000, 100000), (60200, 100000)))
    assert st.phase == "Promoted"


def test_mean_comparison_without_data_writes_only_finite_numbers() -> None:
    from model_rollouts.analysis.stats import MeanData

    s = spec(
        [{"setWeight": 50}, {"pause": {}}],
        analysis={
            "comparisons": [
                {"name": "reward", "type": "mean", "sum": "s", "count": "c", "sumSquares": "q", "margin": 0.1}
            ]
        },
    )
    d = Driver(s)
    d.tick()
    st = d.tick(
        eng.Observations(
            guardrails={"errors": Result("value", 0.0)},
            comparisons={"reward": eng.ComparisonData(stable=MeanData(0, 0, 0), candidate=MeanData(0, 0, 0))},
        )
    )
    m = next(m for m in st.lastAnalysis if m.name == "reward")
    assert m.verdict == "inconclusive" and st.phase == "Paused"
    from model_rollouts.api.common import dump

    written = next(x for x in dump(st)["lastAnalysis"] if x["name"] == "reward")
    assert all(math.isfinite(v) for v in written.get("details", {}).values()), written  # JSON has no inf
