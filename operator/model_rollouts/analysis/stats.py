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

Every ``ComparisonResult`` is decided by one rule: the verdict is decisive exactly
when the reported (1 - alpha) interval excludes the test's threshold (0 for
superiority, the margin on the bad side for non-inferiority); the side tells
pass from fail.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Literal

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
#: A non-inferiority comparison with a margin and no explicit design (no ``mde``, ``max_samples`` or
#: ``max_information``) is planned for this power at the margin, assuming at least this many looks
#: before the cap (Siegmund's correction; more looks only add power).
DEFAULT_POWER = 0.8
DEFAULT_PLAN_LOOKS = 20
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
class ComparisonResult:
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
    #: Sequential test only, while inconclusive: estimated further samples (both arms together, at the
    #: current split) until the interval is narrow enough to decide at the current estimate (or at the
    #: margin / MDE when that is further from the threshold); None when unknown or unreachable.
    more_samples_needed: float | None = None
    #: The same estimate for the smaller arm alone.
    more_samples_smaller_arm: float | None = None
    #: Capped sequential test only: information fraction u of the planned cap (may exceed 1).
    information_fraction: float | None = None
    #: Number of strata (constant-split epochs) the result combines.
    strata: int = 1


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
    """log Phi(x); math.erfc is exact enough and much faster than scipy for scalars above -20."""
    if x > -20.0:
        return math.log(0.5 * math.erfc(-x / math.sqrt(2.0)))
    return float(stats.norm.logcdf(x))


def _norm_sf(x: float) -> float:
    return 0.5 * math.erfc(x / math.sqrt(2.0))


def _side_probability(a: float, b: float = SEQUENTIAL_SLOPE) -> float:
    """P(a standard Brownian motion W crosses a + b*u for some u in (0, 1], or the post-cap line later).

    First term: Bachelier-Levy formula for a linear boundary on [0, 1].  Second term: an upper bound on
    crossing the post-cap boundary c + j + s*(u - 1) (c = a + b) for u > 1 without having crossed before:
    E[exp(-2 s (c + j - W(1))); W(1) < c] = exp(2 s^2 - 2 s (c + j)) * Phi(c - 2 s).
    """
    if a <= 0:
        return 1.0
    in_horizon = _norm_sf(a + b) + math.exp(-2.0 * a * b + _log_ndtr(b - a))
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


@lru_cache(maxsize=256)
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
    return _z_sum_cached(float(alpha), float(power))


@lru_cache(maxsize=256)
def _z_sum_cached(alpha: float, power: float) -> float:
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


Design = Literal["fixedHorizon", "sequential", "mixture"]


@dataclass(frozen=True)
class SamplePlan:
    """Samples a design needs for ``power`` at the MDE, at a given split.

    ``control``/``treatment``/``total``/``smaller_arm`` are sample counts at the split ``allocation``
    (the treatment's share).  ``max_samples`` is what to pass to ``compare_*(max_samples=...)`` for the
    capped sequential design (it is always on the even-split scale: the information fraction counts
    harmonic-mean samples, so the same cap serves every split); None for the other designs.
    ``information`` is 1 / Var(difference) at that point.
    """

    control: int
    treatment: int
    total: int
    smaller_arm: int
    max_samples: float | None
    information: float
    design: Design
    allocation: float


def _check_allocation(allocation: float) -> None:
    _check_finite(allocation, "allocation")
    if not 0.0 < allocation < 1.0:
        raise ValueError(f"allocation must be in (0, 1), got {allocation}")


def _mixture_information(mde: float, alpha: float, power: float, tau: float) -> float:
    """Information at which the uncapped mSPRT's interval half-width is mde - z_power * se.

    At that information an effect of ``mde`` is decisive with probability >= ``power`` at that single
    look (earlier looks only add to it), so the plan is conservative.
    """
    z_pow = float(stats.norm.ppf(power))

    def gap(log_info: float) -> float:
        info = math.exp(log_info)
        se = math.sqrt(1.0 / info)
        half = _msprt(0.0, se, alpha, tau)[0]
        return abs(mde) - z_pow * se - half

    lo, hi = math.log(1e-12 / mde**2), math.log(1e12 / mde**2)
    return math.exp(float(optimize.brentq(gap, lo, hi, xtol=1e-10)))


