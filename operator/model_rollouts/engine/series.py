"""status.series: the last analyses, a small window of the record of every analysis (pure).

Each analysis appends one small point (its time, the weights that followed from it, and each
metric's number: a guardrail's value, a comparison's difference with its interval, each
experiment variant's estimate, Holm-adjusted p-value and P(best), the SRM p-value). The list is a
window bounded twice, oldest points dropped first: at most :data:`SERIES_LIMIT` points and at most
:data:`SERIES_MAX_BYTES` of JSON (the newest point is always kept), so what a LIST of the objects
or a status write carries does not grow with the length of a run. Every point is also archived,
once, when the status write that adds it succeeds (``kube/series_store.py``: ConfigMaps owned by
the object, per revision); the decision report reads the whole record from there. Nothing in the
operator reads the series back: it only explains the decisions after the fact.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import TypeVar

from pydantic import BaseModel

from model_rollouts.api.common import (
    SERIES_LIMIT,
    SERIES_MAX_BYTES,
    Measurement,
    ResourceStatus,
    SeriesValue,
    get_condition,
)
from model_rollouts.api.experiment import (
    ExperimentSeriesPoint,
    ModelExperimentStatus,
    SeriesVariant,
)
from model_rollouts.api.rollout import ModelRolloutStatus, RolloutSeriesPoint

#: Numbers are kept to this many significant digits (plenty for a plot, a third of the bytes).
DIGITS = 5

P = TypeVar("P", bound=BaseModel)


def _r(x: float | None) -> float | None:
    """Rounded to :data:`DIGITS` significant digits; None for a missing or non-finite number."""
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{DIGITS}g}")


def point_bytes(point: BaseModel) -> int:
    """Size of a point as the API server stores it (JSON, without nulls)."""
    return len(point.model_dump_json(exclude_none=True))


def append(series: list[P], point: P) -> None:
    """Append ``point`` and drop the oldest points beyond the count and byte bounds (in place)."""
    series.append(point)
    del series[:-SERIES_LIMIT]
    sizes = [point_bytes(p) for p in series]
    total = sum(sizes)
    drop = 0
    while total > SERIES_MAX_BYTES and drop < len(series) - 1:
        total -= sizes[drop]
        drop += 1
    del series[:drop]


def analysed_now(before: ResourceStatus, after: ResourceStatus, now: datetime, measured: bool) -> bool:
    """Whether the tick that turned ``before`` into ``after`` made an analysis (one series point each)."""
    return measured and after.lastAnalysisTime == now != before.lastAnalysisTime


def _value(m: Measurement) -> SeriesValue:
    d = m.details or {}
    return SeriesValue(
        name=m.name,
        kind=m.kind,
        variant=m.variant,
        verdict=m.verdict,
        value=_r(m.value),
        ciLow=_r(d.get("ciLow")) if m.kind == "comparison" else None,
        ciHigh=_r(d.get("ciHigh")) if m.kind == "comparison" else None,
    )


def rollout_point(s: ModelRolloutStatus, now: datetime) -> RolloutSeriesPoint:
    """The analysis just recorded in ``s`` (its lastAnalysis), with the weight decided on it."""
    return RolloutSeriesPoint(
        time=now,
        weight=s.weight,
        step=s.currentStep,
        phase=s.phase,
        values=[_value(m) for m in s.lastAnalysis if not m.carried],
    )


def experiment_point(s: ModelExperimentStatus, now: datetime) -> ExperimentSeriesPoint:
    """The analysis just recorded in ``s``: each variant's numbers, SRM and the guardrails."""
    compared = {m.variant: m for m in s.lastAnalysis if m.kind == "comparison"}
    variants = []
    for v in s.variants:
        c = compared.get(v.name)
        d = (c.details or {}) if c is not None else {}
        fresh = bool(compared)  # estimates in variant status are this analysis's only if it compared
        variants.append(
            SeriesVariant(
                name=v.name,
                weight=v.weight,
                n=_r(v.n),
                estimate=_r(v.estimate) if fresh else None,
                difference=_r(c.value) if c is not None else None,
                ciLow=_r(d.get("ciLow")),
                ciHigh=_r(d.get("ciHigh")),
                adjustedPValue=_r(d.get("adjustedPValue")),
                probabilityToBeBest=_r(v.probabilityToBeBest) if fresh else None,
                verdict=v.verdict if fresh or v.verdict == "dropped" else None,
            )
        )
    srm = get_condition(s.conditions, "SampleRatioMismatch")
    return ExperimentSeriesPoint(
        time=now,
        phase=s.phase,
        srmPValue=_r(s.srmPValue),
        srm=srm.reason if srm is not None else None,
        variants=variants,
        values=[_value(m) for m in s.lastAnalysis if m.kind == "guardrail"],
    )
