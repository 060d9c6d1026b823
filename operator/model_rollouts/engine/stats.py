"""Statistics for rollout analysis and experiments: pure functions, no I/O.

Everything here is a function of counts and sums that Prometheus can give us
(successes/trials for proportions, n/Σx/Σx² for means). The methods, their
references and the benchmark behind the defaults are described in
``docs/statistics.md``; the short version:

* ``method="sequential"`` (the default) gives p-values and intervals that stay
  valid however often they are looked at.  With a planned sample cap
  (``max_samples``) it uses a linear boundary on the Brownian-motion scale of
  the information fraction, whose crossing probability under *continuous*
  monitoring is known in closed form (Bachelier-Levy), so any monitoring
  schedule is covered.  Without a cap it falls back to the normal-mixture
  sequential probability ratio test (mSPRT) of Johari et al., which is valid
  for an unbounded horizon.
* ``method="fixedHorizon"``: the classical unpooled two-proportion z test and
  Welch's t test, valid only when looked at once at a planned sample size.
* ``method="bayesian"``: Beta-Binomial posteriors for proportions, a Welch
  (Behrens-Fisher) approximation for means.

Every ``Comparison`` is decided by one rule: the verdict is decisive exactly
when the reported (1 - alpha) interval excludes the test's threshold (0 for
superiority, the margin on the bad side for non-inferiority); the side tells
pass from fail.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import optimize, stats

Verdict = Literal["pass", "fail", "inconclusive"]
Method = Literal["sequential", "fixedHorizon", "bayesian"]
Better = Literal["higher", "lower"]
Test = Literal["superiority", "nonInferiority"]

#: No pass/fail verdict is given before each arm has at least this many samples.
MIN_SAMPLES_PER_ARM = 20

#: Slope ``b`` of the sequential boundary ``W(u) >= a + b*u`` (u = information fraction of the cap).
#: Chosen by the benchmark in docs/statistics.md: it balances early stopping for large effects
#: against the sample cap needed for 80% power at the MDE.
SEQUENTIAL_SLOPE = 1.25
#: Beyond the cap the boundary jumps up by this much and rises with a steeper slope, so that the
#: guarantee survives monitoring that continues past ``max_samples`` (it costs ~0.6% of alpha).
POST_CAP_JUMP = 1.0
POST_CAP_SLOPE = 2.0
#: Siegmund's correction for discrete monitoring of a Brownian boundary: rho = -zeta(1/2)/sqrt(2*pi).
SIEGMUND_RHO = 0.5826
#: Default normal-mixture standard deviation for the uncapped mSPRT, in units of the per-observation
#: standard deviation, used when no MDE is given.
DEFAULT_MIXTURE_EFFECT = 0.1
#: Posterior draws for the Beta-Binomial comparison (seeded, so results are reproducible).
BAYES_DRAWS = 20000


@dataclass(frozen=True)
class ProportionData:
    """Cumulative successes out of trials for one arm."""

    successes: float
    trials: float

    def __post_init__(self) -> None:
        _check_finite(self.successes, "successes")
        _check_finite(self.trials, "trials")
        if self.trials < 0:
            raise ValueError(f"trials must be >= 0, got {self.trials}")
        if self.successes < 0:
            raise ValueError(f"successes must be >= 0, got {self.successes}")
        if self.successes > self.trials:
            raise ValueError(f"successes ({self.successes}) must not exceed trials ({self.trials})")


@dataclass(frozen=True)
class MeanData:
    """Sufficient statistics of one arm: count n, total Σx and sum of squares Σx²."""

    count: float
    total: float
    sum_squares: float

    def __post_init__(self) -> None:
        _check_finite(self.count, "count")
        _check_finite(self.total, "total")
        _check_finite(self.sum_squares, "sum_squares")
        if self.count < 0:
            raise ValueError(f"count must be >= 0, got {self.count}")
        if self.sum_squares < 0:
            raise ValueError(f"sum_squares must be >= 0, got {self.sum_squares}")
        if self.count == 0:
            if self.total != 0 or self.sum_squares != 0:
                raise ValueError("total and sum_squares must be 0 when count is 0")
        elif self.sum_squares - self.total**2 / self.count < -1e-9 * max(1.0, self.sum_squares):
            raise ValueError("sum_squares is smaller than total**2 / count: not the sums of one sample")

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count > 0 else 0.0

    @property
    def variance(self) -> float:
        """Unbiased sample variance (0 with fewer than two samples)."""
        if self.count < 2:
            return 0.0
        return max(0.0, (self.sum_squares - self.total**2 / self.count) / (self.count - 1))


@dataclass(frozen=True)
class Comparison:
    """Outcome of comparing a treatment (candidate) arm with a control (stable) arm.

    ``ci_low``/``ci_high`` bound ``difference`` = treatment - control at level 1 - alpha: a confidence
    sequence for ``sequential``, a confidence interval for ``fixedHorizon`` and an equal-tailed credible
    interval for ``bayesian``.  For proportions the interval is clipped to [-1, 1]; for means with too
    little data it is (-inf, inf).  ``p_value`` is two-sided for the threshold of the test (0, or the
    margin for non-inferiority), so ``p_value <= alpha`` exactly when the verdict is decisive; for
    ``bayesian`` it is 1 - P(treatment better than the threshold) and decisive at alpha / 2.
    """

    control_estimate: float
    treatment_estimate: float
    control_n: float
    treatment_n: float
    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    verdict: Verdict
    reason: str


# --------------------------------------------------------------------------- validation helpers


def _check_finite(x: float, name: str) -> None:
    if isinstance(x, bool) or not isinstance(x, int | float | np.integer | np.floating):
        raise ValueError(f"{name} must be a number, got {x!r}")
    if not math.isfinite(float(x)):
        raise ValueError(f"{name} must be finite, got {x}")


def _check_alpha(alpha: float, name: str = "alpha") -> None:
    _check_finite(alpha, name)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {alpha}")


def _check_options(
    alpha: float,
    method: str,
    better: str,
    test: str,
    margin: float,
    mde: float | None,
    max_samples: float | None,
) -> None:
    _check_alpha(alpha)
    if method not in ("sequential", "fixedHorizon", "bayesian"):
        raise ValueError(f"method must be 'sequential', 'fixedHorizon' or 'bayesian', got {method!r}")
    if better not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher' or 'lower', got {better!r}")
    if test not in ("superiority", "nonInferiority"):
        raise ValueError(f"test must be 'superiority' or 'nonInferiority', got {test!r}")
    _check_finite(margin, "margin")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if mde is not None:
        _check_finite(mde, "mde")
        if mde <= 0:
            raise ValueError(f"mde must be > 0, got {mde}")
    if max_samples is not None:
        _check_finite(max_samples, "max_samples")
        if max_samples <= 0:
            raise ValueError(f"max_samples must be > 0, got {max_samples}")


# --------------------------------------------------------------------------- sequential boundary


def _log_ndtr(x: float) -> float:
    return float(stats.norm.logcdf(x))


def _side_probability(a: float, b: float = SEQUENTIAL_SLOPE) -> float:
    """P(a standard Brownian motion W crosses a + b*u for some u in (0, 1], or the post-cap line later).

    First term: Bachelier-Levy formula for a linear boundary on [0, 1].  Second term: an upper bound on
    crossing the post-cap boundary c + j + s*(u - 1) (c = a + b) for u > 1 without having crossed before:
    E[exp(-2 s (c + j - W(1))); W(1) < c] = exp(2 s^2 - 2 s (c + j)) * Phi(c - 2 s).
    """
    if a <= 0:
        return 1.0
    in_horizon = float(stats.norm.sf(a + b)) + math.exp(-2.0 * a * b + _log_ndtr(b - a))
    s, c = POST_CAP_SLOPE, a + b
    post_cap = math.exp(2.0 * s * s - 2.0 * s * (c + POST_CAP_JUMP) + _log_ndtr(c - 2.0 * s))
    return min(1.0, in_horizon + post_cap)


@lru_cache(maxsize=256)
def sequential_intercept(alpha: float) -> float:
    """Intercept ``a`` of the two-sided sequential boundary with overall crossing probability ``alpha``."""
    _check_alpha(alpha)
    return float(optimize.brentq(lambda a: _side_probability(a) - alpha / 2.0, 1e-9, 40.0, xtol=1e-12))


def sequential_critical_z(info_fraction: npt.ArrayLike, alpha: float) -> npt.NDArray[np.float64]:
    """Critical |z| of the capped sequential test at information fraction u = n / max_samples.

    Reject (two-sided, level alpha) when |z| >= returned value.  Vectorised; u <= 0 gives +inf.
    The rule is valid for any monitoring schedule, including continuous monitoring and looks after
    the cap.
    """
    u = np.asarray(info_fraction, dtype=np.float64)
    a = sequential_intercept(alpha)
    b = SEQUENTIAL_SLOPE
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(u <= 1.0, a + b * u, a + b + POST_CAP_JUMP + POST_CAP_SLOPE * (u - 1.0))
        z = np.where(u > 0, w / np.sqrt(np.where(u > 0, u, 1.0)), np.inf)
    return np.asarray(z, dtype=np.float64)


def _sequential_p_value(z_abs: float, u: float) -> float:
    """Smallest alpha at which the capped sequential test rejects at this look (always-valid p-value)."""
    if u <= 0 or not math.isfinite(z_abs):
        return 1.0 if u <= 0 else 0.0
    w = z_abs * math.sqrt(u)
    if u <= 1.0:
        a = w - SEQUENTIAL_SLOPE * u
    else:
        a = w - SEQUENTIAL_SLOPE - POST_CAP_JUMP - POST_CAP_SLOPE * (u - 1.0)
    return min(1.0, 2.0 * _side_probability(a))


def _continuous_power(a: float, drift: float, b: float = SEQUENTIAL_SLOPE) -> float:
    """P(W(u) + drift*u >= a + b*u for some u in (0, 1])."""
    c = b - drift
    return min(1.0, float(stats.norm.sf(a + c)) + math.exp(-2.0 * a * c + _log_ndtr(c - a)))


def sequential_inflation(alpha: float = 0.05, power: float = 0.8, looks: int | None = None) -> float:
    """Ratio of the sequential sample cap to the fixed-horizon sample size for the same power.

    ``looks``: the planned number of equally spaced looks up to the cap.  Discrete looks can only
    lower the false-positive rate, but they also lower power a little; Siegmund's corrected
    diffusion approximation (boundary shifted by 0.5826*sqrt(1/looks)) accounts for that.  ``None``
    plans for continuous monitoring.
    """
    _check_alpha(alpha)
    _check_alpha(power, "power")
    if looks is not None and (isinstance(looks, bool) or not isinstance(looks, int) or looks < 1):
        raise ValueError(f"looks must be a positive integer or None, got {looks!r}")
    a = sequential_intercept(alpha)
    if looks is not None:
        a += SIEGMUND_RHO / math.sqrt(looks)
    drift_fixed = float(stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power))
    return float(
        optimize.brentq(
            lambda r: _continuous_power(a, drift_fixed * math.sqrt(r)) - power, 0.2, 50.0, xtol=1e-10
        )
    )


# --------------------------------------------------------------------------- sample sizes


def _z_sum(alpha: float, power: float) -> float:
    _check_alpha(alpha)
    _check_alpha(power, "power")
    return float(stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power))


def _n_fixed_proportions(baseline: float, mde: float, alpha: float, power: float) -> float:
    _check_finite(baseline, "baseline")
    _check_finite(mde, "mde")
    if not 0.0 < baseline < 1.0:
        raise ValueError(f"baseline must be in (0, 1), got {baseline}")
    if mde == 0:
        raise ValueError("mde must be non-zero")
    p2 = baseline + mde
    if not 0.0 < p2 < 1.0:
        raise ValueError(f"baseline + mde must be in (0, 1), got {p2}")
    var = baseline * (1 - baseline) + p2 * (1 - p2)
    return _z_sum(alpha, power) ** 2 * var / mde**2


def _n_fixed_means(sd: float, mde: float, alpha: float, power: float) -> float:
    _check_finite(sd, "sd")
    _check_finite(mde, "mde")
    if sd <= 0:
        raise ValueError(f"sd must be > 0, got {sd}")
    if mde == 0:
        raise ValueError("mde must be non-zero")
    return 2.0 * _z_sum(alpha, power) ** 2 * sd**2 / mde**2


def _ceil(x: float) -> int:
    return math.ceil(x - 1e-9)


def sample_size_proportions(baseline: float, mde: float, *, alpha: float = 0.05, power: float = 0.8) -> int:
    """Per-arm n for the two-sided unpooled two-proportion z test to detect an absolute change ``mde``.

    n = (z_{1-alpha/2} + z_{power})^2 * (p1 q1 + p2 q2) / mde^2 with p2 = baseline + mde.
    """
    return _ceil(_n_fixed_proportions(baseline, mde, alpha, power))


def sample_size_means(sd: float, mde: float, *, alpha: float = 0.05, power: float = 0.8) -> int:
    """Per-arm n for a two-sided two-sample test of means: 2 (z_{1-alpha/2} + z_{power})^2 sd^2 / mde^2."""
    return _ceil(_n_fixed_means(sd, mde, alpha, power))


def sample_size_sequential_proportions(
    baseline: float, mde: float, *, alpha: float = 0.05, power: float = 0.8, looks: int | None = None
) -> int:
    """Per-arm sample cap (``max_samples``) giving the sequential test ``power`` at the MDE."""
    return _ceil(
        _n_fixed_proportions(baseline, mde, alpha, power) * sequential_inflation(alpha, power, looks)
    )


def sample_size_sequential_means(
    sd: float, mde: float, *, alpha: float = 0.05, power: float = 0.8, looks: int | None = None
) -> int:
    """Per-arm sample cap (``max_samples``) giving the sequential test ``power`` at the MDE."""
    return _ceil(_n_fixed_means(sd, mde, alpha, power) * sequential_inflation(alpha, power, looks))


# --------------------------------------------------------------------------- comparisons


@dataclass(frozen=True)
class _Summary:
    est_c: float
    est_t: float
    n_c: float
    n_t: float
    var_c: float  # per-observation variance used for the standard error
    var_t: float
    df: float | None  # Welch degrees of freedom for means, None for proportions (normal)
    bounded: bool  # difference is bounded in [-1, 1]


def _fmt(x: float, signed: bool = False) -> str:
    if math.isinf(x):
        return ("+" if x > 0 and signed else "") + ("inf" if x > 0 else "-inf")
    return f"{x:+.4g}" if signed else f"{x:.4g}"


def _proportion_variance(d: ProportionData) -> float:
    if d.trials <= 0:
        return 0.0
    p = d.successes / d.trials
    if 0.0 < p < 1.0:
        return p * (1.0 - p)
    # Observed rate of exactly 0 or 1: use (s + 1/2) / (n + 1) so one degenerate arm cannot hide a difference.
    q = 0.5 / (d.trials + 1.0)
    return q * (1.0 - q)


def compare_proportions(
    control: ProportionData,
    treatment: ProportionData,
    *,
    alpha: float = 0.05,
    method: Method = "sequential",
    better: Better = "higher",
    test: Test = "superiority",
    margin: float = 0.0,
    mde: float | None = None,
    max_samples: float | None = None,
    labels: tuple[str, str] = ("control", "treatment"),
) -> Comparison:
    """Compare success rates.  See module docstring and docs/statistics.md.

    ``margin`` (absolute, >= 0) is used only by ``nonInferiority``: pass when the treatment is shown to
    be no worse than ``margin`` in the ``better`` direction.  ``mde`` tunes the uncapped mSPRT mixture;
    ``max_samples`` (per arm, ideally from :func:`sample_size_sequential_proportions`) selects the capped
    sequential boundary.  ``labels`` name (control, treatment) in ``reason``.
    """
    if not isinstance(control, ProportionData) or not isinstance(treatment, ProportionData):
        raise ValueError("control and treatment must be ProportionData")
    _check_options(alpha, method, better, test, margin, mde, max_samples)
    pc = control.successes / control.trials if control.trials > 0 else 0.0
    pt = treatment.successes / treatment.trials if treatment.trials > 0 else 0.0
    summary = _Summary(
        est_c=pc,
        est_t=pt,
        n_c=control.trials,
        n_t=treatment.trials,
        var_c=_proportion_variance(control),
        var_t=_proportion_variance(treatment),
        df=None,
        bounded=True,
    )
    bayes: tuple[ProportionData, ProportionData] | None = (
        (control, treatment) if method == "bayesian" else None
    )
    return _compare(summary, alpha, method, better, test, margin, mde, max_samples, labels, bayes)


def compare_means(
    control: MeanData,
    treatment: MeanData,
    *,
    alpha: float = 0.05,
    method: Method = "sequential",
    better: Better = "higher",
    test: Test = "superiority",
    margin: float = 0.0,
    mde: float | None = None,
    max_samples: float | None = None,
    labels: tuple[str, str] = ("control", "treatment"),
) -> Comparison:
    """Compare means (e.g. latency, a score) from n, Σx, Σx².  Same options as :func:`compare_proportions`;
    ``fixedHorizon`` is Welch's t test."""
    if not isinstance(control, MeanData) or not isinstance(treatment, MeanData):
        raise ValueError("control and treatment must be MeanData")
    _check_options(alpha, method, better, test, margin, mde, max_samples)
    vc, vt = control.variance, treatment.variance
    df: float | None = None
    if control.count >= 2 and treatment.count >= 2:
        a, b = vc / control.count, vt / treatment.count
        if a + b > 0:
            df = (a + b) ** 2 / (a**2 / (control.count - 1) + b**2 / (treatment.count - 1))
    summary = _Summary(
        est_c=control.mean,
        est_t=treatment.mean,
        n_c=control.count,
        n_t=treatment.count,
        var_c=vc,
        var_t=vt,
        df=df,
        bounded=False,
    )
    return _compare(summary, alpha, method, better, test, margin, mde, max_samples, labels, None)


