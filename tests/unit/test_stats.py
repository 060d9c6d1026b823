"""Behaviour tests for model_rollouts.analysis.stats against independent reference computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from model_rollouts.analysis import stats
from model_rollouts.analysis.stats import (
    MeanData,
    ProportionData,
    compare_means,
    compare_proportions,
    holm,
    probability_to_be_best,
    sample_size_means,
    sample_size_proportions,
    srm_test,
)


def _mean_data(x: np.ndarray) -> MeanData:
    return MeanData(count=float(x.size), total=float(x.sum()), sum_squares=float((x**2).sum()))


# --------------------------------------------------------------------------- fixed horizon vs scipy


def test_fixed_horizon_proportions_matches_two_proportion_z_test() -> None:
    c, t = ProportionData(480, 4000), ProportionData(560, 4000)
    r = compare_proportions(c, t, method="fixedHorizon")
    p1, p2 = 480 / 4000, 560 / 4000
    se = math.sqrt(p1 * (1 - p1) / 4000 + p2 * (1 - p2) / 4000)
    z = (p2 - p1) / se
    assert r.difference == pytest.approx(0.02)
    assert r.p_value == pytest.approx(2 * sps.norm.sf(abs(z)), rel=1e-10)
    assert r.ci_low == pytest.approx(p2 - p1 - sps.norm.ppf(0.975) * se, rel=1e-10)
    assert r.ci_high == pytest.approx(p2 - p1 + sps.norm.ppf(0.975) * se, rel=1e-10)
    assert r.verdict == "pass"  # z = 2.65
    assert r.control_n == 4000 and r.treatment_n == 4000
    assert "0.02" in r.reason and "95% CI" in r.reason


def test_fixed_horizon_lower_is_better_flips_verdict() -> None:
    c, t = ProportionData(480, 4000), ProportionData(560, 4000)
    assert compare_proportions(c, t, method="fixedHorizon", better="lower").verdict == "fail"
    assert compare_proportions(t, c, method="fixedHorizon", better="lower").verdict == "pass"
    assert compare_proportions(t, c, method="fixedHorizon").verdict == "fail"


def test_fixed_horizon_means_matches_welch() -> None:
    rng = np.random.default_rng(7)
    xc = rng.normal(10.0, 2.0, 60)
    xt = rng.normal(11.0, 3.5, 45)
    r = compare_means(_mean_data(xc), _mean_data(xt), method="fixedHorizon")
    ref = sps.ttest_ind_from_stats(
        xt.mean(), xt.std(ddof=1), xt.size, xc.mean(), xc.std(ddof=1), xc.size, equal_var=False
    )
    assert r.p_value == pytest.approx(ref.pvalue, rel=1e-8)
    assert r.difference == pytest.approx(xt.mean() - xc.mean(), rel=1e-10)
    ref_ci = sps.ttest_ind(xt, xc, equal_var=False).confidence_interval(0.95)
    assert r.ci_low == pytest.approx(ref_ci.low, rel=1e-8)
    assert r.ci_high == pytest.approx(ref_ci.high, rel=1e-8)
    assert (r.verdict == "pass") == (ref.pvalue < 0.05 and xt.mean() > xc.mean())


def test_non_inferiority_pass_and_fail_use_the_margin() -> None:
    c = ProportionData(5000, 10000)
    same = ProportionData(4990, 10000)
    r = compare_proportions(c, same, method="fixedHorizon", test="nonInferiority", margin=0.03)
    assert r.verdict == "pass" and r.ci_low > -0.03
    # p-value is the two-sided test of difference == -margin
    z = (r.difference + 0.03) / math.sqrt(0.25 / 10000 + 0.499 * 0.501 / 10000)
    assert r.p_value == pytest.approx(2 * sps.norm.sf(abs(z)), rel=1e-8)
    worse = ProportionData(4400, 10000)
    r = compare_proportions(c, worse, method="fixedHorizon", test="nonInferiority", margin=0.03)
    assert r.verdict == "fail" and r.ci_high < -0.03
    # worse than 0 but not shown worse than the margin: inconclusive, not fail
    slightly = ProportionData(4800, 10000)
    r = compare_proportions(c, slightly, method="fixedHorizon", test="nonInferiority", margin=0.03)
    assert r.verdict == "inconclusive" and r.ci_high < 0
    # lower-is-better orientation: margin is on the high side
    r = compare_proportions(
        c,
        ProportionData(5010, 10000),
        method="fixedHorizon",
        better="lower",
        test="nonInferiority",
        margin=0.03,
    )
    assert r.verdict == "pass" and r.ci_high < 0.03


def test_margin_is_ignored_by_superiority() -> None:
    c, t = ProportionData(480, 4000), ProportionData(560, 4000)
    a = compare_proportions(c, t, method="fixedHorizon")
    b = compare_proportions(c, t, method="fixedHorizon", margin=0.05)
    assert a == b


# --------------------------------------------------------------------------- sequential


def test_sequential_is_wider_than_fixed_and_consistent_with_p_value() -> None:
    c, t = ProportionData(1200, 10000), ProportionData(1330, 10000)
    fixed = compare_proportions(c, t, method="fixedHorizon")
    for kwargs in ({"max_samples": 20000.0}, {"mde": 0.01}, {}):
        seq = compare_proportions(c, t, method="sequential", **kwargs)  # type: ignore[arg-type]
        assert seq.ci_low < fixed.ci_low and seq.ci_high > fixed.ci_high
        assert seq.p_value >= fixed.p_value
        assert (seq.p_value <= 0.05) == (seq.verdict != "inconclusive")
        assert "95% CS" in seq.reason


def test_sequential_p_value_matches_boundary() -> None:
    alpha = 0.05
    for u in (0.05, 0.3, 0.7, 1.0, 1.4):
        crit = float(stats.sequential_critical_z(u, alpha))
        assert stats._sequential_p_value(crit, u) == pytest.approx(alpha, rel=1e-6)
        assert stats._sequential_p_value(crit * 1.01, u) < alpha < stats._sequential_p_value(crit * 0.99, u)


def test_sequential_boundary_has_exact_crossing_probability() -> None:
    a = stats.sequential_intercept(0.05)
    b = stats.SEQUENTIAL_SLOPE
    in_horizon = sps.norm.sf(a + b) + math.exp(-2 * a * b) * sps.norm.cdf(b - a)
    assert 0.0248 < in_horizon <= 0.025  # almost all of alpha/2 is spent before the cap
    # Brownian simulation on a fine grid (discrete looks can only cross less often than continuous)
    rng = np.random.default_rng(3)
    steps, paths = 400, 20000
    w = np.cumsum(rng.normal(0, math.sqrt(1 / steps), (paths, steps)), axis=1)
    u = np.arange(1, steps + 1) / steps
    crossed = (np.abs(w) >= a + b * u).any(axis=1).mean()
    assert 0.035 < crossed <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / paths)


def test_sequential_inflation_gives_planned_power() -> None:
    r = stats.sequential_inflation(0.05, 0.8, looks=30)
    assert 1.2 < r < 1.4
    assert stats.sequential_inflation(0.05, 0.8) < r  # continuous monitoring needs a smaller cap
    cap = stats.sample_size_sequential_proportions(0.1, 0.01, looks=30)
    assert cap == math.ceil(stats._n_fixed_proportions(0.1, 0.01, 0.05, 0.8) * r - 1e-9)
    assert stats.sample_size_sequential_means(2.0, 0.5) > sample_size_means(2.0, 0.5)


def test_sequential_handles_samples_beyond_the_cap() -> None:
    c, t = ProportionData(1200, 10000), ProportionData(1330, 10000)
    at_cap = compare_proportions(c, t, max_samples=10000)
    past = compare_proportions(c, t, max_samples=5000)
    assert past.ci_high - past.ci_low > at_cap.ci_high - at_cap.ci_low
    assert math.isfinite(past.p_value) and 0 <= past.p_value <= 1


def test_sequential_means() -> None:
    rng = np.random.default_rng(11)
    xc = rng.normal(100, 20, 5000)
    xt = rng.normal(103, 20, 5000)
    r = compare_means(_mean_data(xc), _mean_data(xt), max_samples=10000, better="higher")
    assert r.verdict == "pass"
    r = compare_means(_mean_data(xc), _mean_data(xt), max_samples=10000, better="lower")
    assert r.verdict == "fail"


def test_degenerate_rates_do_not_hide_a_catastrophe() -> None:
    r = compare_proportions(ProportionData(0, 1000), ProportionData(1000, 1000), better="lower", mde=0.01)
    assert r.verdict == "fail"
    assert -1.0 <= r.ci_low <= r.ci_high <= 1.0


# --------------------------------------------------------------------------- bayesian


def test_bayesian_probability_matches_beta_integral() -> None:
    c, t = ProportionData(120, 1000), ProportionData(150, 1000)
    r = compare_proportions(c, t, method="bayesian")
    bc, bt = sps.beta(121, 881), sps.beta(151, 851)
    xs = np.linspace(0, 1, 20001)
    p_better = float(np.trapezoid(bt.pdf(xs) * bc.cdf(xs), xs))
    assert 1 - r.p_value == pytest.approx(p_better, abs=0.005)
    assert r.verdict == ("pass" if p_better > 0.975 else "inconclusive")
    assert "P(better)" in r.reason and "CrI" in r.reason
    assert compare_proportions(c, t, method="bayesian") == r  # deterministic


def test_bayesian_means() -> None:
    rng = np.random.default_rng(5)
    xc, xt = rng.normal(1.0, 1.0, 400), rng.normal(1.3, 1.0, 400)
    r = compare_means(_mean_data(xc), _mean_data(xt), method="bayesian")
    welch = sps.ttest_ind(xt, xc, equal_var=False, alternative="greater")
    assert r.p_value == pytest.approx(welch.pvalue, rel=1e-6)
    assert r.verdict == "pass"


# --------------------------------------------------------------------------- no data, bad input


@pytest.mark.parametrize("method", ["sequential", "fixedHorizon", "bayesian"])
def test_no_data_is_inconclusive(method: str) -> None:
    for c, t in [
        (ProportionData(0, 0), ProportionData(0, 0)),
        (ProportionData(0, 0), ProportionData(5, 10)),
        (ProportionData(3, 5), ProportionData(5, 5)),
    ]:
        r = compare_proportions(c, t, method=method)  # type: ignore[arg-type]
        assert r.verdict == "inconclusive"
        assert "not enough data" in r.reason
        assert r.p_value == 1.0
    r = compare_means(MeanData(0, 0, 0), MeanData(0, 0, 0), method=method)  # type: ignore[arg-type]
    assert r.verdict == "inconclusive"
    # enough samples but no variation at all
    r = compare_means(MeanData(100, 100, 100), MeanData(100, 100, 100), method=method)  # type: ignore[arg-type]
    assert r.verdict == "inconclusive"


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: ProportionData(-1, 10), "successes"),
        (lambda: ProportionData(1, -10), "trials"),
        (lambda: ProportionData(11, 10), "successes"),
        (lambda: ProportionData(float("nan"), 10), "successes"),
        (lambda: ProportionData(1, float("inf")), "trials"),
        (lambda: MeanData(-1, 0, 0), "count"),
        (lambda: MeanData(10, 100, 10), "sum_squares"),
        (lambda: MeanData(10, float("nan"), 10), "total"),
        (lambda: compare_proportions(ProportionData(1, 10), ProportionData(1, 10), alpha=0), "alpha"),
        (lambda: compare_proportions(ProportionData(1, 10), ProportionData(1, 10), alpha=1.5), "alpha"),
        (
            lambda: compare_proportions(ProportionData(1, 10), ProportionData(1, 10), alpha=float("nan")),
            "alpha",
        ),
        (lambda: compare_proportions(ProportionData(1, 10), ProportionData(1, 10), margin=-0.1), "margin"),
        (
            lambda: compare_proportions(ProportionData(1, 10), ProportionData(1, 10), max_samples=0),
            "max_samples",
        ),
        (lambda: compare_proportions(ProportionData(1, 10), ProportionData(1, 10), mde=-1), "mde"),
        (lambda: compare_proportions(ProportionData(1, 10), ProportionData(1, 10), method="x"), "method"),  # type: ignore[arg-type]
        (lambda: compare_proportions(ProportionData(1, 10), ProportionData(1, 10), better="up"), "better"),  # type: ignore[arg-type]
        (lambda: holm([0.1, float("nan")]), "p_values"),
        (lambda: holm([0.1, 1.2]), "p_values"),
        (lambda: srm_test([10, -1], [1, 1]), "observed"),
        (lambda: srm_test([10, 1], [1, -1]), "weights"),
        (lambda: srm_test([10, 1], [1]), "same length"),
        (lambda: sample_size_proportions(1.2, 0.01), "baseline"),
        (lambda: sample_size_proportions(0.5, 0.01, alpha=2), "alpha"),
        (lambda: sample_size_proportions(0.5, 0.01, power=1), "power"),
        (lambda: sample_size_means(-1, 0.01), "sd"),
        (lambda: probability_to_be_best([ProportionData(1, 2)], draws=0), "draws"),
    ],
)
def test_invalid_input_raises_value_error_naming_the_argument(make: object, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        make()  # type: ignore[operator]


# --------------------------------------------------------------------------- holm, srm, sample sizes, PTB


def _holm_reference(p: list[float]) -> list[float]:
    """Straightforward Holm: reject sorted hypotheses while p_(i) <= alpha/(m-i+1), per alpha."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def test_holm_known_values() -> None:
    assert holm([]) == []
    assert holm([0.2]) == [0.2]
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    p = [0.012, 0.3, 0.001, 0.04, 0.049]
    assert holm(p) == pytest.approx(_holm_reference(p))


