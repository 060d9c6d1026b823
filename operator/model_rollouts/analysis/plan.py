"""Plan before ramping: when will a comparison decide, at the observed rate, along the planned weights?

The sequential statistics already say how many more samples (both arms, at the current split) a
comparison needs before its interval is narrow enough to decide (``moreSamplesNeeded``). This module
turns that into seconds: the observed per-arm rates (samples per second in the current epoch), each
scaled to a planned weight (the candidate's rate grows with its weight, the baseline's with the rest),
give the rate at which the comparison's information grows there. Walking the remaining planned
segments (weight, seconds) and then the hold before full traffic gives the expected time to a decision;
when it exceeds the time the rollout has (the segments plus what is left of ``progressDeadline``), the
plan is infeasible and the rollout says so at once instead of at the deadline.

Pure: no I/O, no clock. Information of a difference of two means with equal per-sample variance grows
at ``1 / (1/r_baseline + 1/r_candidate)``, so that is the rate compared across weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

from model_rollouts.analysis import sequential, stats


@dataclass(frozen=True)
class Segment:
    """A stretch of the plan: ``seconds`` at candidate weight ``weight`` (percent)."""

    weight: int
    seconds: float


@dataclass(frozen=True)
class Rates:
    """Observed samples per second of each arm at candidate weight ``weight`` (percent)."""

    weight: int
    baseline: float
    candidate: float

    @classmethod
    def observed(cls, weight: int, n_baseline: float, n_candidate: float, seconds: float) -> Rates | None:
        """From counts over ``seconds``; None when a rate cannot be told (no time or no samples)."""
        if not 0 < weight < 100 or not seconds > 0 or not n_baseline > 0 or not n_candidate > 0:
            return None
        return cls(weight, n_baseline / seconds, n_candidate / seconds)

    @property
    def total(self) -> float:
        return self.baseline + self.candidate

    def at(self, weight: int) -> Rates:
        """The rates at another weight: each arm's rate scales with its share of the traffic."""
        w0, w1 = self.weight / 100.0, weight / 100.0
        return Rates(weight, self.baseline * (1.0 - w1) / (1.0 - w0), self.candidate * w1 / w0)

    def information(self) -> float:
        """Relative growth of a difference's information (per-sample variance 1 in both arms)."""
        if self.baseline <= 0 or self.candidate <= 0:
            return 0.0
        return 1.0 / (1.0 / self.baseline + 1.0 / self.candidate)


@dataclass(frozen=True)
class Estimate:
    """Expected time to a decision of one comparison."""

    #: Seconds of sampling at the current weight that the comparison still needs.
    seconds_here: float
    #: Expected seconds from now to a decision along the plan (segments, then the hold).
    seconds: float
    #: The time the plan has: the segments plus what is left of progressDeadline.
    budget: float
    #: Seconds to a decision if all remaining evidence were gathered at each planned weight.
    at_weights: dict[int, float]

    @property
    def feasible(self) -> bool:
        return self.seconds <= self.budget


def estimate(
    more_samples: float,
    rates: Rates,
    segments: Sequence[Segment],
    hold_weight: int,
    hold_seconds: float,
) -> Estimate:
    """Expected seconds to a decision needing ``more_samples`` (both arms, at the current split).

    ``segments``: the planned stretches before the promotion gate (timed steps, one analysis interval
    per intermediate weight); ``hold_weight``/``hold_seconds``: the weight held before full traffic and
    what is left of progressDeadline there.
    """
    here = max(0.0, more_samples) / rates.total
    base = rates.information()
    work = here  # in seconds of sampling at the current weight
    t = 0.0
    seconds: float | None = None
    for seg in segments:
        speed = rates.at(seg.weight).information() / base if 0 < seg.weight < 100 else 0.0
        if speed > 0 and work <= seg.seconds * speed:
            seconds = t + work / speed
            break
        work -= seg.seconds * speed
        t += seg.seconds
    if seconds is None:
        speed = rates.at(hold_weight).information() / base if 0 < hold_weight < 100 else 0.0
        seconds = t + work / speed if speed > 0 else math.inf
    weights = {rates.weight, hold_weight, *(s.weight for s in segments)}
    at = {w: here * base / rates.at(w).information() for w in sorted(weights) if 0 < w < 100}
    budget = sum(s.seconds for s in segments) + max(0.0, hold_seconds)
    return Estimate(seconds_here=here, seconds=seconds, budget=budget, at_weights=at)


def equal_candidate(
    strata: Sequence[tuple[stats.ProportionData | stats.MeanData, stats.ProportionData | stats.MeanData]],
) -> list[tuple[stats.ProportionData | stats.MeanData, stats.ProportionData | stats.MeanData]]:
    """The same samples per arm and epoch, with the candidate's estimate set to the baseline's.

    A non-inferiority plan asks what a healthy candidate needs (its interval must shrink to the
    margin), not what the current estimate needs: early estimates are noisy, and a lucky one would
    promise a decision that a candidate equal to stable does not get in time. The statistics' own
    ``more_samples_needed`` on these strata is that need (the candidate keeps its own variance).
    """
    out: list[tuple[stats.ProportionData | stats.MeanData, stats.ProportionData | stats.MeanData]] = []
    for base, cand in strata:
        if isinstance(base, stats.ProportionData) and isinstance(cand, stats.ProportionData):
            rate = base.successes / base.trials if base.trials > 0 else 0.0
            out.append((base, stats.ProportionData(rate * cand.trials, cand.trials)))
        elif isinstance(base, stats.MeanData) and isinstance(cand, stats.MeanData) and cand.count > 0:
            n, mean = cand.count, base.mean
            squares = cand.variance * (n - 1) + n * mean * mean
            out.append((base, stats.MeanData(n, n * mean, squares)))
        else:
            out.append((base, cand))
    return out