def _compare(
    s: _Summary,
    alpha: float,
    method: Method,
    better: Better,
    test: Test,
    margin: float,
    mde: float | None,
    max_samples: float | None,
    labels: tuple[str, str],
    bayes_props: tuple[ProportionData, ProportionData] | None,
) -> Comparison:
    c_label, t_label = labels
    diff = s.est_t - s.est_c
    sign = 1.0 if better == "higher" else -1.0
    threshold = -sign * margin if test == "nonInferiority" else 0.0
    se = math.sqrt(s.var_c / s.n_c + s.var_t / s.n_t) if s.n_c > 0 and s.n_t > 0 else 0.0
    lo_bound, hi_bound = (-1.0, 1.0) if s.bounded else (-math.inf, math.inf)

    def result(lo: float, hi: float, p: float, verdict: Verdict, stat: str, why: str) -> Comparison:
        level = f"{100 * (1 - alpha):.4g}%"
        kind = {"sequential": "CS", "fixedHorizon": "CI", "bayesian": "CrI"}[method]
        reason = (
            f"{t_label} {_fmt(s.est_t)} vs {c_label} {_fmt(s.est_c)} (diff {_fmt(diff, True)}, "
            f"{level} {kind} [{_fmt(lo, True)}, {_fmt(hi, True)}], {stat}): {why}"
        )
        return Comparison(
            control_estimate=s.est_c,
            treatment_estimate=s.est_t,
            control_n=s.n_c,
            treatment_n=s.n_t,
            difference=diff,
            ci_low=lo,
            ci_high=hi,
            p_value=p,
            verdict=verdict,
            reason=reason,
        )

    if s.n_c < MIN_SAMPLES_PER_ARM or s.n_t < MIN_SAMPLES_PER_ARM or not se > 0:
        why = (
            f"not enough data yet ({c_label} n={s.n_c:g}, {t_label} n={s.n_t:g}; "
            f"need at least {MIN_SAMPLES_PER_ARM} per arm and some variation)"
        )
        p_stat = "P(better)=n/a" if method == "bayesian" else "p=1"
        return result(lo_bound, hi_bound, 1.0, "inconclusive", p_stat, why)

    if method == "bayesian":
        if bayes_props is not None:
            draws = _beta_difference_draws(*bayes_props)
            lo, hi = (float(q) for q in np.quantile(draws, [alpha / 2, 1 - alpha / 2]))
            p_better = float(np.mean(sign * (draws - threshold) > 0))
        else:
            t = stats.t(df=s.df if s.df is not None else math.inf, loc=diff, scale=se)
            lo, hi = float(t.ppf(alpha / 2)), float(t.ppf(1 - alpha / 2))
            p_better = float(t.sf(threshold) if sign > 0 else t.cdf(threshold))
        p_value = 1.0 - p_better
        stat = f"P(better)={p_better:.3g}"
    else:
        z0 = (diff - threshold) / se
        if method == "fixedHorizon":
            if s.df is not None:
                crit = float(stats.t.ppf(1 - alpha / 2, s.df))
                p_value = float(2 * stats.t.sf(abs(z0), s.df))
            else:
                crit = float(stats.norm.ppf(1 - alpha / 2))
                p_value = float(2 * stats.norm.sf(abs(z0)))
            half = crit * se
        elif max_samples is not None:
            u = 2.0 * s.n_c * s.n_t / (s.n_c + s.n_t) / max_samples  # information fraction (harmonic n)
            half = float(sequential_critical_z(u, alpha)) * se
            p_value = _sequential_p_value(abs(z0), u)
        else:
            half, p_value = _msprt(diff - threshold, se, alpha, _mixture_sd(s, mde))
        lo, hi = diff - half, diff + half
        stat = f"p={p_value:.2g}"
    lo, hi = max(lo, lo_bound), min(hi, hi_bound)

    good_side = lo > threshold if sign > 0 else hi < threshold
    bad_side = hi < threshold if sign > 0 else lo > threshold
    if test == "nonInferiority":
        limit = f"the margin {_fmt(threshold, True)}"
        if good_side:
            return result(lo, hi, p_value, "pass", stat, f"{t_label} is not worse than {limit}")
        if bad_side:
            return result(lo, hi, p_value, "fail", stat, f"{t_label} is worse than {limit}")
    else:
        if good_side:
            return result(lo, hi, p_value, "pass", stat, f"{t_label} is better")
        if bad_side:
            return result(lo, hi, p_value, "fail", stat, f"{t_label} is worse")
    return result(lo, hi, p_value, "inconclusive", stat, "not enough evidence yet")


