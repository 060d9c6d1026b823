"""Calibration: expected calibration error (ECE) per arm, candidate against stable. Pure: no I/O.

Input per arm: counters by predicted-probability bin (upper bound) and outcome, e.g.
``sum by (bin, outcome) (increase(model_calibration_outcomes_total{...}[w]))``, and optionally the sum
of the predicted probabilities per bin (the bin's mean prediction; without it, the bin's midpoint).

ECE = sum_b (n_b / N) |acc_b - conf_b| with acc_b the observed rate of positive outcomes in bin b and
conf_b its mean predicted probability. The plug-in ECE is biased upwards by noise (a perfectly
calibrated model with 50 samples per bin shows an ECE near 0.05), and more so in the smaller arm, which
would make a calibrated canary look worse than its stable. The judge therefore compares a
bias-reduced ECE: per bin sqrt(max(0, (acc_b - conf_b)^2 - v_b)) with v_b = acc_b (1 - acc_b) / n_b
the sampling variance of acc_b (0 when the gap is within noise, the gap itself when it is large). Its
standard error is sqrt(sum_b (n_b / N)^2 v_b) per arm.

Verdict at look ``k`` (alpha / (k (k + 1)) spent per look, as for the shift judge, so it holds however
long it is watched), with D = candidate ECE - stable ECE and its two-sided interval at that alpha:

* **fail** when the interval lies above 0 (the candidate is less calibrated) AND D >= ``margin``;
* **pass** when the interval lies below ``margin``;
* otherwise, or while either arm has fewer than ``min_samples`` labelled predictions, inconclusive.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import stats as sps

from model_rollouts.analysis import stats
from model_rollouts.analysis.judge import Arms, Judge
from model_rollouts.analysis.shift import look_alpha
from model_rollouts.analysis.vocabulary import Finding
from model_rollouts.api.calibration import Calibration

DEFAULT_MARGIN = 0.05
DEFAULT_MIN_SAMPLES = 500

Counts = Mapping[float, float] | Mapping[str, float]


@dataclass(frozen=True)
class CalibrationBins:
    """Per-bin counts of one arm: upper bounds (ascending, within (0, 1]), positives and totals, and
    optionally each bin's sum of predicted probabilities."""

    upper: tuple[float, ...]
    positives: tuple[float, ...]
    totals: tuple[float, ...]
    score_sums: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        k = len(self.upper)
        if k == 0 or len(self.positives) != k or len(self.totals) != k:
            raise ValueError("upper, positives and totals must be non-empty and of the same length")
        if self.score_sums is not None and len(self.score_sums) != k:
            raise ValueError("score_sums must have one value per bin")
        if list(self.upper) != sorted(self.upper) or self.upper[0] <= 0 or self.upper[-1] > 1:
            raise ValueError("bin upper bounds must be ascending within (0, 1]")
        for p, n in zip(self.positives, self.totals, strict=True):
            if not (math.isfinite(p) and math.isfinite(n)) or p < 0 or n < 0 or p > n + 1e-9:
                raise ValueError(f"bad bin counts: positives {p} of {n}")

    @property
    def n(self) -> float:
        return float(sum(self.totals))

    def confidence(self) -> npt.NDArray[np.float64]:
        """Each bin's mean predicted probability (its midpoint without score sums)."""
        tot = np.asarray(self.totals, dtype=np.float64)
        lower = np.concatenate([[0.0], np.asarray(self.upper[:-1], dtype=np.float64)])
        mid = (lower + np.asarray(self.upper, dtype=np.float64)) / 2
        if self.score_sums is None:
            return mid
        sums = np.asarray(self.score_sums, dtype=np.float64)
        return np.where(tot > 0, sums / np.maximum(tot, 1e-300), mid)


def _key(k: float | str) -> float:
    return float(k)


def calibration_bins(
    positives: Counts, negatives: Counts, score_sums: Counts | None = None
) -> CalibrationBins:
    """Build one arm's bins from counters keyed by the bin's upper bound (a number or its text)."""
    keys = sorted({_key(k) for k in positives} | {_key(k) for k in negatives})
    pos = {_key(k): float(v) for k, v in positives.items()}
    neg = {_key(k): float(v) for k, v in negatives.items()}
    sums = None if score_sums is None else {_key(k): float(v) for k, v in score_sums.items()}
    return CalibrationBins(
        upper=tuple(keys),
        positives=tuple(max(0.0, pos.get(k, 0.0)) for k in keys),
        totals=tuple(max(0.0, pos.get(k, 0.0)) + max(0.0, neg.get(k, 0.0)) for k in keys),
        score_sums=None if sums is None else tuple(sums.get(k, 0.0) for k in keys),
    )


