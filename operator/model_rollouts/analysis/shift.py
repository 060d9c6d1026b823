"""Prediction shift: the candidate's score distribution against the stable's. Pure: no I/O.

Input: the two arms' Prometheus histogram buckets (cumulative counts by upper bound ``le``, ``+Inf``
included), e.g. ``sum by (le) (increase(model_prediction_score_bucket{...}[w]))``. They become per-bin
counts on the bucket bounds both arms share (a cumulative count at a shared bound is exact, so arms
with different bucket layouts are compared on their common bounds). Adjacent bins are merged until
each holds at least :data:`MIN_BIN_COUNT` of the pooled counts, so the chi-square approximation holds.

Two numbers describe the shift:

* the population stability index PSI = sum_i (c_i - b_i) ln(c_i / b_i) over the bins' shares (a
  pseudo-count of 0.5 keeps empty bins finite); 0.1 is a common "moderate shift", 0.25 "major";
* Pearson's chi-square test of homogeneity on the 2 x K table of counts (a two-sample test).

The verdict, at look ``k`` of a monitored sequence (each look spends alpha / (k (k + 1)) of alpha, a
union bound over looks that sums to alpha, so the guarantees hold however long the judge is watched):

* **fail** (shifted) when the chi-square p-value is at most the look's alpha AND the PSI, less its
  small-sample bias (K - 1)(1/n_b + 1/n_c), is at least ``max_psi``: a shift both real and material.
  An unshifted candidate is stopped with probability at most alpha over all looks.
* **pass** when the data show a shift smaller than ``max_psi``: the chi-square statistic is below the
  look's alpha-quantile of the noncentral chi-square with noncentrality ``max_psi`` / (1/n_b + 1/n_c)
  (the statistic's law for a shift of that size, PSI being close to the chi-square divergence for
  moderate shifts). A candidate shifted by more than ``max_psi`` passes with probability at most about
  alpha (measured in ``make bench-stats``, scenario ``prediction_shift``).
* otherwise, or while either arm has fewer than ``min_samples`` scores, inconclusive.
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
from model_rollouts.analysis.vocabulary import Finding
from model_rollouts.api.shift import PredictionShift

#: Pooled count each (merged) bin must have for the chi-square approximation.
MIN_BIN_COUNT = 5
DEFAULT_MAX_PSI = 0.1
DEFAULT_MIN_SAMPLES = 500
PSI_PSEUDO_COUNT = 0.5

Buckets = Mapping[float, float] | Mapping[str, float]


@dataclass(frozen=True)
class ShiftResult:
    verdict: stats.Verdict
    psi: float
    #: PSI less its small-sample bias (K - 1)(1/n_b + 1/n_c), floored at 0.
    psi_debiased: float
    chi2: float
    p_value: float
    bins: int
    n_baseline: float
    n_candidate: float
    #: The alpha this look spent (alpha / (k (k + 1))).
    look_alpha: float
    reason: str


def _le(key: float | str) -> float:
    if isinstance(key, str):
        k = key.strip()
        return math.inf if k in ("+Inf", "Inf", "inf", "+inf") else float(k)
    return float(key)


def cumulative(buckets: Buckets) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(upper bounds, cumulative counts), sorted, validated; ``+Inf`` must be present."""
    if not buckets:
        raise ValueError("buckets must not be empty")
    pairs = sorted((_le(k), float(v)) for k, v in buckets.items())
    les = np.array([p[0] for p in pairs])
    cum = np.array([p[1] for p in pairs])
    if not math.isinf(les[-1]):
        raise ValueError("buckets must include the +Inf bucket")
    if np.any(np.isnan(les)) or not np.all(np.isfinite(cum)) or np.any(cum < 0):
        raise ValueError("bucket counts must be finite and >= 0")
    return les, cum