def _mixture_sd(s: _Summary, mde: float | None) -> float:
    if mde is not None:
        return abs(mde)
    return DEFAULT_MIXTURE_EFFECT * math.sqrt((s.var_c + s.var_t) / 2.0)


def _msprt(delta: float, se: float, alpha: float, tau: float) -> tuple[float, float]:
    """Normal-mixture SPRT (Johari et al.) for a difference with standard error ``se``.

    Mixing theta ~ N(0, tau^2) over the likelihood ratio of the estimate gives the martingale
    Lambda = sqrt(V / (V + tau^2)) exp(tau^2 delta^2 / (2 V (V + tau^2))), V = se^2.  Returns the
    always-valid interval half-width {delta : Lambda < 1/alpha} and the p-value min(1, 1/Lambda).
    """
    v = se * se
    t2 = tau * tau
    half = math.sqrt(v * (v + t2) / t2 * (2.0 * math.log(1.0 / alpha) + math.log1p(t2 / v)))
    log_lambda = 0.5 * math.log(v / (v + t2)) + t2 * delta * delta / (2.0 * v * (v + t2))
    return half, min(1.0, math.exp(-log_lambda))


def _beta_difference_draws(control: ProportionData, treatment: ProportionData) -> npt.NDArray[np.float64]:
    rng = np.random.default_rng(0)
    pc = rng.beta(1 + control.successes, 1 + control.trials - control.successes, BAYES_DRAWS)
    pt = rng.beta(1 + treatment.successes, 1 + treatment.trials - treatment.successes, BAYES_DRAWS)
    return np.asarray(pt - pc, dtype=np.float64)


