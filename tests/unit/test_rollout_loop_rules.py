"""Control-loop rules of the ModelRollout engine: pacing, terminal phases, revisions, gates, limits."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from model_rollouts.api.rollout import ANNOTATION_RESUME, ANNOTATION_RETRY, ModelRolloutSpec
from model_rollouts.engine import rollout as eng
from model_rollouts.metrics.provider import Result
from tests.unit.test_rollout_engine import T0, Driver, ok, run_until_done, spec


def _with(s: ModelRolloutSpec, **changes: Any) -> ModelRolloutSpec:
    return ModelRolloutSpec.model_validate({**s.model_dump(exclude_none=True), **changes})


def test_next_analysis_is_due_one_interval_after_the_last_analysis_or_weight_change() -> None:
    d = Driver(spec([{"setWeight": 10}, {"setWeight": 100}]))
    d.tick(advance=0)  # start: weight 10 at T0
    assert d.status.weight == 10 and d.status.epochStartedAt == T0
    assert not eng.needs_measurement(d.spec, d.status, T0 + timedelta(seconds=9))
    assert eng.needs_measurement(d.spec, d.status, T0 + timedelta(seconds=10))
    assert eng.next_due(d.spec, d.status) == T0 + timedelta(seconds=10)
    # Ticks between due times (restarts, retries, a second replica) change nothing.
    before = d.status.model_copy(deep=True)
    for _ in range(5):
        d.tick(advance=1)
    assert d.status.weight == before.weight and d.status.lastAnalysisTime == before.lastAnalysisTime


def test_rolled_back_is_terminal_until_a_new_candidate_or_retry() -> None:
    d = Driver(spec([{"setWeight": 60}, {"pause": {}}]))
    d.tick()
    d.tick(ok(0.5))
    st = d.tick(ok(0.5))
    assert st.phase == "RolledBack" and st.weight == 0
    for _ in range(5):  # nothing the route or Secrets do can bring it back
        assert d.tick().phase == "RolledBack" and d.status.weight == 0
    assert eng.guard_weights(d.spec, d.status) == {"v2": 0, "v1": 100}
    assert eng.deletion_weights(d.spec, d.status) is None
    st = d.tick(annotations={ANNOTATION_RETRY: "1"})
    assert st.phase == "Progressing" and "RetryRequested" in d.events


def test_candidate_change_mid_rollout_zeroes_the_old_candidate_in_the_same_write() -> None:
    d = Driver(spec([{"setWeight": 40}, {"pause": {}}]))
    d.tick()
    assert d.status.weight == 40
    d.spec = _with(d.spec, candidate={"service": "v3"})
    st = d.tick()
    w = eng.route_weights(d.spec, st)
    assert w == {"v1": 100, "v2": 0, "v3": 0} and sum(w.values()) == 100
    st = d.tick()
    w = eng.route_weights(d.spec, st)
    assert w == {"v1": 60, "v2": 0, "v3": 40} and sum(w.values()) == 100


def test_after_promotion_a_new_candidate_ramps_from_what_is_serving() -> None:
    d = Driver(spec([{"setWeight": 50}]))
    assert run_until_done(d).phase == "Promoted"
    assert d.status.stableService == "v2"
    assert eng.deletion_weights(d.spec, d.status) is None  # deleting leaves traffic on v2
    # GitOps: the user records stable=v2 (candidate still v2): a no-op.
    d.spec = _with(d.spec, stable={"service": "v2"})
    assert d.tick().phase == "Promoted" and not eng.active(d.spec.model_dump(), d.status.model_dump(), {})
    # Then v2 -> v3 ramps from v2; v1 (what Git once said) never gets traffic back.
    d.spec = _with(d.spec, stable={"service": "v1"}, candidate={"service": "v3"})
    st = d.tick()
    assert st.phase == "Progressing" and st.stableService == "v2"
    assert eng.route_weights(d.spec, st) == {"v2": 50, "v3": 50} or eng.route_weights(d.spec, st)["v2"] >= 50
    assert "v1" not in eng.route_weights(d.spec, st)


def test_same_stable_and_candidate_is_idle() -> None:
    d = Driver(_with(spec([{"setWeight": 50}]), candidate={"service": "v1"}))
    st = d.tick()
    assert st.phase == "Idle" and eng.route_weights(d.spec, st) == {"v1": 100}


def test_max_weight_step_applies_to_the_final_increase() -> None:
    d = Driver(spec([{"setWeight": 20}], maxWeightStep=20))
    run_until_done(d)
    assert d.weights == [0, 20, 40, 60, 80, 100]


def test_early_resume_does_not_release_a_later_gate() -> None:
    d = Driver(spec([{"setWeight": 20}, {"pause": {"duration": "30s"}}, {"pause": {}}, {"setWeight": 100}]))
    d.tick()
    d.tick(annotations={ANNOTATION_RESUME: "early"})
    assert "ResumeIgnored" in d.events
    for _ in range(10):
        st = d.tick(annotations={ANNOTATION_RESUME: "early"})
    assert st.phase == "Paused" and st.weight == 20
    d.tick(annotations={ANNOTATION_RESUME: "now"})
    assert run_until_done(d, annotations={ANNOTATION_RESUME: "now"}).phase == "Promoted"


def test_changed_steps_restart_from_the_first_step() -> None:
    d = Driver(spec([{"setWeight": 20}, {"setWeight": 40}, {"setWeight": 60}, {"pause": {}}]))
    d.tick()
    d.tick()
    assert d.status.weight == 40
    d.spec = _with(d.spec, steps=[{"setWeight": 60}, {"pause": {}}])
    d.tick()  # the new first step (60) applies at once
    assert "StepsChanged" in d.events and d.status.weight == 60 and d.status.currentStep == 1
    for _ in range(3):
        d.tick()
    assert d.status.weight == 60 and d.status.phase == "Paused"


def test_progress_deadline_rolls_back_a_hold_that_never_ends() -> None:
    d = Driver(
        spec([{"setWeight": 20}, {"setWeight": 100}], progressDeadline="1m", analysis={"errorLimit": 99})
    )
    d.tick()
    nodata = eng.Observations(guardrails={"errors": Result("noData")})
    for _ in range(5):
        st = d.tick(nodata)
        assert st.phase == "Progressing" and st.weight == 20
    for _ in range(3):
        st = d.tick(nodata)
    assert st.phase == "RolledBack" and "ProgressDeadlineExceeded" in d.events


def test_progress_deadline_hold_policy_only_reports() -> None:
    d = Driver(
        spec([{"setWeight": 20}, {"setWeight": 100}], progressDeadline="30s", onProgressDeadline="hold",
             analysis={"errorLimit": 99})
    )  # fmt: skip
    d.tick()
    for _ in range(10):
        st = d.tick(eng.Observations(guardrails={"errors": Result("noData")}))
    assert st.phase == "Progressing" and st.weight == 20
    prog = {c.type: c for c in st.conditions}["Progressing"]
    assert prog.status == "False" and prog.reason == "ProgressDeadlineExceeded"
    assert d.events.count("ProgressDeadlineExceeded") == 1


def test_error_limit_rolls_back_and_shorter_outages_do_nothing() -> None:
    d = Driver(spec([{"setWeight": 20}, {"setWeight": 100}], analysis={"errorLimit": 3}))
    d.tick()
    err = eng.Observations(guardrails={"errors": Result("error", message="timeout")})
    d.tick(err)
    d.tick(err)
    st = d.tick(ok())  # an outage shorter than the limit: no rollback, no promotion
    assert st.phase == "Progressing" and st.consecutiveErrors == 0
    for _ in range(3):
        st = d.tick(err)
    assert st.phase == "RolledBack" and "ErrorLimitReached" in d.events


def test_error_limit_hold_keeps_weights() -> None:
    limits = {"errorLimit": 2, "onErrorLimit": "hold"}
    d = Driver(spec([{"setWeight": 20}, {"setWeight": 100}], analysis=limits, progressDeadline="1h"))
    d.tick()
    for _ in range(6):
        st = d.tick(eng.Observations(guardrails={"errors": Result("error", message="timeout")}))
    assert st.phase == "Progressing" and st.weight == 20
    assert {c.type: c for c in st.conditions}["Healthy"].reason == "ErrorLimitReached"


def test_rolled_back_and_promoted_are_told_apart_by_conditions() -> None:
    d = Driver(spec([{"setWeight": 60}, {"pause": {}}]))
    d.tick()
    d.tick(ok(0.5))
    st = d.tick(ok(0.5))
    conds = {c.type: c.status for c in st.conditions}
    assert conds["Completed"] == "True" and conds["Promoted"] == "False"


def test_an_unready_candidate_holds_instead_of_getting_more_traffic() -> None:
    d = Driver(spec([{"setWeight": 20}, {"setWeight": 60}, {"setWeight": 100}], progressDeadline="1h"))
    d.tick()
    unready = eng.Observations(guardrails={"errors": Result("value", 0.0)}, candidate_ready=False)
    for _ in range(5):
        st = d.tick(unready)
    assert st.weight == 20 and "no ready endpoints" in st.message
    ready = eng.Observations(guardrails={"errors": Result("value", 0.0)}, candidate_ready=True)
    assert d.tick(ready).weight == 60


def test_deletion_moves_traffic_only_while_in_progress_or_when_asked() -> None:
    d = Driver(spec([{"setWeight": 40}, {"pause": {}}]))
    d.tick()
    assert eng.deletion_weights(d.spec, d.status) == {"v1": 100, "v2": 0}
    d.spec = _with(d.spec, revertOnDeletion=False)
    d.tick(ok(0.5))
    d.tick(ok(0.5))  # failureLimit 2: RolledBack
    assert d.status.phase == "RolledBack" and eng.deletion_weights(d.spec, d.status) is None
    d.spec = _with(d.spec, revertOnDeletion=True)
    assert eng.deletion_weights(d.spec, d.status) == {"v1": 100, "v2": 0}
    # After promotion the promoted candidate is the serving stable: deleting moves nothing.
    d2 = Driver(spec([{"setWeight": 50}], revertOnDeletion=True))
    assert run_until_done(d2).phase == "Promoted"
    assert eng.deletion_weights(d2.spec, d2.status) is None


def _cmp_spec(**extra: Any) -> ModelRolloutSpec:
    comparison = {"name": "fb", "successes": "s", "trials": "t", "test": "nonInferiority", "margin": 0.05}
    return spec([{"setWeight": 50}], analysis={"comparisons": [comparison]}, **extra)


def _cmp_obs(stable: tuple[float, float], cand: tuple[float, float]) -> eng.Observations:
    from model_rollouts.analysis.stats import ProportionData

    data = eng.ComparisonData(stable=ProportionData(*stable), candidate=ProportionData(*cand))
    return eng.Observations(guardrails={"errors": Result("value", 0.0)}, comparisons={"fb": data})


def test_an_inconclusive_comparison_holds_at_the_deadline_by_default() -> None:
    d = Driver(_cmp_spec(progressDeadline="1m"))
    d.tick()
    for _ in range(12):
        st = d.tick(_cmp_obs((30, 50), (30, 50)))  # far too little data to show anything
    assert st.phase == "Progressing" and st.weight == 50
    prog = {c.type: c for c in st.conditions}["Progressing"]
    assert prog.status == "False" and prog.reason == "Inconclusive" and d.events.count("Inconclusive") == 1


def test_an_inconclusive_comparison_can_be_set_to_roll_back_at_the_deadline() -> None:
    d = Driver(_cmp_spec(progressDeadline="1m"))
    analysis = {**d.spec.analysis.model_dump(exclude_none=True), "onInconclusive": "rollback"}
    d.spec = _with(d.spec, analysis=analysis)
    d.tick()
    for _ in range(12):
        st = d.tick(_cmp_obs((30, 50), (30, 50)))
    assert st.phase == "RolledBack" and st.history[-1].reason == "Inconclusive"


def test_a_passed_comparison_stays_passed_for_the_gate() -> None:
    d = Driver(_cmp_spec(maxWeightStep=25))
    d.tick()
    assert d.status.weight == 25
    st = d.tick(_cmp_obs((60000, 100000), (60200, 100000)))  # shown non-inferior
    assert "fb" in st.passedComparisons and st.weight == 50
    weak = _cmp_obs((30000, 50000), (27600, 50000))  # a later epoch near the margin: combined, undecided
    assert d.tick(weak).weight == 75
    assert d.tick(weak).weight == 100  # the gate before the final increase uses the latched pass
    assert d.tick(weak).phase == "Promoted"
