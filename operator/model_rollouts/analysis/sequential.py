"""Judge: two arms compared by the statistics (``stats``), per stratum of constant split.

A rollout compares over its epochs with the stratified sequential test (``method`` None); an
experiment compares cumulative counts with the method its spec names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from model_rollouts.analysis import stats
from model_rollouts.analysis.comparison import with_names
from model_rollouts.analysis.judge import Judge
from model_rollouts.analysis.vocabulary import Finding

Data = stats.ProportionData | stats.MeanData
Strata = Sequence[tuple[Data, Data]]


@dataclass(frozen=True)
class SequentialSpec:
    alpha: float
    better: stats.Better
    test: stats.Test = "superiority"
    margin: float = 0.0
    #: The candidate's share of the two arms' traffic at the split in force (sample estimates).
    allocation: float | None = None
    #: None: the stratified sequential test over the strata; else one stratum with this method.
    method: stats.Method | None = None
    mde: float | None = None
    max_samples: float | None = None
    labels: tuple[str, str] = ("control", "treatment")
    #: The kind's own names for the two arms' numbers, written next to the shared ones.
    names: tuple[str, str] = ("baseline", "candidate")


def compare(spec: SequentialSpec, strata: Strata) -> stats.ComparisonResult:
    """The statistics of the candidate against the baseline (all strata of one type)."""
    proportions = isinstance(strata[-1][0], stats.ProportionData)
    common: dict[str, Any] = {
        "alpha": spec.alpha,
        "better": spec.better,
        "allocation": spec.allocation,
        "labels": spec.labels,
    }
    if spec.method is None:
        stratified = stats.compare_proportions_stratified if proportions else stats.compare_means_stratified
        return stratified(strata, test=spec.test, margin=spec.margin, **common)  # type: ignore[arg-type]
    single = stats.compare_proportions if proportions else stats.compare_means
    extra = {"method": spec.method, "mde": spec.mde, "max_samples": spec.max_samples}
    baseline, candidate = strata[-1]
    return single(baseline, candidate, **extra, **common)  # type: ignore[arg-type]


def numbers(spec: SequentialSpec, r: stats.ComparisonResult) -> dict[str, float]:
    """The result's numbers under the shared keys (and the kind's names); only finite ones (JSON)."""
    shared = {
        "baseline": r.control_estimate,
        "candidate": r.treatment_estimate,
        "baselineN": r.control_n,
        "candidateN": r.treatment_n,
        "difference": r.difference,
        "ciLow": r.ci_low,
        "ciHigh": r.ci_high,
        "pValue": r.p_value,
        "alpha": spec.alpha,
    }
    if r.more_samples_needed is not None:
        shared["moreSamplesNeeded"] = float(r.more_samples_needed)
    out = with_names(shared, spec.names)
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(v)}


def judge(spec: SequentialSpec, strata: Strata) -> Finding:
    r = compare(spec, strata)
    return Finding(
        r.verdict,
        r.reason,
        value=r.difference if math.isfinite(r.difference) else None,
        numbers=numbers(spec, r),
    )


_: Judge[SequentialSpec, Strata] = judge