# --------------------------------------------------------------------------- multiple arms


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm (1979) step-down adjusted p-values, in the input order.

    Sorted ascending p_(1..m): adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)).  Controls the
    family-wise error rate under any dependence.
    """
    p = np.asarray([float(x) for x in p_values], dtype=np.float64)
    if p.size == 0:
        return []
    if not np.all(np.isfinite(p)) or np.any(p < 0) or np.any(p > 1):
        raise ValueError(f"p_values must all be in [0, 1], got {list(p_values)}")
    m = p.size
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(scaled)
    return [float(x) for x in adjusted]


def srm_test(observed: Sequence[float], weights: Sequence[float]) -> float:
    """Sample-ratio-mismatch p-value: Pearson chi-square of observed counts against configured weights.

    Weights need not sum to 1.  Arms with zero weight and zero count are dropped; an arm with zero
    weight but traffic is an impossible split, so the p-value is 0.  With fewer than two arms left or no
    traffic there is nothing to test and the p-value is 1.
    """
    obs = [float(x) for x in observed]
    w = [float(x) for x in weights]
    if len(obs) != len(w):
        raise ValueError(f"observed and weights must have the same length ({len(obs)} != {len(w)})")
    for i, (o, wi) in enumerate(zip(obs, w, strict=True)):
        _check_finite(o, f"observed[{i}]")
        _check_finite(wi, f"weights[{i}]")
        if o < 0:
            raise ValueError(f"observed[{i}] must be >= 0, got {o}")
        if wi < 0:
            raise ValueError(f"weights[{i}] must be >= 0, got {wi}")
    if obs and sum(w) <= 0:
        raise ValueError("weights must not all be 0")
    if any(wi == 0 and o > 0 for o, wi in zip(obs, w, strict=True)):
        return 0.0
    kept = [(o, wi) for o, wi in zip(obs, w, strict=True) if wi > 0]
    total = sum(o for o, _ in kept)
    if len(kept) < 2 or total <= 0:
        return 1.0
    wsum = sum(wi for _, wi in kept)
    expected = [total * wi / wsum for _, wi in kept]
    return float(stats.chisquare([o for o, _ in kept], expected).pvalue)


def probability_to_be_best(
    arms: Sequence[ProportionData], *, better: Better = "higher", draws: int = 20000, seed: int = 0
) -> list[float]:
    """P(each arm has the best rate) under independent Beta(1 + s, 1 + f) posteriors (seeded Monte Carlo)."""
    if better not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher' or 'lower', got {better!r}")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive integer, got {draws!r}")
    arms = list(arms)
    if not arms:
        return []
    for arm in arms:
        if not isinstance(arm, ProportionData):
            raise ValueError("arms must be ProportionData")
    rng = np.random.default_rng(seed)
    samples = np.column_stack([rng.beta(1 + a.successes, 1 + a.trials - a.successes, draws) for a in arms])
    best = np.argmax(samples, axis=1) if better == "higher" else np.argmin(samples, axis=1)
    counts = np.bincount(best, minlength=len(arms))
    return [float(c) / draws for c in counts]