def sample_plan(
    var_control: float,
    var_treatment: float,
    mde: float,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    allocation: float = 0.5,
    design: Design = "sequential",
    looks: int | None = None,
    tau: float | None = None,
) -> SamplePlan:
    """Samples for ``power`` at an absolute effect ``mde`` given per-observation variances and the split.

    ``design``: ``fixedHorizon`` (one look), ``sequential`` (the capped boundary; ``looks`` as in
    :func:`sequential_inflation`) or ``mixture`` (the uncapped mSPRT with mixture sd ``tau``, default
    ``mde``; conservative, see :func:`_mixture_information`).  Use the design the running test really
    has: a status that shows the capped design's size while the uncapped test runs overstates power.
    """
    _check_finite(var_control, "var_control")
    _check_finite(var_treatment, "var_treatment")
    if var_control <= 0 or var_treatment <= 0:
        raise ValueError("variances must be > 0")
    _check_finite(mde, "mde")
    if mde == 0:
        raise ValueError("mde must be non-zero")
    _check_allocation(allocation)
    zs = _z_sum(alpha, power)
    cap: float | None = None
    if design == "fixedHorizon":
        info = zs**2 / mde**2
    elif design == "sequential":
        info = sequential_inflation(alpha, power, looks) * zs**2 / mde**2
        cap = info * (var_control + var_treatment)
    elif design == "mixture":
        t = abs(mde) if tau is None else tau
        _check_finite(t, "tau")
        if t <= 0:
            raise ValueError(f"tau must be > 0, got {t}")
        info = _mixture_information(mde, alpha, power, t)
    else:
        raise ValueError(f"design must be 'fixedHorizon', 'sequential' or 'mixture', got {design!r}")
    w = allocation
    if cap is not None:
        # The cap is reached when the harmonic-mean samples 2 n_c n_t / (n_c + n_t) equal it.
        n_c, n_t = cap / (2.0 * w), cap / (2.0 * (1.0 - w))
    else:
        total = info * (var_control / (1.0 - w) + var_treatment / w)
        n_c, n_t = (1.0 - w) * total, w * total
    return SamplePlan(
        control=_ceil(n_c),
        treatment=_ceil(n_t),
        total=_ceil(n_c + n_t),
        smaller_arm=_ceil(min(n_c, n_t)),
        max_samples=cap,
        information=info,
        design=design,
        allocation=w,
    )


def _proportion_variances(baseline: float, mde: float) -> tuple[float, float]:
    _check_finite(baseline, "baseline")
    _check_finite(mde, "mde")
    if not 0.0 < baseline < 1.0:
        raise ValueError(f"baseline must be in (0, 1), got {baseline}")
    if mde == 0:
        raise ValueError("mde must be non-zero")
    p2 = baseline + mde
    if not 0.0 < p2 < 1.0:
        raise ValueError(f"baseline + mde must be in (0, 1), got {p2}")
    return baseline * (1 - baseline), p2 * (1 - p2)


def sample_plan_proportions(
    baseline: float,
    mde: float,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    allocation: float = 0.5,
    design: Design = "sequential",
    looks: int | None = None,
    tau: float | None = None,
) -> SamplePlan:
    """:func:`sample_plan` for a rate: control ``baseline``, treatment ``baseline + mde``."""
    vc, vt = _proportion_variances(baseline, mde)
    return sample_plan(
        vc, vt, mde, alpha=alpha, power=power, allocation=allocation, design=design, looks=looks, tau=tau
    )


def sample_plan_means(
    sd: float,
    mde: float,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    allocation: float = 0.5,
    design: Design = "sequential",
    looks: int | None = None,
    tau: float | None = None,
) -> SamplePlan:
    """:func:`sample_plan` for a mean with per-observation standard deviation ``sd`` in both arms."""
    _check_finite(sd, "sd")
    if sd <= 0:
        raise ValueError(f"sd must be > 0, got {sd}")
    return sample_plan(
        sd**2,
        sd**2,
        mde,
        alpha=alpha,
        power=power,
        allocation=allocation,
        design=design,
        looks=looks,
        tau=tau,
    )


def sample_size_proportions(
    baseline: float, mde: float, *, alpha: float = 0.05, power: float = 0.8, allocation: float = 0.5
) -> int:
    """Samples in the smaller arm for the two-sided unpooled two-proportion z test to detect ``mde``.

    At an even split (the default) this is the per-arm n = (z_{1-alpha/2} + z_{power})^2 (p1 q1 + p2 q2)
    / mde^2 with p2 = baseline + mde.  ``allocation`` is the treatment's share; see :func:`sample_plan`.
    """
    if allocation == 0.5:
        return _ceil(_n_fixed_proportions(baseline, mde, alpha, power))
    return sample_plan_proportions(
        baseline, mde, alpha=alpha, power=power, allocation=allocation, design="fixedHorizon"
    ).smaller_arm


def sample_size_means(
    sd: float, mde: float, *, alpha: float = 0.05, power: float = 0.8, allocation: float = 0.5
) -> int:
    """Samples in the smaller arm for a two-sided two-sample test of means (per arm at an even split:
    2 (z_{1-alpha/2} + z_{power})^2 sd^2 / mde^2)."""
    if allocation == 0.5:
        return _ceil(_n_fixed_means(sd, mde, alpha, power))
    return sample_plan_means(
        sd, mde, alpha=alpha, power=power, allocation=allocation, design="fixedHorizon"
    ).smaller_arm


def sample_size_sequential_proportions(
    baseline: float,
    mde: float,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    looks: int | None = None,
    allocation: float = 0.5,
) -> int:
    """Per-arm sample cap (``max_samples``) giving the capped sequential test ``power`` at the MDE.

    At an even split this is also the per-arm count at the cap.  With another ``allocation`` it returns
    the smaller arm's count at the cap; the value to pass as ``max_samples`` is still the even-split one
    (see :class:`SamplePlan`).
    """
    if allocation == 0.5:
        return _ceil(
            _n_fixed_proportions(baseline, mde, alpha, power) * sequential_inflation(alpha, power, looks)
        )
    return sample_plan_proportions(
        baseline, mde, alpha=alpha, power=power, allocation=allocation, looks=looks
    ).smaller_arm