def _per_bin(bins: CalibrationBins) -> tuple[npt.NDArray[np.float64], ...]:
    tot = np.asarray(bins.totals, dtype=np.float64)
    keep = tot > 0
    n = tot[keep]
    acc = np.asarray(bins.positives, dtype=np.float64)[keep] / n
    gap = acc - bins.confidence()[keep]
    # The sampling variance of acc_b; a rate of exactly 0 or 1 uses (s + 1/2) / (n + 1).
    q = np.where((acc > 0) & (acc < 1), acc, 0.5 / (n + 1))
    var = q * (1 - q) / n
    w = n / n.sum() if n.size else n
    return w, gap, var


def ece(bins: CalibrationBins) -> float:
    """The plug-in expected calibration error (0 without data)."""
    w, gap, _ = _per_bin(bins)
    return float(np.sum(w * np.abs(gap))) if w.size else 0.0


def ece_debiased(bins: CalibrationBins) -> tuple[float, float]:
    """(bias-reduced ECE, its standard error); see the module docstring."""
    w, gap, var = _per_bin(bins)
    if not w.size:
        return 0.0, math.inf
    value = float(np.sum(w * np.sqrt(np.maximum(0.0, gap**2 - var))))
    return value, float(math.sqrt(np.sum(w**2 * var)))


@dataclass(frozen=True)
class CalibrationResult:
    verdict: stats.Verdict
    ece_baseline: float
    ece_candidate: float
    #: Bias-reduced ECE difference candidate - baseline, and its interval at this look's alpha.
    difference: float
    ci_low: float
    ci_high: float
    n_baseline: float
    n_candidate: float
    look_alpha: float
    reason: str


def judge_calibration(
    baseline: CalibrationBins,
    candidate: CalibrationBins,
    *,
    margin: float = DEFAULT_MARGIN,
    alpha: float = 0.05,
    min_samples: float = DEFAULT_MIN_SAMPLES,
    look: int = 1,
) -> CalibrationResult:
    """Is the candidate's calibration worse than the stable's by ``margin`` or more? See the docstring."""
    if not margin > 0 or not math.isfinite(margin):
        raise ValueError(f"margin must be > 0, got {margin}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    a_k = look_alpha(alpha, look)
    eb, sb = ece_debiased(baseline)
    ec, sc = ece_debiased(candidate)
    diff = ec - eb
    half = float(sps.norm.isf(a_k / 2)) * math.sqrt(sb**2 + sc**2)
    lo, hi = diff - half, diff + half
    n_b, n_c = baseline.n, candidate.n

    def result(verdict: stats.Verdict, why: str) -> CalibrationResult:
        text = (
            f"ECE candidate {ece(candidate):.4g} vs stable {ece(baseline):.4g} (bias-reduced "
            f"{ec:.4g} vs {eb:.4g}, diff {diff:+.4g}, interval [{lo:+.4g}, {hi:+.4g}] at alpha {a_k:.3g}, "
            f"margin {margin:g}; n stable={n_b:g}, candidate={n_c:g}): {why}"
        )
        return CalibrationResult(verdict, ece(baseline), ece(candidate), diff, lo, hi, n_b, n_c, a_k, text)

    if min(n_b, n_c) < min_samples:
        return result("inconclusive", f"not enough labelled predictions yet (each arm needs {min_samples:g})")
    if lo > 0 and diff >= margin:
        return result("fail", "the candidate is less calibrated than the stable")
    if hi < margin:
        return result("pass", f"the candidate's calibration is within {margin:g} of the stable's")
    return result("inconclusive", "not enough evidence yet")


@dataclass(frozen=True)
class CalibrationSpec:
    """The judge's spec: the user's ``Calibration`` with the analysis's alpha and the look number."""

    spec: Calibration
    alpha: float = 0.05
    look: int = 1


def judge(s: CalibrationSpec, arms: Arms[CalibrationBins]) -> Finding:
    """The calibration judge: :func:`judge_calibration` on the two arms' bins (noData if one is missing)."""
    name, thr = s.spec.name, f"ECE difference < {s.spec.margin:g}"
    for role, b in (("stable", arms.baseline), ("candidate", arms.candidate)):
        if b is None:
            return Finding("noData", f"{name}: no calibration counts for the {role}", "noData", threshold=thr)
    assert arms.baseline is not None and arms.candidate is not None
    r = judge_calibration(
        arms.baseline,
        arms.candidate,
        margin=s.spec.margin,
        alpha=s.alpha,
        min_samples=s.spec.minSamples,
        look=s.look,
    )
    numbers = {
        "eceBaseline": r.ece_baseline,
        "eceCandidate": r.ece_candidate,
        "difference": r.difference,
        "ciLow": r.ci_low,
        "ciHigh": r.ci_high,
        "baselineN": r.n_baseline,
        "candidateN": r.n_candidate,
        "alpha": r.look_alpha,
    }
    finite = {k: v for k, v in numbers.items() if math.isfinite(v)}
    value = r.difference if math.isfinite(r.difference) else None
    return Finding(r.verdict, f"{name}: {r.reason}", value=value, threshold=thr, numbers=finite)


_: Judge[CalibrationSpec, Arms[CalibrationBins]] = judge
