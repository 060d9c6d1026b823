"""The planning benchmark (tests/bench/bench_plan.py) drives the real engine and reads its plan."""

from __future__ import annotations

from tests.bench import bench_plan as b


def test_ample_traffic_is_planned_feasible_and_a_healthy_candidate_is_promoted() -> None:
    r = b.run_one(("proportion_nonInferiority", 1, True), requests=40_000)
    assert r.feasible is True and r.outcome == "Promoted"


def test_scarce_traffic_is_planned_infeasible_and_ends_undecided() -> None:
    r = b.run_one(("mean_nonInferiority", 2, True), requests=100)
    assert r.feasible is False and r.outcome == "Inconclusive"
    assert r.expected is None or (r.budget is not None and r.expected > r.budget)


def test_a_bad_candidate_is_rolled_back_on_evidence_at_ample_traffic() -> None:
    r = b.run_one(("proportion_nonInferiority", 3, False), requests=40_000)
    assert r.outcome == "RolledBack"


def test_the_summary_counts_undecided_feasible_plans_and_bad_candidates_left_high() -> None:
    ok = b.Run(1000, True, "Promoted", 50, 100.0, 1800.0)
    late = b.Run(1000, True, "Inconclusive", 50, 100.0, 1800.0)
    held = b.Run(1000, False, "Inconclusive", 50, None, 1800.0)
    m = b.summarize([ok, ok, ok, late, held], [held, b.Run(1, True, "RolledBack", 10, 1.0, 2.0)])
    assert m["undecided_when_feasible"] == 0.25 and m["undecided_when_infeasible"] == 1.0
    assert m["called_feasible"] == 0.8
    assert m["bad_high_weight_at_end"] == 0.5 and m["bad_high_weight_at_end_when_feasible"] == 0.0