def sample_size_sequential_means(
    sd: float,
    mde: float,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    looks: int | None = None,
    allocation: float = 0.5,
) -> int:
    """Per-arm sample cap (``max_samples``) giving the capped sequential test ``power`` at the MDE; see
    :func:`sample_size_sequential_proportions` for ``allocation``."""
    if allocation == 0.5:
        return _ceil(_n_fixed_means(sd, mde, alpha, power) * sequential_inflation(alpha, power, looks))
    return sample_plan_means(
        sd, mde, alpha=alpha, power=power, allocation=allocation, looks=looks
    ).smaller_arm


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


def _bernoulli_variance(successes: float, trials: float) -> float:
    if trials <= 0:
        return 0.0
    p = successes / trials
    if 0.0 < p < 1.0:
        return p * (1.0 - p)
    # Observed rate of exactly 0 or 1: use (s + 1/2) / (n + 1) so one degenerate arm cannot hide a difference.
    q = 0.5 / (trials + 1.0)
    return q * (1.0 - q)


def _proportion_variance(d: ProportionData) -> float:
    return _bernoulli_variance(d.successes, d.trials)


def _proportion_summary(control: ProportionData, treatment: ProportionData, floor: bool) -> _Summary:
    """Per-arm estimates and variances.  ``floor``: each arm's variance is at least the pooled one.

    The floor is what keeps the sequential test valid on a small arm: its own variance estimate can be
    0 (no events yet) or far too small early on, while the pooled rate of both arms is estimated from
    all the data and is the right variance under the null hypothesis.
    """
    pc = control.successes / control.trials if control.trials > 0 else 0.0
    pt = treatment.successes / treatment.trials if treatment.trials > 0 else 0.0
    vc, vt = _proportion_variance(control), _proportion_variance(treatment)
    if floor:
        pooled = _bernoulli_variance(
            control.successes + treatment.successes, control.trials + treatment.trials
        )
        vc, vt = max(vc, pooled), max(vt, pooled)
    return _Summary(pc, pt, control.trials, treatment.trials, vc, vt, None, True)


def _mean_summary(control: MeanData, treatment: MeanData, floor: bool) -> _Summary:
    vc, vt = control.variance, treatment.variance
    df: float | None = None
    if control.count >= 2 and treatment.count >= 2:
        a, b = vc / control.count, vt / treatment.count
        if a + b > 0:
            df = (a + b) ** 2 / (a**2 / (control.count - 1) + b**2 / (treatment.count - 1))
    if floor:
        dof = max(control.count - 1, 0.0) + max(treatment.count - 1, 0.0)
        if dof > 0:
            pooled = (max(control.count - 1, 0.0) * vc + max(treatment.count - 1, 0.0) * vt) / dof
            vc, vt = max(vc, pooled), max(vt, pooled)
    return _Summary(control.mean, treatment.mean, control.count, treatment.count, vc, vt, df, False)


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
    allocation: float | None = None,
    labels: tuple[str, str] = ("control", "treatment"),
) -> ComparisonResult:
    """Compare success rates.  See module docstring and docs/statistics.md.

    ``margin`` (absolute, >= 0) is used only by ``nonInferiority``: pass when the treatment is shown to
    be no worse than ``margin`` in the ``better`` direction.  ``mde`` tunes the uncapped mSPRT mixture;
    ``max_samples`` (per arm at an even split, ideally from :func:`sample_size_sequential_proportions`)
    selects the capped sequential boundary.  ``allocation`` (treatment's share of the two arms' traffic
    from now on) is used only for ``more_samples_needed``.  ``labels`` name (control, treatment) in
    ``reason``.  ``sequential`` is exactly :func:`compare_proportions_stratified` with one stratum.
    """
    if not isinstance(control, ProportionData) or not isinstance(treatment, ProportionData):
        raise ValueError("control and treatment must be ProportionData")
    _check_options(alpha, method, better, test, margin, mde, max_samples)
    if method == "sequential":
        return compare_proportions_stratified(
            [(control, treatment)],
            alpha=alpha,
            better=better,
            test=test,
            margin=margin,
            mde=mde,
            max_samples=max_samples,
            allocation=allocation,
            labels=labels,
        )
    summary = _proportion_summary(control, treatment, floor=False)
    bayes: tuple[ProportionData, ProportionData] | None = (
        (control, treatment) if method == "bayesian" else None
    )
    return _compare(summary, alpha, method, better, test, margin, labels, bayes)


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
    allocation: float | None = None,
    labels: tuple[str, str] = ("control", "treatment"),
) -> ComparisonResult:
    """Compare means (e.g. latency, a score) from n, Σx, Σx².  Same options as :func:`compare_proportions`;
    ``fixedHorizon`` is Welch's t test; ``sequential`` is :func:`compare_means_stratified` with one
    stratum."""
    if not isinstance(control, MeanData) or not isinstance(treatment, MeanData):
        raise ValueError("control and treatment must be MeanData")
    _check_options(alpha, method, better, test, margin, mde, max_samples)
    if method == "sequential":
        return compare_means_stratified(
            [(control, treatment)],
            alpha=alpha,
            better=better,
            test=test,
            margin=margin,
            mde=mde,
            max_samples=max_samples,
            allocation=allocation,
            labels=labels,
        )
    return _compare(
        _mean_summary(control, treatment, floor=False), alpha, method, better, test, margin, labels, None
    )