def test_holm_decisions_match_the_step_down_procedure() -> None:
    p = [0.012, 0.3, 0.001, 0.04, 0.0126]
    alpha = 0.05
    m = len(p)
    rejected = set()
    for rank, i in enumerate(sorted(range(m), key=lambda i: p[i])):
        if p[i] > alpha / (m - rank):
            break
        rejected.add(i)
    assert {i for i, q in enumerate(holm(p)) if q <= alpha} == rejected


def test_srm_matches_chisquare() -> None:
    obs, w = [5100, 4900, 10150], [25, 25, 50]
    expected = [sum(obs) * x / 100 for x in w]
    assert srm_test(obs, w) == pytest.approx(sps.chisquare(obs, expected).pvalue, rel=1e-12)
    assert srm_test([10000, 10000], [1, 1]) == pytest.approx(1.0)
    assert srm_test([11000, 9000], [0.5, 0.5]) < 1e-10


def test_srm_zero_weight_arms() -> None:
    assert srm_test([5000, 5050, 0], [50, 50, 0]) == pytest.approx(srm_test([5000, 5050], [50, 50]))
    assert srm_test([5000, 5050, 3], [50, 50, 0]) == 0.0
    assert srm_test([0, 0], [1, 1]) == 1.0
    assert srm_test([100, 0], [100, 0]) == 1.0


