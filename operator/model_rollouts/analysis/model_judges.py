"""The model judges of one analysis: prediction shift (:mod:`.shift`) and calibration (:mod:`.calibration`).

Pure: from both arms' observations (measured by the handler) to one :class:`Measurement` per judge
and judged arm: a rollout's candidate against its stable, or each experiment variant against the
control (``variant``; each keeps its own look count).

- Each judge runs at ``alpha / J`` (J: the number of model judges of the object; Bonferroni, apart from
  the comparisons' family) and spends it over looks (``alpha / (k (k + 1))`` at look k), so it may be
  watched at every analysis. The look count lives in status, in the judge's last measurement
  (``details.looks``); a look is counted only when both arms had ``minSamples`` (nothing was tested
  before). A new revision starts from an empty ``lastAnalysis``, so from look 1.
- An observation that could not be made (``problem``) becomes a ``noData``/``nan``/``error``
  measurement: never a pass; ``analysis.assess`` holds on it like on any other.
- Where the arms are not measured (weight 100: the stable gets no traffic), the last measurement of
  each judge is carried (``carried``) and gates nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from model_rollouts.analysis import calibration, shift
from model_rollouts.analysis.judge import Arms
from model_rollouts.analysis.vocabulary import Finding, Result, Verdict, measurement
from model_rollouts.api.calibration import Calibration
from model_rollouts.api.common import Measurement, MeasurementKind
from model_rollouts.api.shift import PredictionShift

#: The measurement kinds of the model judges, and what each is called in a message.
KINDS: dict[MeasurementKind, str] = {
    "predictionShift": "prediction-shift judge",
    "calibration": "calibration judge",
}
#: The reason a rollout ends with when a model judge fails.
REASONS: dict[MeasurementKind, str] = {
    "predictionShift": "PredictionShifted",
    "calibration": "CalibrationWorse",
}


@dataclass(frozen=True)
class JudgeData:
    """One model judge's observation: both arms' (histogram buckets or calibration bins), or the problem."""

    baseline: shift.Buckets | calibration.CalibrationBins | None = None
    candidate: shift.Buckets | calibration.CalibrationBins | None = None
    problem: Result | None = None


def key(kind: MeasurementKind, name: str) -> str:
    """Where a judge's observation is kept in the observations (names are unique per kind)."""
    return f"{kind}/{name}"


def measurements(
    shifts: Sequence[PredictionShift],
    calibrations: Sequence[Calibration],
    alpha: float,
    data: Mapping[str, JudgeData] | None,
    previous: Sequence[Measurement],
    variant: str = "candidate",
) -> list[Measurement]:
    """This analysis's measurement of every model judge of ``variant`` (a rollout's candidate, an
    experiment's variant); ``data`` None: not measured (carry the last)."""
    last: dict[tuple[str, str], Measurement] = {
        (m.kind, m.name): m for m in previous if m.kind in KINDS and (m.variant or "candidate") == variant
    }
    if data is None:
        return [
            last[(kind, s.name)].model_copy(update={"carried": True})
            for kind, specs in (("predictionShift", shifts), ("calibration", calibrations))
            for s in specs
            if (kind, s.name) in last
        ]
    each = alpha / max(1, len(shifts) + len(calibrations))
    out = []
    for s in shifts:
        out.append(_judged("predictionShift", s, s.minSamples, each, data, last, variant))
    for c in calibrations:
        out.append(_judged("calibration", c, c.minSamples, each, data, last, variant))
    return out


def _judged(
    kind: MeasurementKind,
    spec: PredictionShift | Calibration,
    min_samples: int,
    alpha: float,
    data: Mapping[str, JudgeData],
    last: Mapping[tuple[str, str], Measurement],
    variant: str,
) -> Measurement:
    prev = last.get((kind, spec.name))
    looks = int((prev.details or {}).get("looks", 0)) if prev is not None else 0
    d = data.get(key(kind, spec.name))
    if d is None or d.problem is not None:
        problem = (
            d.problem if d is not None and d.problem is not None else Result("error", message="not measured")
        )
        verdict: Verdict = "error" if problem.outcome == "error" else "noData"
        f = Finding(verdict, f"{spec.name}: {problem.message or problem.outcome}", problem.outcome)
    else:
        f = _finding(kind, spec, alpha, looks + 1, d)
    tested = f.verdict in ("pass", "fail") or (
        f.verdict == "inconclusive"
        and min(f.numbers.get("baselineN", 0.0), f.numbers.get("candidateN", 0.0)) >= min_samples
    )
    m = measurement(f, spec.name, kind, variant)
    details = {**(m.details or {}), "looks": float(looks + (1 if tested else 0))}
    # Named as a judge (and, in an experiment, with its variant) wherever it is quoted.
    text = f"{KINDS[kind]} {m.message}" if variant == "candidate" else f"{variant}: {KINDS[kind]} {m.message}"
    return m.model_copy(update={"details": details, "message": text})


def _finding(
    kind: MeasurementKind, spec: PredictionShift | Calibration, alpha: float, look: int, d: JudgeData
) -> Finding:
    if isinstance(spec, PredictionShift):
        arms = Arms[shift.Buckets](_buckets(d.baseline), _buckets(d.candidate))
        return shift.judge(shift.ShiftSpec(spec, alpha=alpha, look=look), arms)
    bins = Arms[calibration.CalibrationBins](_bins(d.baseline), _bins(d.candidate))
    return calibration.judge(calibration.CalibrationSpec(spec, alpha=alpha, look=look), bins)


def _buckets(x: object) -> shift.Buckets | None:
    return x if isinstance(x, Mapping) else None


def _bins(x: object) -> calibration.CalibrationBins | None:
    return x if isinstance(x, calibration.CalibrationBins) else None


def ended(m: Measurement) -> tuple[str, str]:
    """(reason, message) of a rollout ended by a failing model judge (its message names the judge)."""
    return REASONS[m.kind], m.message