def _threshold(better: Better, test: Test, margin: float) -> tuple[float, float]:
    sign = 1.0 if better == "higher" else -1.0
    return sign, (-sign * margin if test == "nonInferiority" else 0.0)


def _verdict_of(
    lo: float, hi: float, sign: float, threshold: float, test: Test, t_label: str
) -> tuple[Verdict, str]:
    good_side = lo > threshold if sign > 0 else hi < threshold
    bad_side = hi < threshold if sign > 0 else lo > threshold
    if test == "nonInferiority":
        limit = f"the margin {_fmt(threshold, True)}"
        if good_side:
            return "pass", f"{t_label} is not worse than {limit}"
        if bad_side:
            return "fail", f"{t_label} is worse than {limit}"
    else:
        if good_side:
            return "pass", f"{t_label} is better"
        if bad_side:
            return "fail", f"{t_label} is worse"
    return "inconclusive", "not enough evidence yet"


def _compare(
    s: _Summary,
    alpha: float,
    method: Method,
    better: Better,
    test: Test,
    margin: float,
    labels: tuple[str, str],
    bayes_props: tuple[ProportionData, ProportionData] | None,
) -> ComparisonResult:
    """The single-look methods: ``fixedHorizon`` and ``bayesian``."""
    c_label, t_label = labels
    diff = s.est_t - s.est_c
    sign, threshold = _threshold(better, test, margin)
    se = math.sqrt(s.var_c / s.n_c + s.var_t / s.n_t) if s.n_c > 0 and s.n_t > 0 else 0.0
    lo_bound, hi_bound = (-1.0, 1.0) if s.bounded else (-math.inf, math.inf)

    def result(lo: float, hi: float, p: float, verdict: Verdict, stat: str, why: str) -> ComparisonResult:
        level = f"{100 * (1 - alpha):.4g}%"
        kind = {"fixedHorizon": "CI", "bayesian": "CrI"}.get(method, "CS")
        reason = (
            f"{t_label} {_fmt(s.est_t)} vs {c_label} {_fmt(s.est_c)} (diff {_fmt(diff, True)}, "
            f"{level} {kind} [{_fmt(lo, True)}, {_fmt(hi, True)}], {stat}): {why}"
        )
        return ComparisonResult(s.est_c, s.est_t, s.n_c, s.n_t, diff, lo, hi, p, verdict, reason)

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
        if s.df is not None:
            crit = float(stats.t.ppf(1 - alpha / 2, s.df))
            p_value = float(2 * stats.t.sf(abs(z0), s.df))
        else:
            crit = float(stats.norm.ppf(1 - alpha / 2))
            p_value = float(2 * stats.norm.sf(abs(z0)))
        lo, hi = diff - crit * se, diff + crit * se
        stat = f"p={p_value:.2g}"
    lo, hi = max(lo, lo_bound), min(hi, hi_bound)
    verdict, why = _verdict_of(lo, hi, sign, threshold, test, t_label)
    return result(lo, hi, p_value, verdict, stat, why)


# --------------------------------------------------------------------------- stratified sequential test


def _check_cap(max_samples: float | None, max_information: float | None) -> None:
    if max_information is not None:
        _check_finite(max_information, "max_information")
        if max_information <= 0:
            raise ValueError(f"max_information must be > 0, got {max_information}")
        if max_samples is not None:
            raise ValueError("give max_samples or max_information, not both")


def information_cap(
    mde: float, *, alpha: float = 0.05, power: float = 0.8, looks: int | None = None
) -> float:
    """``max_information`` for the capped sequential test: power ``power`` at an absolute effect ``mde``.

    R (z_{1-alpha/2} + z_{power})^2 / mde^2 with R = :func:`sequential_inflation`.  It needs no baseline
    rate or variance, and no split: the information fraction is measured from the data, so the same
    cap serves every split and every ramp.  For a non-inferiority test use the margin as ``mde`` (the
    distance between the threshold and a candidate as good as stable).
    """
    _check_finite(mde, "mde")
    if mde == 0:
        raise ValueError("mde must be non-zero")
    return sequential_inflation(alpha, power, looks) * _z_sum(alpha, power) ** 2 / mde**2


def burn_in_smaller_arm(n_small: float, n_large: float) -> float:
    """Samples the smaller arm needs before the sequential test may decide: grows with the imbalance.

    ``MIN_SAMPLES_PER_ARM * sqrt(n_large / n_small)`` (at least ``MIN_SAMPLES_PER_ARM``), i.e. 20 at an
    even split, 60 at 10/90 and 87 at 5/95.  At a lopsided split the small arm carries almost all of
    the variance of the difference, so its mean and variance must be past the worst of their
    small-sample skew before a verdict; see docs/statistics.md.
    """
    if n_small <= 0:
        return float(MIN_SAMPLES_PER_ARM)
    return MIN_SAMPLES_PER_ARM * max(1.0, math.sqrt(n_large / n_small))


