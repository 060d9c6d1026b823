"""Plan before ramping: each required comparison's expected time to a decision, from the first analysis."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from model_rollouts.analysis import plan
from model_rollouts.analysis.stats import ProportionData
from model_rollouts.api.common import get_condition
from model_rollouts.api.rollout import ModelRolloutSpec, ModelRolloutStatus
from model_rollouts.engine import rollout as eng

T0 = datetime(2026, 1, 1, tzinfo=UTC)


# -- the estimate (analysis/plan.py) -----------------------------------------------------------------


def test_estimate_at_the_current_weight_is_samples_over_the_observed_rate() -> None:
    rates = plan.Rates.observed(50, n_baseline=500, n_candidate=500, seconds=100)  # 10 samples/s
    assert rates is not None
    e = plan.estimate(2000, rates, [], hold_weight=50, hold_seconds=600)
    assert e.seconds == pytest.approx(200) and e.at_weights == {50: pytest.approx(200)}
    assert e.budget == 600 and e.feasible


def test_estimate_shrinks_as_the_rate_grows() -> None:
    slow = plan.Rates.observed(20, 80, 20, 100)
    fast = plan.Rates.observed(20, 800, 200, 100)
    assert slow is not None and fast is not None
    s = plan.estimate(2000, slow, [], 20, 300)
    f = plan.estimate(2000, fast, [], 20, 300)
    assert f.seconds == pytest.approx(s.seconds / 10)
    assert not s.feasible and f.feasible


def test_the_candidate_rate_scales_with_its_weight() -> None:
    rates = plan.Rates.observed(10, 90, 10, 10)  # 10 samples/s in total, 1/s on the candidate
    assert rates is not None
    e = plan.estimate(1000, rates, [plan.Segment(25, 10), plan.Segment(50, 10)], 50, 10_000)
    # Information grows as w(1-w): 0.09 at 10%, 0.1875 at 25%, 0.25 at 50%.
    assert e.at_weights[10] == pytest.approx(100)
    assert e.at_weights[25] == pytest.approx(100 * 0.09 / 0.1875)
    assert e.at_weights[50] == pytest.approx(100 * 0.09 / 0.25)
    # Along the plan: 10 s at 25% do 10*0.1875/0.09 s worth of work at 10%, 10 s at 50% more, the rest held.
    done = 10 * 0.1875 / 0.09 + 10 * 0.25 / 0.09
    assert e.seconds == pytest.approx(20 + (100 - done) * 0.09 / 0.25)


def test_non_inferiority_is_planned_for_a_candidate_equal_to_stable() -> None:
    from model_rollouts.analysis import sequential

    s = sequential.SequentialSpec(
        alpha=0.05, better="higher", test="nonInferiority", margin=0.01, allocation=0.5
    )
    lucky = [(ProportionData(700, 1000), ProportionData(760, 1000))]  # +0.06: five margins to spare
    equal = [(ProportionData(700, 1000), ProportionData(700, 1000))]
    assert plan.equal_candidate(lucky) == equal
    lucky_need = sequential.compare(s, lucky).more_samples_needed
    equal_need = sequential.compare(s, plan.equal_candidate(lucky)).more_samples_needed
    assert lucky_need is not None and equal_need is not None
    assert equal_need > 5 * lucky_need  # the lucky estimate would promise a decision far too soon


def test_no_rate_without_samples_in_both_arms() -> None:
    assert plan.Rates.observed(50, 0, 10, 60) is None
    assert plan.Rates.observed(50, 10, 10, 0) is None
    assert plan.Rates.observed(100, 10, 10, 60) is None


# -- the rollout (engine) -------------------------------------------------------------------------------


def spec(margin: float, deadline: str = "5m", steps: list[dict[str, Any]] | None = None) -> ModelRolloutSpec:
    return ModelRolloutSpec.model_validate(
        {
            "stable": {"service": "v1"},
            "candidate": {"service": "v2"},
            "trafficRouting": {"gatewayAPI": {"httpRoute": "r"}},
            "steps": steps or [{"setWeight": 50}, {"setWeight": 100}],
            "progressDeadline": deadline,
            "analysis": {
                "interval": "10s",
                "prometheus": {"address": "http://prom:9090"},
                "comparisons": [
                    {"name": "ok", "successes": "s", "trials": "t", "margin": margin, "better": "higher"}
                ],
            },
        }
    )


class Traffic:
    """Drives reconcile once per interval with counts since the epoch started at ``rate`` requests/s."""

    def __init__(self, s: ModelRolloutSpec, rate: float, p: float = 0.9) -> None:
        self.spec, self.status, self.now = s, ModelRolloutStatus(), T0
        self.rate, self.p = rate, p
        self.events: list[tuple[str, str]] = []

    def observe(self) -> eng.Observations:
        t = (self.now - (self.status.epochStartedAt or self.now)).total_seconds()
        w = self.status.weight / 100
        n_s, n_c = round(self.rate * t * (1 - w)), round(self.rate * t * w)
        return eng.Observations(
            comparisons={
                "ok": eng.ComparisonData(
                    ProportionData(round(self.p * n_s), n_s), ProportionData(round(self.p * n_c), n_c)
                )
            }
        )

    def tick(self) -> ModelRolloutStatus:
        obs = self.observe() if eng.needs_measurement(self.spec, self.status, self.now) else None
        d = eng.reconcile(self.spec, self.status, now=self.now, generation=1, observations=obs)
        self.status = d.status
        self.events += [(a.type, a.reason) for a in d.actions]
        self.now += timedelta(seconds=10)
        return self.status


def planned(s: ModelRolloutStatus) -> tuple[str, str] | None:
    c = get_condition(s.conditions, "Planned")
    return None if c is None else (c.status, c.reason)


def test_an_infeasible_plan_says_so_at_the_first_analysis_with_a_number() -> None:
    # Margin 0.001 on a 90% rate at 5 requests/s: hundreds of thousands of samples, days of traffic.
    d = Traffic(spec(margin=0.001, deadline="5m"), rate=5)
    d.tick()  # weight 0 -> 50, the epoch starts
    assert planned(d.status) is None
    d.tick()  # the first analysis
    assert len(d.status.series) == 1
    assert planned(d.status) == ("False", "DecisionUnlikely")
    [p] = d.status.plan
    assert p.name == "ok" and p.feasible is False
    assert p.expectedDecisionSeconds is not None and p.budgetSeconds is not None
    assert p.expectedDecisionSeconds > p.budgetSeconds
    assert p.budgetSeconds <= 300
    assert p.samplesPerSecond == pytest.approx(5, rel=0.05)
    assert [w.weight for w in p.atWeights] == [50]
    assert "more samples needed" in p.message and "progressDeadline 5m" in p.message
    assert ("Warning", "DecisionUnlikely") in d.events
    assert any(h.event == "DecisionUnlikely" for h in d.status.history)


def test_the_warning_event_is_sent_once_not_every_analysis() -> None:
    d = Traffic(spec(margin=0.001, deadline="5m"), rate=5)
    for _ in range(12):
        d.tick()
    assert len(d.status.series) >= 10
    assert planned(d.status) == ("False", "DecisionUnlikely")
    assert d.events.count(("Warning", "DecisionUnlikely")) == 1


def test_a_feasible_plan_says_nothing_alarming() -> None:
    # Margin 0.1 at 200 requests/s: decided within a few analyses.
    d = Traffic(spec(margin=0.1, deadline="5m"), rate=200)
    d.tick()
    d.tick()
    assert planned(d.status) in (("True", "DecisionExpected"), ("True", "Decided"))
    assert all(p.feasible for p in d.status.plan)
    assert ("Warning", "DecisionUnlikely") not in d.events
    for _ in range(20):
        if d.tick().phase == "Promoted":
            break
    assert d.status.phase == "Promoted"
    assert ("Warning", "DecisionUnlikely") not in d.events


def test_the_plan_counts_the_remaining_timed_steps_and_their_weights() -> None:
    steps = [{"setWeight": 10}, {"pause": {"duration": "1h"}}, {"setWeight": 50}, {"setWeight": 100}]
    d = Traffic(spec(margin=0.02, deadline="5m", steps=steps), rate=20)
    d.tick()
    d.tick()
    [p] = d.status.plan
    assert {w.weight for w in p.atWeights} == {10, 50}
    at = {w.weight: w.seconds for w in p.atWeights}
    assert at[50] < at[10]  # more evidence per second at 50% than at 10%
    assert p.budgetSeconds is not None and 3600 < p.budgetSeconds <= 3600 + 10 + 300


def test_the_plugin_shows_an_unlikely_decision() -> None:
    from model_rollouts.api.common import dump
    from model_rollouts.cli import view

    def obj(d: Traffic) -> dict[str, Any]:
        return {"kind": "ModelRollout", "metadata": {"name": "r", "generation": 1},
                "spec": dump(d.spec), "status": dump(d.status)}  # fmt: skip

    late = Traffic(spec(margin=0.001, deadline="5m"), rate=5)
    late.tick()
    late.tick()
    v = view.rollout_view(obj(late), now=late.now)
    [line] = [w for w in v["waitingFor"] if "Planned=False" in w]
    assert "DecisionUnlikely" in line and "more samples needed" in line
    assert v["plan"][0]["feasible"] is False and v["plan"][0]["expectedDecisionSeconds"] > 300
    fine = Traffic(spec(margin=0.1, deadline="5m"), rate=200)
    fine.tick()
    fine.tick()
    assert view.plan_line(obj(fine)) is None


def test_a_new_revision_starts_without_the_old_forecast() -> None:
    d = Traffic(spec(margin=0.001, deadline="5m"), rate=5)
    d.tick()
    d.tick()
    assert planned(d.status) == ("False", "DecisionUnlikely") and d.status.plan
    d.spec = d.spec.model_copy(update={"candidate": d.spec.candidate.model_copy(update={"service": "v3"})})
    d.tick()  # the new revision starts over
    assert planned(d.status) is None and d.status.plan == []


def test_a_comparison_without_data_is_estimating_not_unlikely() -> None:
    d = Traffic(spec(margin=0.001, deadline="5m"), rate=5)
    d.observe = lambda: eng.Observations(  # type: ignore[method-assign]
        comparisons={"ok": eng.ComparisonData(problem=eng.Result("noData", message="no series"))}
    )
    d.tick()
    d.tick()
    assert planned(d.status) == ("Unknown", "Estimating")
    assert "not measured" in d.status.plan[0].message and d.status.plan[0].feasible is None
    assert ("Warning", "DecisionUnlikely") not in d.events


# -- a feasible plan decides: the information planned for (analysis/plan.decisive_samples) ------------


def _ni_test(alpha: float = 0.05) -> Any:
    from model_rollouts.analysis import sequential

    return sequential.SequentialSpec(
        alpha=alpha, better="higher", test="nonInferiority", margin=0.01, allocation=0.5
    )


def _terminal_pass_share(n_per_arm: float, runs: int = 400) -> float:
    """Healthy candidates (equal to stable, rate 0.1) judged once at ``n_per_arm``: the share passing."""
    import numpy as np

    from model_rollouts.analysis import sequential

    rng = np.random.default_rng(5)
    n = round(n_per_arm)
    passed = 0
    for _ in range(runs):
        a, b = rng.binomial(n, 0.1, size=2)
        r = sequential.compare(_ni_test(), [(ProportionData(a, n), ProportionData(b, n))])
        passed += r.verdict == "pass"
    return passed / runs


def test_a_non_inferiority_plan_is_for_the_designs_power_not_a_coin_flip() -> None:
    from model_rollouts.analysis import sequential

    now = [(ProportionData(200, 2000), ProportionData(200, 2000))]
    median = sequential.compare(_ni_test(), now).more_samples_needed  # half-width = margin: ~50% pass
    planned_more = plan.decisive_samples(_ni_test(), now, predictive=False)
    assert median is not None and planned_more > 1.3 * median
    # Judged once at each (the running test looks more often, so it decides at least this often):
    assert _terminal_pass_share(2000 + median / 2) < 0.65
    assert _terminal_pass_share(2000 + planned_more / 2) >= 0.75


def test_a_superiority_estimate_within_noise_plans_no_pass() -> None:
    from model_rollouts.analysis import sequential

    test = sequential.SequentialSpec(alpha=0.05, better="higher", test="superiority", allocation=0.5)
    noise = [(ProportionData(200, 2000), ProportionData(210, 2000))]  # +0.005, se ~0.0095
    clear = [(ProportionData(200, 2000), ProportionData(300, 2000))]  # +0.05: five standard errors
    assert plan.decisive_samples(test, noise, predictive=True) == float("inf")
    assert 0 <= plan.decisive_samples(test, clear, predictive=True) < 20_000


def test_an_equal_candidate_under_a_superiority_test_is_unlikely_to_decide() -> None:
    s = spec(margin=0.05, deadline="30m")
    c = s.analysis.comparisons[0].model_copy(update={"test": "superiority", "margin": None})
    s = s.model_copy(update={"analysis": s.analysis.model_copy(update={"comparisons": [c]})})
    d = Traffic(s, rate=50)
    d.tick()
    d.tick()
    assert planned(d.status) == ("False", "DecisionUnlikely")
    [p] = d.status.plan
    assert p.moreSamplesNeeded is None and p.expectedDecisionSeconds is None
    assert "no amount of samples" in p.message


def test_a_segmented_comparison_is_planned_for_its_slowest_segment() -> None:
    from tests.unit.test_segments_engine import _driver, _obs

    equal = {r: (0.5, 0.5) for r in ("north", "south", "east", "west")}
    plans = {}
    for tooSmall in ("hold", "ignore"):  # ignore: a segment never blocks the pass, the pooled plan stands
        d = _driver(
            segments={"label": "region", "values": list(equal), "minSamples": 100, "tooSmall": tooSmall}
        )
        d.tick()  # to 50%
        d.tick(_obs(equal, 40))
        [plans[tooSmall]] = d.status.plan
    segmented, pooled = plans["hold"], plans["ignore"]
    assert segmented.moreSamplesNeeded is not None and pooled.moreSamplesNeeded is not None
    # Each segment has a quarter of the samples and must pass on its own at power 0.8^(1/4).
    assert segmented.moreSamplesNeeded > 4 * pooled.moreSamplesNeeded
