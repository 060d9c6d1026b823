"""A rollout's plan before ramping: from the first analysis, will each required comparison decide in time?

After each analysis with both arms measured, every required comparison that has not decided gets an
estimate (:mod:`model_rollouts.analysis.plan`) in ``status.plan``, and the condition ``Planned`` sums
them up:

- ``True``/``DecisionExpected``: every undecided required comparison is expected to decide in time;
- ``False``/``DecisionUnlikely``: at least one is not (a Warning Event when it becomes so, once);
- ``Unknown``/``Estimating``: a rate or a sample need cannot be told yet;
- ``True``/``Decided``: every required comparison has passed.

A plan promises a pass with a stated probability, not a coin flip
(:func:`model_rollouts.analysis.plan.decisive_samples`). A non-inferiority comparison is planned for a
candidate equal to stable (:func:`model_rollouts.analysis.plan.equal_candidate`) at the design's power,
not at the current estimate: early estimates are noisy, and a lucky one would promise a decision that
a healthy candidate will not get in time. A superiority comparison is planned from the estimate so far
with its own uncertainty (95%): an estimate within noise of stable plans no pass.

``Planned`` is its own condition, not a reason on ``Progressing``: the step runner rewrites
``Progressing`` every tick from the phase, and the rollout does keep progressing while its plan is
unlikely to end in a decision; ``Planned=False`` is a forecast, not a state of the steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from typing import Protocol

from model_rollouts.analysis import plan, segments, sequential, stats
from model_rollouts.api.common import ArmCounts, get_condition, parse_duration, set_condition
from model_rollouts.api.rollout import (
    Comparison,
    DecisionPlan,
    ModelRolloutSpec,
    ModelRolloutStatus,
    WeightEstimate,
)
from model_rollouts.engine import steps
from model_rollouts.engine.actions import Event

CONDITION = "Planned"
Data = stats.ProportionData | stats.MeanData
UNLIKELY = "DecisionUnlikely"


class Counts(Protocol):
    """One comparison's counts in the current epoch (engine.rollout.ComparisonData)."""

    @property
    def stable(self) -> Data | None: ...
    @property
    def candidate(self) -> Data | None: ...


def _n(d: Data | None) -> float:
    if d is None:
        return 0.0
    return d.trials if isinstance(d, stats.ProportionData) else d.count


def path(spec: ModelRolloutSpec, s: ModelRolloutStatus, now: datetime) -> tuple[list[plan.Segment], int]:
    """The planned stretches before the promotion gate, and the weight held there.

    A timed pause or analysis step is its (remaining) duration at the weight then in force; a setWeight
    below 100 is one analysis interval at its weight (a weight waits for one analysis before the next
    step); a manual pause counts nothing (it does not count towards progressDeadline either).
    """
    interval = parse_duration(spec.analysis.interval)
    weight, out = s.weight, []
    for i in range(s.currentStep, len(spec.steps)):
        step = spec.steps[i]
        if step.setWeight is not None:
            if step.setWeight >= 100:
                break
            weight = step.setWeight
            out.append(plan.Segment(weight, interval))
            continue
        timed = step.pause or step.analysis
        d = timed.duration if timed is not None else None
        if d is None:
            continue
        spent = (now - s.stepStartedAt).total_seconds() if i == s.currentStep and s.stepStartedAt else 0.0
        out.append(plan.Segment(weight, max(0.0, parse_duration(d) - spent)))
    return out, weight


def _data(c: Comparison, arm: ArmCounts) -> Data:
    if c.type == "proportion":
        return stats.ProportionData(min(arm.total, arm.n), arm.n)
    return stats.MeanData(arm.n, arm.total, arm.squares) if arm.n > 0 else stats.MeanData(0.0, 0.0, 0.0)