def bin_counts(
    baseline: Buckets, candidate: Buckets
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(upper bounds, baseline counts, candidate counts) per bin on the bounds both arms share.

    A cumulative count that goes down from one bound to the next (counters scraped at slightly
    different moments) is treated as no increase.
    """
    lb, cb = cumulative(baseline)
    lc, cc = cumulative(candidate)
    common = np.intersect1d(lb, lc)
    b = np.maximum.accumulate(cb[np.searchsorted(lb, common)])
    c = np.maximum.accumulate(cc[np.searchsorted(lc, common)])
    return common, np.diff(b, prepend=0.0), np.diff(c, prepend=0.0)


def merge_sparse(
    b: npt.NDArray[np.float64], c: npt.NDArray[np.float64], min_count: float = MIN_BIN_COUNT
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Merge adjacent bins (left to right, the remainder into the last) to >= ``min_count`` pooled."""
    out_b: list[float] = []
    out_c: list[float] = []
    acc_b = acc_c = 0.0
    for x, y in zip(b, c, strict=True):
        acc_b, acc_c = acc_b + float(x), acc_c + float(y)
        if acc_b + acc_c >= min_count:
            out_b.append(acc_b)
            out_c.append(acc_c)
            acc_b = acc_c = 0.0
    if acc_b + acc_c > 0:
        if out_b:
            out_b[-1] += acc_b
            out_c[-1] += acc_c
        else:
            out_b.append(acc_b)
            out_c.append(acc_c)
    return np.array(out_b), np.array(out_c)


def psi(b: npt.ArrayLike, c: npt.ArrayLike, pseudo: float = PSI_PSEUDO_COUNT) -> float:
    """Population stability index of the candidate's bin counts ``c`` against the baseline's ``b``."""
    bb = np.asarray(b, dtype=np.float64) + pseudo
    cc = np.asarray(c, dtype=np.float64) + pseudo
    pb, pc = bb / bb.sum(), cc / cc.sum()
    return float(np.sum((pc - pb) * np.log(pc / pb)))


def chi2_homogeneity(b: npt.ArrayLike, c: npt.ArrayLike) -> tuple[float, int]:
    """Pearson's chi-square statistic of the 2 x K table and its degrees of freedom (bins empty in
    both arms dropped)."""
    table = np.vstack([np.asarray(b, dtype=np.float64), np.asarray(c, dtype=np.float64)])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or np.any(table.sum(axis=1) <= 0):
        return 0.0, 0
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    return float(np.sum((table - expected) ** 2 / expected)), table.shape[1] - 1


def look_alpha(alpha: float, look: int) -> float:
    """The share of ``alpha`` spent at look ``look`` (1-based): alpha / (look (look + 1))."""
    if look < 1:
        raise ValueError(f"look must be >= 1, got {look}")
    return alpha / (look * (look + 1))


def judge_shift(
    baseline: Buckets,
    candidate: Buckets,
    *,
    max_psi: float = DEFAULT_MAX_PSI,
    alpha: float = 0.05,
    min_samples: float = DEFAULT_MIN_SAMPLES,
    look: int = 1,
) -> ShiftResult:
    """Judge the candidate's score distribution against the baseline's; see the module docstring."""
    if not max_psi > 0 or not math.isfinite(max_psi):
        raise ValueError(f"max_psi must be > 0, got {max_psi}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    _, b, c = bin_counts(baseline, candidate)
    mb, mc = merge_sparse(b, c)
    n_b, n_c = float(b.sum()), float(c.sum())
    a_k = look_alpha(alpha, look)
    value = psi(mb, mc) if n_b > 0 and n_c > 0 else 0.0
    x2, dof = chi2_homogeneity(mb, mc)
    h = 1.0 / n_b + 1.0 / n_c if n_b > 0 and n_c > 0 else math.inf
    debiased = max(0.0, value - dof * h) if math.isfinite(h) else 0.0
    p = float(sps.chi2.sf(x2, dof)) if dof > 0 else 1.0

    def result(verdict: stats.Verdict, why: str) -> ShiftResult:
        text = (
            f"PSI {value:.4g} (bias-corrected {debiased:.4g}, max {max_psi:g}), chi-square {x2:.4g} on "
            f"{dof} df, p={p:.3g} (this look's alpha {a_k:.3g}; n stable={n_b:g}, candidate={n_c:g}): {why}"
        )
        return ShiftResult(verdict, value, debiased, x2, p, len(mb), n_b, n_c, a_k, text)

    if min(n_b, n_c) < min_samples:
        return result("inconclusive", f"not enough scores yet (each arm needs {min_samples:g})")
    if dof == 0:
        return result("pass", "all scores fall in one bin in both arms")
    if p <= a_k and debiased >= max_psi:
        return result("fail", "the candidate's score distribution has shifted")
    if float(sps.ncx2.cdf(x2, dof, max_psi / h)) <= a_k:
        return result("pass", f"the shift is shown to be below {max_psi:g}")
    return result("inconclusive", "not enough evidence yet")


@dataclass(frozen=True)
class ShiftSpec:
    """The judge's spec: the user's ``PredictionShift`` with the analysis's alpha and the look number."""

    spec: PredictionShift
    alpha: float = 0.05
    look: int = 1


def _missing(arms: Arms[Buckets]) -> str | None:
    for role, b in (("stable", arms.baseline), ("candidate", arms.candidate)):
        if not b:
            return role
    return None


def judge(s: ShiftSpec, arms: Arms[Buckets]) -> Finding:
    """The prediction-shift judge: :func:`judge_shift` on the two arms' buckets (noData if one is missing)."""
    name, thr = s.spec.name, f"PSI < {s.spec.maxPSI:g}"
    missing = _missing(arms)
    if missing is not None:
        return Finding("noData", f"{name}: no score histogram for the {missing}", "noData", threshold=thr)
    assert arms.baseline is not None and arms.candidate is not None
    try:
        r = judge_shift(
            arms.baseline,
            arms.candidate,
            max_psi=s.spec.maxPSI,
            alpha=s.alpha,
            min_samples=s.spec.minSamples,
            look=s.look,
        )
    except ValueError as e:
        return Finding("error", f"{name}: {e}", "error", threshold=thr)
    numbers = {
        "psi": r.psi,
        "psiDebiased": r.psi_debiased,
        "chi2": r.chi2,
        "pValue": r.p_value,
        "bins": float(r.bins),
        "baselineN": r.n_baseline,
        "candidateN": r.n_candidate,
        "alpha": r.look_alpha,
    }
    return Finding(r.verdict, f"{name}: {r.reason}", value=r.psi, threshold=thr, numbers=numbers)


_: Judge[ShiftSpec, Arms[Buckets]] = judge