def _stratum_info(st: _Summary) -> float:
    """Information 1 / Var(difference) of one stratum (0 if the stratum has no usable data)."""
    if st.n_c <= 0 or st.n_t <= 0:
        return 0.0
    v = st.var_c / st.n_c + st.var_t / st.n_t
    return 1.0 / v if v > 0 else 0.0


def _strata_summaries(strata: Sequence[Any], kind: type, summarize: Any) -> list[Any]:
    """Each (control, treatment) pair of ``kind`` summarised with the variance floor; bad input named."""
    summaries = []
    for i, pair in enumerate(strata):
        if not isinstance(pair, tuple | list) or len(pair) != 2 or not all(isinstance(x, kind) for x in pair):
            raise ValueError(f"strata[{i}] must be a (control, treatment) pair of {kind.__name__}")
        summaries.append(summarize(pair[0], pair[1], floor=True))
    return summaries


def compare_proportions_stratified(
    strata: Sequence[tuple[ProportionData, ProportionData]],
    *,
    alpha: float = 0.05,
    better: Better = "higher",
    test: Test = "superiority",
    margin: float = 0.0,
    mde: float | None = None,
    max_samples: float | None = None,
    max_information: float | None = None,
    allocation: float | None = None,
    labels: tuple[str, str] = ("control", "treatment"),
) -> ComparisonResult:
    """Always-valid comparison of rates combined over strata (constant-weight epochs).

    ``strata``: one (control, treatment) pair of counts per epoch, in time order, each epoch's own
    counts (not cumulative across epochs).  Within each epoch both arms share the same time window and
    the same split, so a drift common to both arms cancels in the epoch's difference; the differences
    are combined with inverse-variance (Mantel-Haenszel-like) weights into one always-valid sequential
    test.  With one stratum this is ``compare_proportions(method="sequential")``.  ``allocation``: the
    treatment's share of the two arms' traffic from now on (default: its share in the last stratum),
    used for ``more_samples_needed``.

    Capped design: ``max_samples`` (per arm at an even split; the information fraction is the summed
    harmonic-mean samples over it) or ``max_information`` (the information fraction is the estimated
    information 1/Var(difference) over it; see :func:`information_cap`, which needs only the MDE).
    With neither: a ``nonInferiority`` test with ``margin`` > 0 and no ``mde`` is planned for 80% power
    at the margin (``max_information = information_cap(margin)``); otherwise the uncapped mixture SPRT
    (mixture sd ``mde``, or 0.1 per-observation sd).
    """
    _check_options(alpha, "sequential", better, test, margin, mde, max_samples)
    _check_cap(max_samples, max_information)
    summaries = _strata_summaries(strata, ProportionData, _proportion_summary)
    return _compare_sequential(
        summaries, alpha, better, test, margin, mde, max_samples, max_information, allocation, labels
    )


def compare_means_stratified(
    strata: Sequence[tuple[MeanData, MeanData]],
    *,
    alpha: float = 0.05,
    better: Better = "higher",
    test: Test = "superiority",
    margin: float = 0.0,
    mde: float | None = None,
    max_samples: float | None = None,
    max_information: float | None = None,
    allocation: float | None = None,
    labels: tuple[str, str] = ("control", "treatment"),
) -> ComparisonResult:
    """Always-valid comparison of means combined over strata; see :func:`compare_proportions_stratified`."""
    _check_options(alpha, "sequential", better, test, margin, mde, max_samples)
    _check_cap(max_samples, max_information)
    summaries = _strata_summaries(strata, MeanData, _mean_summary)
    return _compare_sequential(
        summaries, alpha, better, test, margin, mde, max_samples, max_information, allocation, labels
    )


def compare_variants_stratified(
    strata: Sequence[Mapping[str, ProportionData | MeanData]],
    control: str,
    *,
    alpha: float = 0.05,
    better: Better = "higher",
    test: Test = "superiority",
    margin: float = 0.0,
    mde: float | None = None,
    max_samples: float | None = None,
    max_information: float | None = None,
    holm_adjust: bool = True,
) -> dict[str, ComparisonResult]:
    """Every variant against ``control``, each combined over allocation epochs; Holm-adjusted p-values.

    ``strata``: one mapping {variant: its counts in that epoch} per epoch (an epoch is a period with a
    constant split, e.g. between two Thompson-sampling updates; epochs with the same split may be
    merged).  A variant missing from an epoch, or with no traffic in it, simply contributes nothing
    from that epoch.  Returns {variant: ComparisonResult} for every variant except the control; with
    ``holm_adjust`` the ``p_value`` is Holm-adjusted over the variants and the verdict is decisive only
    when the adjusted p-value is <= alpha (the interval stays the unadjusted (1 - alpha) one).
    """
    names: list[str] = []
    for epoch in strata:
        for n in epoch:
            if n != control and n not in names:
                names.append(n)
    out: dict[str, ComparisonResult] = {}
    for n in names:
        pairs = [(e[control], e[n]) for e in strata if control in e and n in e]
        kinds = {type(x) for p in pairs for x in p}
        if kinds <= {ProportionData}:
            out[n] = compare_proportions_stratified(
                pairs,  # type: ignore[arg-type]
                alpha=alpha,
                better=better,
                test=test,
                margin=margin,
                mde=mde,
                max_samples=max_samples,
                max_information=max_information,
                labels=(control, n),
            )
        elif kinds <= {MeanData}:
            out[n] = compare_means_stratified(
                pairs,  # type: ignore[arg-type]
                alpha=alpha,
                better=better,
                test=test,
                margin=margin,
                mde=mde,
                max_samples=max_samples,
                max_information=max_information,
                labels=(control, n),
            )
        else:
            raise ValueError(f"variant {n!r} and the control {control!r} must have data of the same type")
    if holm_adjust and len(out) > 1:
        adjusted = holm([r.p_value for r in out.values()])
        for (n, r), p in zip(list(out.items()), adjusted, strict=True):
            verdict: Verdict = r.verdict if p <= alpha else "inconclusive"
            reason = r.reason + f"; Holm-adjusted p = {p:.3g} over {len(out)} variants"
            out[n] = replace(r, p_value=p, verdict=verdict, reason=reason)
    return out