def _need(
    spec: ModelRolloutSpec,
    s: ModelRolloutStatus,
    c: Comparison,
    counts: Counts,
    comparisons: Mapping[str, Counts],
) -> float | None:
    """More samples until a healthy candidate passes with ``plan.DECISION_PROBABILITY`` (all epochs).

    nonInferiority: a candidate equal to stable on the same samples; superiority: the estimate so far,
    with its own uncertainty (an estimate within noise of stable plans no pass).
    """
    stable, candidate = counts.stable, counts.candidate
    assert stable is not None and candidate is not None
    strata = [(_data(c, e.stable), _data(c, e.candidate)) for e in s.epochs.get(c.name, [])]
    strata.append((stable, candidate))
    non_inferiority = c.test == "nonInferiority"
    test = sequential.SequentialSpec(
        alpha=spec.analysis.alpha / max(len(spec.analysis.comparisons), 1),
        better=c.better,
        test=c.test,
        margin=(c.margin or 0.0) if non_inferiority else 0.0,
        allocation=s.weight / 100.0,
    )
    if non_inferiority:
        need = plan.decisive_samples(test, plan.equal_candidate(strata), predictive=False)
        by_segment = _segments_need(s, c, test, comparisons, _n(stable) + _n(candidate))
        return None if need is None or by_segment is None else max(need, by_segment)
    return plan.decisive_samples(test, strata, predictive=True, probability=plan.PREDICTIVE_PROBABILITY)


def _segments_need(
    s: ModelRolloutStatus,
    c: Comparison,
    test: sequential.SequentialSpec,
    comparisons: Mapping[str, Counts],
    pooled_n: float,
) -> float | None:
    """A segmented comparison passes only when every segment does: the largest segment's need, in
    samples of the whole comparison (a segment gets its share of them), each segment at its own
    design (``segments.segment_information_cap``) and power ``DEFAULT_POWER ** (1/k)``. None while a
    segment's counts or share cannot be told yet. With ``tooSmall: ignore`` the pooled plan stands."""
    if c.segments is None or c.segments.tooSmall == "ignore":
        return 0.0
    k = len(c.segments.values)
    cap = segments.segment_information_cap(test.margin, k, test.alpha)
    stratified = stats.compare_means_stratified if c.type == "mean" else stats.compare_proportions_stratified

    def verdict(st: list[plan.Pair]) -> str:
        kw = {"alpha": test.alpha, "better": test.better, "margin": test.margin, "max_information": cap}
        return stratified(st, test="nonInferiority", **kw).verdict  # type: ignore[arg-type]

    worst = 0.0
    for v in c.segments.values:
        key = segments.segment_key(c.name, v)
        d = comparisons.get(key)
        if d is None or d.stable is None or d.candidate is None or not pooled_n > 0:
            return None
        share = (_n(d.stable) + _n(d.candidate)) / pooled_n
        strata = [(_data(c, e.stable), _data(c, e.candidate)) for e in s.epochs.get(key, [])]
        strata = plan.equal_candidate([*strata, (d.stable, d.candidate)])
        need = plan.decisive_samples(
            test, strata, predictive=False, probability=stats.DEFAULT_POWER ** (1.0 / k), verdict=verdict
        )
        if need is None or not share > 0:
            return None
        worst = max(worst, need / share)
    return worst