def test_sample_size_textbook() -> None:
    za, zb = sps.norm.ppf(0.975), sps.norm.ppf(0.8)
    n = (za + zb) ** 2 * (0.1 * 0.9 + 0.12 * 0.88) / 0.02**2
    assert sample_size_proportions(0.1, 0.02) == math.ceil(n)
    assert sample_size_proportions(0.5, 0.05, alpha=0.01, power=0.9) == math.ceil(
        (sps.norm.ppf(0.995) + sps.norm.ppf(0.9)) ** 2 * (0.25 + 0.55 * 0.45) / 0.05**2
    )
    assert sample_size_means(10.0, 2.0) == math.ceil(2 * (za + zb) ** 2 * 100 / 4)
    # the sample size really gives the planned power for the z test
    n = sample_size_proportions(0.3, 0.03)
    se = math.sqrt(0.3 * 0.7 / n + 0.33 * 0.67 / n)
    assert sps.norm.sf(za - 0.03 / se) == pytest.approx(0.8, abs=0.002)


def test_probability_to_be_best() -> None:
    arms = [ProportionData(100, 1000), ProportionData(130, 1000), ProportionData(90, 1000)]
    p = probability_to_be_best(arms)
    assert sum(p) == pytest.approx(1.0)
    assert p[1] > 0.9 and p == probability_to_be_best(arms)
    low = probability_to_be_best(arms, better="lower")
    assert low[2] > low[0] > low[1]
    assert probability_to_be_best([]) == []
    assert probability_to_be_best([ProportionData(0, 0), ProportionData(0, 0)]) == pytest.approx(
        [0.5, 0.5], abs=0.02
    )