def _compare_sequential(
    strata: list[_Summary],
    alpha: float,
    better: Better,
    test: Test,
    margin: float,
    mde: float | None,
    max_samples: float | None,
    max_information: float | None,
    allocation: float | None,
    labels: tuple[str, str],
) -> ComparisonResult:
    # Longer than ~80 lines on purpose: one test. The pooled estimates, the information, the design's
    # fraction u and the mixture's tau all feed both the burn-in answer and the interval; split, the
    # pieces would hand a dozen numbers to each other.
    c_label, t_label = labels
    sign, threshold = _threshold(better, test, margin)
    bounded = all(s.bounded for s in strata) if strata else True
    lo_bound, hi_bound = (-1.0, 1.0) if bounded else (-math.inf, math.inf)
    n_c = float(sum(s.n_c for s in strata))
    n_t = float(sum(s.n_t for s in strata))
    est_c = sum(s.est_c * s.n_c for s in strata) / n_c if n_c > 0 else 0.0
    raw_t = sum(s.est_t * s.n_t for s in strata) / n_t if n_t > 0 else 0.0
    infos = [_stratum_info(s) for s in strata]
    info = float(sum(infos))
    if info > 0:
        diff = sum(w * (s.est_t - s.est_c) for w, s in zip(infos, strata, strict=True)) / info
    else:
        diff = raw_t - est_c
    # One stratum: the raw treatment estimate.  Several: the control's pooled estimate plus the
    # within-epoch difference, so that difference = treatment - control still holds.
    est_t = raw_t if len(strata) <= 1 else est_c + diff
    n_small, n_large = min(n_c, n_t), max(n_c, n_t)
    need = burn_in_smaller_arm(n_small, n_large)
    epochs = f" over {len(strata)} epochs" if len(strata) > 1 else ""
    # Information fraction of the capped design: harmonic-mean samples (per-arm samples at an even split
    # carrying the same information), summed over strata.
    if (
        max_samples is None
        and max_information is None
        and mde is None
        and test == "nonInferiority"
        and margin > 0
    ):
        # A margin says which effect matters: plan the capped design for power at it.
        max_information = information_cap(margin, alpha=alpha, power=DEFAULT_POWER, looks=DEFAULT_PLAN_LOOKS)
    u: float | None = None
    if max_samples is not None:
        u = sum(2.0 * s.n_c * s.n_t / (s.n_c + s.n_t) for s in strata if s.n_c + s.n_t > 0) / max_samples
    elif max_information is not None:
        u = info / max_information
    tau = _mixture_sd(strata, mde)

    def result(
        lo: float,
        hi: float,
        p: float,
        verdict: Verdict,
        stat: str,
        why: str,
        more: tuple[float, float] | None,
    ) -> ComparisonResult:
        reason = (
            f"{t_label} {_fmt(est_t)} vs {c_label} {_fmt(est_c)} (diff {_fmt(diff, True)}{epochs}, "
            f"{100 * (1 - alpha):.4g}% CS [{_fmt(lo, True)}, {_fmt(hi, True)}], {stat}): {why}"
        )
        if verdict == "inconclusive" and more is not None:
            reason += f"; about {more[0]:.0f} more samples ({more[1]:.0f} in the smaller arm) to decide"
        return ComparisonResult(
            control_estimate=est_c,
            treatment_estimate=est_t,
            control_n=n_c,
            treatment_n=n_t,
            difference=diff,
            ci_low=lo,
            ci_high=hi,
            p_value=p,
            verdict=verdict,
            reason=reason,
            more_samples_needed=None if more is None else more[0],
            more_samples_smaller_arm=None if more is None else more[1],
            information_fraction=u,
            strata=len(strata),
        )

    rate = _info_rate(strata, allocation)
    ref = margin if test == "nonInferiority" and margin > 0 else mde

    if n_small < need or not info > 0:
        why = (
            f"not enough data yet ({c_label} n={n_c:g}, {t_label} n={n_t:g}; the smaller arm needs "
            f"{math.ceil(need)} at this split, and some variation)"
        )
        more = None
        if rate is not None:
            # Not before the burn-in ends: search for the decisive information from there on.
            share = min(rate[1], 1.0 - rate[1])
            burn = max(0.0, need - n_small) / share if share > 0 else math.inf
            if info > 0 and math.isfinite(burn):
                dist = abs(diff - threshold)
                dist = max(dist, ref) if ref is not None else dist
                start = 1.0 + burn * rate[0] / info
                more = _more_samples(dist, info, u, alpha, tau, rate, start)
            elif math.isfinite(burn):
                more = (burn, burn * share)
        return result(lo_bound, hi_bound, 1.0, "inconclusive", "p=1", why, more)

    se = math.sqrt(1.0 / info)
    z0 = (diff - threshold) / se
    if u is not None:
        half = _critical_z_scalar(u, alpha) * se
        p_value = _sequential_p_value(abs(z0), u)
    else:
        half, p_value = _msprt(diff - threshold, se, alpha, tau)
    lo, hi = max(diff - half, lo_bound), min(diff + half, hi_bound)
    verdict, why = _verdict_of(lo, hi, sign, threshold, test, t_label)
    more = None
    if verdict == "inconclusive" and rate is not None:
        dist = abs(diff - threshold)
        dist = max(dist, ref) if ref is not None else dist
        more = _more_samples(dist, info, u, alpha, tau, rate)
    return result(lo, hi, p_value, verdict, f"p={p_value:.2g}", why, more)