#: A feasible plan promises a decision for a healthy candidate with this probability, not a coin flip.
#: nonInferiority plans for a candidate equal to stable at the design's own power (the information
#: where its final estimate, at its lower 20% quantile, still passes); superiority plans from the
#: estimate so far, whose own uncertainty (a lucky early estimate) needs the stricter 95%. Measured by
#: ``make bench-stats`` (tests/bench/bench_plan.py): the share of feasible plans that end undecided.
DECISION_PROBABILITY = stats.DEFAULT_POWER
PREDICTIVE_PROBABILITY = 0.95
Pair = tuple[stats.ProportionData | stats.MeanData, stats.ProportionData | stats.MeanData]


def _variance(d: stats.ProportionData | stats.MeanData) -> float:
    if isinstance(d, stats.ProportionData):
        p = d.successes / d.trials if d.trials > 0 else 0.0
        return p * (1.0 - p)
    return d.variance if d.count >= 2 else 0.0


def information(strata: Sequence[Pair]) -> float:
    """1 / Var(difference) over the strata (inverse-variance combined; 0 when nothing is known)."""
    total = 0.0
    for base, cand in strata:
        nb, nc = _count(base), _count(cand)
        v = max(_variance(base), _variance(cand))  # the larger arm variance: the test floors the smaller
        if nb > 0 and nc > 0 and v > 0:
            total += 1.0 / (v / nb + v / nc)
    return total


def _count(d: stats.ProportionData | stats.MeanData) -> float:
    return d.trials if isinstance(d, stats.ProportionData) else d.count


def _scaled(d: stats.ProportionData | stats.MeanData, f: float) -> stats.ProportionData | stats.MeanData:
    if isinstance(d, stats.ProportionData):
        return stats.ProportionData(d.successes * f, d.trials * f)
    return stats.MeanData(d.count * f, d.total * f, d.sum_squares * f)


def _shifted(d: stats.ProportionData | stats.MeanData, delta: float) -> stats.ProportionData | stats.MeanData:
    """The same samples with the estimate moved by ``delta`` (a mean keeps its variance)."""
    if isinstance(d, stats.ProportionData):
        rate = d.successes / d.trials if d.trials > 0 else 0.0
        return stats.ProportionData(min(max(rate + delta, 0.0), 1.0) * d.trials, d.trials)
    if d.count <= 0:
        return d
    n, mean = d.count, d.mean + delta
    return stats.MeanData(n, n * mean, _variance(d) * (n - 1) + n * mean * mean)


def decisive_samples(
    test: sequential.SequentialSpec,
    strata: Sequence[Pair],
    *,
    predictive: bool,
    probability: float = DECISION_PROBABILITY,
    verdict: Callable[[list[Pair]], str] | None = None,
) -> float | None:
    """More samples (both arms, at the current split) until the test passes with ``probability``.

    Future samples join the current (last) stratum. At information I the final estimate is taken at
    its lower ``1 - probability`` quantile: the current estimate minus z sd, with sd = 1/sqrt(I) (the
    truth is the strata's estimate, e.g. a candidate equal to stable) or, ``predictive``, the
    predictive sd given the estimate so far (the truth itself is uncertain: sd tends to the current
    standard error, so an estimate within z standard errors of the threshold never plans a pass).
    The statistics' own test (``sequential.compare``, or ``verdict`` when given: e.g. a segment's
    design) then says whether that estimate passes there.
    ``math.inf`` when no amount of data (up to a million times the current) gets there; None when
    the current samples carry no information yet (no variance: it cannot be told).
    """
    z = NormalDist().inv_cdf(probability)
    sign = 1.0 if test.better == "higher" else -1.0
    now = information(strata)
    if not now > 0 or not strata:
        return None

    def passes(f: float) -> bool:
        grown = [*strata[:-1], (_scaled(strata[-1][0], f), _scaled(strata[-1][1], f))]
        info = information(grown)
        if predictive:
            sd = math.sqrt((info - now) ** 2 / (info * info * now) + (info - now) / (info * info))
        else:
            sd = 1.0 / math.sqrt(info)
        low = [(b, _shifted(c, -sign * z * sd)) for b, c in grown]
        try:
            return (verdict(low) if verdict else sequential.compare(test, low).verdict) == "pass"
        except ValueError:
            return False

    # Geometric steps (the capped boundary jumps up after its cap, so doubling could step over the
    # stretch where it passes), then bisection between the last miss and the first pass.
    lo, hi = 1.0, None
    if passes(1.0):
        return 0.0
    f = 1.0
    while f < 1e6:
        f *= 1.25
        if passes(f):
            hi = f
            break
        lo = f
    if hi is None:
        return math.inf
    for _ in range(16):
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if passes(mid) else (mid, hi)
    return (hi - 1.0) * (_count(strata[-1][0]) + _count(strata[-1][1]))


def human(seconds: float) -> str:
    """A duration for a message: 45s, 12m, 3.5h, 4.2d."""
    if not math.isfinite(seconds):
        return "never"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"