def _one(
    spec: ModelRolloutSpec,
    s: ModelRolloutStatus,
    name: str,
    comparisons: Mapping[str, Counts],
    now: datetime,
) -> DecisionPlan:
    counts = comparisons.get(name)
    m = next((x for x in s.lastAnalysis if x.kind == "comparison" and x.name == name), None)
    more = (m.details or {}).get("moreSamplesNeeded") if m is not None else None
    c = next(c for c in spec.analysis.comparisons if c.name == name)
    if m is None or m.verdict != "inconclusive":
        more = None  # not measured (no data, an error): no need to plan from
    elif counts and counts.stable and counts.candidate:
        more = _need(spec, s, c, counts, comparisons)
    elapsed = (now - s.epochStartedAt).total_seconds() if s.epochStartedAt else 0.0
    n_stable, n_candidate = (_n(counts.stable), _n(counts.candidate)) if counts else (0.0, 0.0)
    rates = plan.Rates.observed(s.weight, n_stable, n_candidate, elapsed)
    if rates is None or more is None:
        why = (
            f"not measured at this analysis ({m.verdict})"
            if m is not None and m.verdict != "inconclusive"
            else "no samples per second yet"
            if rates is None
            else "no estimate of the samples needed"
        )
        return DecisionPlan(name=name, message=f"comparison {name}: {why}")
    segments, hold = path(spec, s, now)
    held = (now - s.heldSince).total_seconds() if s.heldSince else 0.0
    e = plan.estimate(more, rates, segments, hold, parse_duration(spec.progressDeadline) - held)
    by = " by a candidate equal to stable" if c.test == "nonInferiority" else ""
    at = ", ".join(f"{plan.human(t)} at weight {w}" for w, t in e.at_weights.items())
    finite = math.isfinite(more)
    need = (
        f"about {more:,.0f} more samples needed{by} (for a pass with probability "
        f"{plan.DECISION_PROBABILITY:g})"
        if finite
        else f"no amount of samples is expected to show {c.test}"
        + (" at the estimate so far" if c.test == "superiority" else "")
    )
    text = f"comparison {name}: {need}; at {rates.total:.3g} samples/s (both arms, weight {s.weight})"
    if finite:
        text += f" a decision is expected in ~{plan.human(e.seconds)} ({at})"
    if e.feasible:
        text += f", within the {plan.human(e.budget)} left"
    else:
        text += (
            f", more than the {plan.human(e.budget)} left (remaining steps + progressDeadline "
            f"{spec.progressDeadline}); a larger margin, more traffic or a longer progressDeadline would help"
        )
    return DecisionPlan(
        name=name,
        feasible=e.feasible,
        expectedDecisionSeconds=round(e.seconds, 1) if math.isfinite(e.seconds) else None,
        budgetSeconds=round(e.budget, 1),
        samplesPerSecond=round(rates.total, 4),
        moreSamplesNeeded=round(more, 1) if finite else None,
        atWeights=[
            WeightEstimate(weight=w, seconds=round(t, 1)) for w, t in e.at_weights.items() if math.isfinite(t)
        ],
        message=text,
    )


def update(
    spec: ModelRolloutSpec,
    s: ModelRolloutStatus,
    comparisons: Mapping[str, Counts],
    actions: list[Event],
    now: datetime,
    generation: int,
) -> None:
    """After an analysis: ``status.plan``, the ``Planned`` condition and, when it turns False, an Event."""
    required = [c for c in spec.analysis.comparisons if not c.advisory]
    if not required or not 0 < s.weight < 100:
        return
    verdicts = {m.name: m.verdict for m in s.lastAnalysis if m.kind == "comparison"}
    open_ = [c.name for c in required if c.name not in s.passedComparisons and verdicts.get(c.name) != "pass"]
    s.plan = [_one(spec, s, name, comparisons, now) for name in open_]
    late = [p for p in s.plan if p.feasible is False]
    if not open_:
        status, reason, msg = "True", "Decided", "every required comparison has passed"
    elif late:
        status, reason, msg = "False", UNLIKELY, "; ".join(p.message for p in late)
    elif any(p.feasible is None for p in s.plan):
        status, reason, msg = "Unknown", "Estimating", "; ".join(p.message for p in s.plan)
    else:
        status, reason, msg = "True", "DecisionExpected", "; ".join(p.message for p in s.plan)
    old = get_condition(s.conditions, CONDITION)
    if status == "False" and (old is None or old.status != "False"):
        actions.append(Event("Warning", UNLIKELY, msg))
        steps.record(s, now, UNLIKELY, UNLIKELY, msg)
    s.conditions = set_condition(s.conditions, CONDITION, status, reason, msg, now, generation)  # type: ignore[arg-type]