def _info_rate(strata: list[_Summary], allocation: float | None) -> tuple[float, float] | None:
    """(information per additional sample, treatment share) at the current split; None if unknown."""
    if not strata:
        return None
    last = strata[-1]
    w = allocation
    if w is None:
        tot = last.n_c + last.n_t
        if tot <= 0:
            return None
        w = last.n_t / tot
    if not 0.0 < w < 1.0:
        return None
    var_c, var_t = last.var_c, last.var_t
    if not (var_c > 0 and var_t > 0):
        ws = [s for s in strata if s.var_c > 0 and s.var_t > 0]
        if not ws:
            return None
        var_c, var_t = ws[-1].var_c, ws[-1].var_t
    return 1.0 / (var_c / (1.0 - w) + var_t / w), w


def _critical_z_scalar(u: float, alpha: float) -> float:
    """Scalar :func:`sequential_critical_z` (no numpy overhead: it runs inside search loops)."""
    if u <= 0:
        return math.inf
    a = sequential_intercept(alpha)
    b = SEQUENTIAL_SLOPE
    w = a + b * u if u <= 1.0 else a + b + POST_CAP_JUMP + POST_CAP_SLOPE * (u - 1.0)
    return w / math.sqrt(u)


def _half_width(info: float, u_per_info: float | None, alpha: float, tau: float) -> float:
    se = math.sqrt(1.0 / info)
    if u_per_info is not None:
        return _critical_z_scalar(u_per_info * info, alpha) * se
    return _msprt(0.0, se, alpha, tau)[0]


def _more_samples(
    dist: float,
    info: float,
    u: float | None,
    alpha: float,
    tau: float,
    rate: tuple[float, float],
    start: float = 1.0,
) -> tuple[float, float] | None:
    """Samples (total, smaller arm) until the interval half-width shrinks to ``dist``.

    ``start``: search from ``start`` times the current information on (the burn-in's end).

    That is when an estimate ``dist`` away from the threshold would be decisive: the expected wait if
    the true difference were the current estimate (or the margin/MDE when that is further away).
    None when no amount of data gets there (a zero distance, or past the cap of a capped design whose
    boundary then rises faster than the evidence).
    """
    if not dist > 0 or not info > 0:
        return None
    u_per_info = None if u is None else u / info
    per_sample, w = rate
    if _half_width(info * start, u_per_info, alpha, tau) <= dist:
        total = info * (start - 1.0) / per_sample
        return total, total * min(w, 1.0 - w)
    lo_f, hi_f = start, None
    f = start
    if u_per_info is not None and u is not None and u * start < 1.0:
        # The capped boundary's half-width falls until the cap and jumps up just after it: look for
        # the first crossing before the cap first (a monotone stretch), and only then beyond it.
        to_cap = (1.0 - 1e-9) / u
        if _half_width(info * to_cap, u_per_info, alpha, tau) <= dist:
            hi_f = to_cap
        else:
            lo_f = f = 1.0 / u
    for _ in range(0 if hi_f is not None else 40):  # geometric search up to ~1e12 times the information
        f *= 2.0
        if _half_width(info * f, u_per_info, alpha, tau) <= dist:
            hi_f = f
            break
        lo_f = f
    if hi_f is None:
        return None
    for _ in range(24):  # to a relative precision of about 2**-24 of the doubling step
        mid = math.sqrt(lo_f * hi_f)
        if _half_width(info * mid, u_per_info, alpha, tau) <= dist:
            hi_f = mid
        else:
            lo_f = mid
    total = info * (hi_f - 1.0) / per_sample
    return total, total * min(w, 1.0 - w)


