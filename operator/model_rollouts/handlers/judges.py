"""Measuring the model judges (prediction shift, calibration) for either kind: one vector query per
judge and arm, the baseline's (a rollout's stable, an experiment's control) first and once."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Protocol

from model_rollouts.analysis import calibration, model_judges
from model_rollouts.api.calibration import Calibration
from model_rollouts.api.shift import PredictionShift
from model_rollouts.metrics.provider import MetricProvider, Result, Vector, redact, render

#: Outcome label values read as a positive / a negative label.
POSITIVE_OUTCOMES = ("positive", "true", "1")
NEGATIVE_OUTCOMES = ("negative", "false", "0")
#: The ``outcome`` value the score sums are given in the calibration judge's one query.
SCORE_SUM = "scoreSum"


class HasJudges(Protocol):
    @property
    def predictionShift(self) -> Sequence[PredictionShift]: ...

    @property
    def calibration(self) -> Sequence[Calibration]: ...


def judge_queries(analysis: HasJudges) -> list[tuple[str, str | None]]:
    """(field, query) of every model judge's query, for the template checks."""
    out: list[tuple[str, str | None]] = [
        (f"spec.analysis.predictionShift[{i}].buckets", p.buckets)
        for i, p in enumerate(analysis.predictionShift)
    ]
    for i, k in enumerate(analysis.calibration):
        out += [(f"spec.analysis.calibration[{i}].{f}", getattr(k, f)) for f in ("outcomes", "scoreSums")]
    return out


def measure_judges(
    analysis: HasJudges,
    provider: MetricProvider,
    baseline: dict[str, str],
    candidates: Mapping[str, dict[str, str]],
    baseline_name: str = "stable",
) -> dict[str, dict[str, model_judges.JudgeData]]:
    """Per candidate (by name), every model judge's observation against the baseline, from the
    placeholders of each arm. A baseline that cannot be measured is every candidate's problem, and
    the candidates are then not asked."""
    out: dict[str, dict[str, model_judges.JudgeData]] = {name: {} for name in candidates}
    reads: list[tuple[str, Callable[[dict[str, str]], object]]] = [
        (model_judges.key("predictionShift", p.name), partial(_buckets, provider, p.buckets))
        for p in analysis.predictionShift
    ]
    reads += [
        (model_judges.key("calibration", c.name), partial(_bins, provider, c)) for c in analysis.calibration
    ]
    for key, read in reads:
        base = read(baseline)
        for name, values in candidates.items():
            if isinstance(base, Result):
                problem = Result(base.outcome, message=f"{baseline_name} {base.message}")
                out[name][key] = model_judges.JudgeData(problem=problem)
                continue
            x = read(values)
            if isinstance(x, Result):
                out[name][key] = model_judges.JudgeData(
                    problem=Result(x.outcome, message=f"{name} {x.message}")
                )
            else:
                out[name][key] = model_judges.JudgeData(baseline=base, candidate=x)  # type: ignore[arg-type]
    return out


def _buckets(provider: MetricProvider, template: str, values: dict[str, str]) -> dict[str, float] | Result:
    """One arm's cumulative histogram buckets by ``le``."""
    v = provider.query_vector(render(template, values), ("le",))
    return {le: x for (le,), x in v.series.items()} if v.ok else v.problem()


def _bins(
    provider: MetricProvider, c: Calibration, values: dict[str, str]
) -> calibration.CalibrationBins | Result:
    """One arm's calibration bins: outcomes by (bin, outcome) and, with scoreSums, the score sums by bin
    in the same query (``or``, as outcome="scoreSum")."""
    q = render(c.outcomes, values)
    if c.scoreSums:
        sums = render(c.scoreSums, values)
        q = f'(\n{q}\n) or label_replace((\n{sums}\n), "outcome", "{SCORE_SUM}", "", "")'
    return to_bins(provider.query_vector(q, ("bin", "outcome")), c.scoreSums is not None)


def to_bins(v: Vector, with_sums: bool) -> calibration.CalibrationBins | Result:
    """A calibration answer as bins; a problem (never a pass) when it cannot be read as one."""
    if not v.ok:
        return v.problem()
    into: dict[str, dict[str, float]] = {"positive": {}, "negative": {}, SCORE_SUM: {}}
    kinds = {**dict.fromkeys(POSITIVE_OUTCOMES, "positive"), **dict.fromkeys(NEGATIVE_OUTCOMES, "negative")}
    kinds[SCORE_SUM.lower()] = SCORE_SUM
    for (b, outcome), x in v.series.items():
        kind = kinds.get(outcome.lower())
        if kind is None:
            return Result("error", message=f"outcome {redact(outcome)} is neither positive nor negative")
        into[kind][b] = into[kind].get(b, 0.0) + x
    if not into["positive"] and not into["negative"]:
        return Result("noData", message="no labelled predictions")
    try:
        return calibration.calibration_bins(
            into["positive"], into["negative"], into[SCORE_SUM] if with_sums else None
        )
    except ValueError as e:
        return Result("error", message=f"bad calibration bins: {redact(str(e))}")
