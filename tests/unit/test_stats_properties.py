"""Property tests: coverage, null p-value distributions, validity under repeated looks, references."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from model_rollouts.analysis import stats
from model_rollouts.analysis.stats import (
    MeanData,
    ProportionData,
    compare_means,
    compare_proportions,
    holm,
    srm_test,
)

FAST = settings(max_examples=6, deadline=None, derandomize=True)
REFERENCE = settings(max_examples=60, deadline=None, derandomize=True)


def _lower_binomial_bound(trials: int, rate: float, slack: float = 0.01) -> float:
    """Smallest acceptable observed rate: the 0.1% binomial quantile, minus slack for the Wald interval."""
    return float(sps.binom.ppf(0.001, trials, rate)) / trials - slack


@FAST
@given(
    p=st.floats(0.05, 0.95),
    effect=st.floats(-0.04, 0.04),
    n=st.integers(300, 3000),
    seed=st.integers(0, 2**16),
)
def test_fixed_horizon_interval_covers_at_nominal_rate(p: float, effect: float, n: int, seed: int) -> None:
    q = min(0.97, max(0.03, p + effect))
    rng = np.random.default_rng(seed)
    sims = 400
    sc, st_ = rng.binomial(n, p, sims), rng.binomial(n, q, sims)
    covered = 0
    for a, b in zip(sc, st_, strict=True):
        r = compare_proportions(ProportionData(a, n), ProportionData(b, n), method="fixedHorizon")
        covered += r.ci_low <= q - p <= r.ci_high
    assert covered / sims >= _lower_binomial_bound(sims, 0.95)


@FAST
@given(mu=st.floats(-5, 5), sd_c=st.floats(0.5, 5), sd_t=st.floats(0.5, 5), seed=st.integers(0, 2**16))
def test_welch_p_values_are_uniform_under_the_null(mu: float, sd_c: float, sd_t: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    sims = 400
    p_values = []
    for _ in range(sims):
        xc, xt = rng.normal(mu, sd_c, 30), rng.normal(mu, sd_t, 50)
        c = MeanData(30, float(xc.sum()), float((xc**2).sum()))
        t = MeanData(50, float(xt.sum()), float((xt**2).sum()))
        p_values.append(compare_means(c, t, method="fixedHorizon").p_value)
    assert sps.kstest(p_values, "uniform").pvalue > 0.001


@FAST
@given(p=st.floats(0.1, 0.9), seed=st.integers(0, 2**16))
def test_z_test_p_values_are_uniform_under_the_null(p: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, sims = 5000, 400
    sc, st_ = rng.binomial(n, p, sims), rng.binomial(n, p, sims)
    p_values = [
        compare_proportions(ProportionData(a, n), ProportionData(b, n), method="fixedHorizon").p_value
        for a, b in zip(sc, st_, strict=True)
    ]
    assert sps.kstest(p_values, "uniform").pvalue > 0.001


def _ever_rejected(p: float, looks: int, n_look: int, sims: int, seed: int, **kwargs: float) -> float:
    """Fraction of null experiments with any decisive verdict over ``looks`` looks (public API only)."""
    rng = np.random.default_rng(seed)
    sc = np.cumsum(rng.binomial(n_look, p, (sims, looks)), axis=1)
    st_ = np.cumsum(rng.binomial(n_look, p, (sims, looks)), axis=1)
    rejected = 0
    for e in range(sims):
        for k in range(looks):
            n = float(n_look * (k + 1))
            r = compare_proportions(
                ProportionData(float(sc[e, k]), n), ProportionData(float(st_[e, k]), n), **kwargs
            )  # type: ignore[arg-type]
            if r.verdict != "inconclusive":
                rejected += 1
                break
    return rejected / sims


def _mc_limit(alpha: float, sims: int) -> float:
    return alpha + 3 * math.sqrt(alpha * (1 - alpha) / sims)


@settings(max_examples=3, deadline=None, derandomize=True)
@given(p=st.floats(0.05, 0.5), seed=st.integers(0, 2**16))
def test_capped_sequential_test_stays_valid_under_repeated_looks(p: float, seed: int) -> None:
    sims, looks, n_look = 600, 40, 150
    # 40 looks to the cap, then 10 more past it: still valid
    rate = _ever_rejected(p, looks + 10, n_look, sims, seed, max_samples=float(looks * n_look))
    assert rate <= _mc_limit(0.05, sims)


@settings(max_examples=2, deadline=None, derandomize=True)
@given(p=st.floats(0.05, 0.5), seed=st.integers(0, 2**16))
def test_msprt_stays_valid_under_repeated_looks(p: float, seed: int) -> None:
    sims = 300
    assert _ever_rejected(p, 40, 150, sims, seed, mde=0.02) <= _mc_limit(0.05, sims)
    assert _ever_rejected(p, 40, 150, sims, seed + 1) <= _mc_limit(0.05, sims)


def test_naive_fixed_horizon_peeking_is_not_valid() -> None:
    """The same harness detects the classic peeking problem, so the checks above have teeth."""
    sims = 300
    assert _ever_rejected(0.2, 40, 150, sims, 1, method="fixedHorizon") > 0.12  # type: ignore[arg-type]


def test_sequential_confidence_sequence_covers_uniformly_over_time() -> None:
    rng = np.random.default_rng(4)
    sims, looks, n_look, pc, pt = 300, 30, 200, 0.3, 0.33
    sc = np.cumsum(rng.binomial(n_look, pc, (sims, looks)), axis=1)
    st_ = np.cumsum(rng.binomial(n_look, pt, (sims, looks)), axis=1)
    missed = 0
    for e in range(sims):
        for k in range(looks):
            n = float(n_look * (k + 1))
            r = compare_proportions(
                ProportionData(float(sc[e, k]), n),
                ProportionData(float(st_[e, k]), n),
                max_samples=looks * n_look,
            )
            if not r.ci_low <= pt - pc <= r.ci_high:
                missed += 1
                break
    assert missed / sims <= _mc_limit(0.05, sims)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(z=st.floats(0, 8), dz=st.floats(0, 2), u=st.floats(0.01, 3))
def test_sequential_p_value_is_monotone_in_evidence(z: float, dz: float, u: float) -> None:
    assert stats._sequential_p_value(z + dz, u) <= stats._sequential_p_value(z, u) + 1e-12


def _holm_reference(p: list[float]) -> list[float]:
    m = len(p)
    out = []
    for i in range(m):
        # adjusted p_i = max over hypotheses j ranked at or before i of (m - rank_j) * p_j, capped at 1
        rank_i = sorted(range(m), key=lambda k: (p[k], k)).index(i)
        ranked = sorted(range(m), key=lambda k: (p[k], k))
        out.append(min(1.0, max((m - r) * p[ranked[r]] for r in range(rank_i + 1))))
    return out


@REFERENCE
@given(st.lists(st.floats(0, 1), min_size=1, max_size=12))
def test_holm_matches_reference(p: list[float]) -> None:
    got = holm(p)
    ref = _holm_reference(p)
    assert np.allclose(got, ref, rtol=1e-12, atol=1e-15)
    assert all(a >= b - 1e-15 for a, b in zip(got, p, strict=True))


@REFERENCE
@given(
    st.lists(st.tuples(st.integers(1, 100000), st.integers(1, 100)), min_size=2, max_size=6),
)
def test_srm_matches_chisquare(arms: list[tuple[int, int]]) -> None:
    obs = [float(o) for o, _ in arms]
    w = [float(x) for _, x in arms]
    expected = [sum(obs) * x / sum(w) for x in w]
    ref = sps.chisquare(obs, expected).pvalue
    assert math.isclose(srm_test(obs, w), ref, rel_tol=1e-9, abs_tol=1e-300)
    # scaling the weights does not matter
    assert math.isclose(srm_test(obs, [3 * x for x in w]), ref, rel_tol=1e-9, abs_tol=1e-300)