def _mixture_sd(strata: Sequence[_Summary], mde: float | None) -> float:
    if mde is not None:
        return abs(mde)
    n = sum(s.n_c + s.n_t for s in strata)
    if n <= 0:
        return 0.0
    var = sum((s.n_c + s.n_t) * (s.var_c + s.var_t) / 2.0 for s in strata) / n
    return DEFAULT_MIXTURE_EFFECT * math.sqrt(var)


def _msprt(delta: float, se: float, alpha: float, tau: float) -> tuple[float, float]:
    """Normal-mixture SPRT (Johari et al.) for a difference with standard error ``se``.

    Mixing theta ~ N(0, tau^2) over the likelihood ratio of the estimate gives the martingale
    Lambda = sqrt(V / (V + tau^2)) exp(tau^2 delta^2 / (2 V (V + tau^2))), V = se^2.  Returns the
    always-valid interval half-width {delta : Lambda < 1/alpha} and the p-value min(1, 1/Lambda).
    """
    v = se * se
    t2 = tau * tau
    if not t2 > 0:
        return math.inf, 1.0
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

    Fixed-horizon: valid when checked once.  For a check repeated every interval use
    :func:`srm_sequential`, which stays valid under continuous monitoring.

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


#: Dirichlet concentration of the SRM mixture: the prior on the true split is Dirichlet(A * weights), so a
#: two-arm share varies around its configured value with sd sqrt(w (1 - w) / (A + 1)), about 0.9
#: percentage points at 50/50: the size of mismatch that matters in practice.
SRM_CONCENTRATION = 3000.0


def _srm_arms(observed: Sequence[float], weights: Sequence[float]) -> tuple[list[float], list[float]] | float:
    """Validated (counts, shares) of the arms with weight, or a p-value when there is nothing to test."""
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
    if len(kept) < 2 or sum(o for o, _ in kept) <= 0:
        return 1.0
    wsum = sum(wi for _, wi in kept)
    return [o for o, _ in kept], [wi / wsum for _, wi in kept]


def srm_log_bayes_factor(
    observed: Sequence[float], weights: Sequence[float], *, concentration: float = SRM_CONCENTRATION
) -> float:
    """log Bayes factor of "the split is not ``weights``" against "it is", Dirichlet-multinomial mixture.

    BF = Gamma(A) / Gamma(A + n) * prod_i Gamma(a_i + x_i) / Gamma(a_i) / prod_i p_i^x_i with
    a_i = A p_i.  Under the configured split it is a nonnegative martingale with mean 1 in the number of
    requests (Lindon & Malek 2022), so by Ville's inequality P(ever BF >= 1/alpha) <= alpha.
    """
    _check_finite(concentration, "concentration")
    if concentration <= 0:
        raise ValueError(f"concentration must be > 0, got {concentration}")
    arms = _srm_arms(observed, weights)
    if isinstance(arms, float):
        return math.inf if arms == 0.0 else 0.0
    x, p = arms
    a = [concentration * pi for pi in p]
    n = sum(x)
    out = math.lgamma(concentration) - math.lgamma(concentration + n)
    for xi, ai, pi in zip(x, a, p, strict=True):
        out += math.lgamma(ai + xi) - math.lgamma(ai) - xi * math.log(pi)
    return out


def srm_sequential(
    observed: Sequence[float],
    weights: Sequence[float],
    *,
    horizon: float | None = None,
    concentration: float = SRM_CONCENTRATION,
) -> float:
    """Anytime-valid sample-ratio-mismatch p-value: safe to check at every interval.

    Without ``horizon``: p = min(1, 1 / BF) of :func:`srm_log_bayes_factor` (Lindon & Malek 2022), valid
    however often it is looked at, for ever.  With ``horizon`` (the number of requests by which a
    mismatch should be caught, e.g. the planned sample size): p = min(1, 2 min(p_mixture, p_linear)),
    where p_linear is the capped linear-boundary test of :func:`sequential_critical_z` on each arm's
    share (Bonferroni over arms when there are more than two), with information fraction
    n / ``horizon``; it is also valid for ever (the boundary continues past the horizon) and is more
    powerful near the horizon.  ``observed`` must count from when the split last changed (an epoch):
    the configured ``weights`` have to hold for all of it.  Same conventions as :func:`srm_test` for
    zero weights, no traffic and single arms.
    """
    arms = _srm_arms(observed, weights)
    if isinstance(arms, float):
        return arms
    log_bf = srm_log_bayes_factor(observed, weights, concentration=concentration)
    p_mix = 1.0 if log_bf <= 0 else math.exp(-log_bf)
    if horizon is None:
        return min(1.0, p_mix)
    _check_finite(horizon, "horizon")
    if horizon <= 0:
        raise ValueError(f"horizon must be > 0, got {horizon}")
    x, p = arms
    n = sum(x)
    u = n / horizon
    tests = x[:1] if len(x) == 2 else x
    shares = p[:1] if len(x) == 2 else p
    p_lin = min(
        _sequential_p_value(abs(xi - n * pi) / math.sqrt(n * pi * (1.0 - pi)), u)
        for xi, pi in zip(tests, shares, strict=True)
    )
    p_lin = min(1.0, p_lin * len(tests))
    return min(1.0, 2.0 * min(p_mix, p_lin))


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
