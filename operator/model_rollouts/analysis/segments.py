"""Per-segment (cohort) comparison: "no cohort left behind". Pure: no I/O.

A pooled comparison can pass while one cohort (a region, a device class) is clearly harmed: a
candidate better for most users and worse for a few, or Simpson's paradox when the cohorts' shares
differ between the arms. This judge runs the same anytime-valid non-inferiority comparison as a pooled
comparison (``engine.stats.compare_*_stratified``, epochs as strata) inside every segment and decides:

* **fail** when any segment is harmed beyond the margin. Each segment's harm p-value is the
  comparison's anytime-valid p-value when its estimate is on the bad side of the margin (1 otherwise);
  the p-values are Holm-adjusted across the judged segments. A p-value valid at every look stays valid
  for its running minimum, and Holm is valid for any dependence, so the chance that an unharmed
  segment is ever called harmed is at most ``alpha`` over all segments and all looks.
* **pass** when every judged segment shows non-inferiority on its own (its (1 - alpha) confidence
  sequence lies above the margin). This is an intersection-union test: a candidate harmed in any
  one segment passes with probability at most ``alpha`` (no correction is needed for that side).
* a segment whose smaller arm has fewer than ``min_samples`` is **tooSmall**: reported as such, never
  a pass and never a fail. With ``too_small="hold"`` (the default) it holds the verdict at
  inconclusive: a candidate is not passed while a cohort cannot be judged (a harmed segment that is
  merely slower to fill than the others would otherwise slip through). With ``"ignore"`` it is left
  out of the decision (the user's ``minSamples`` then says which cohorts are big enough to matter).
  When every segment is too small the verdict is inconclusive.

The price of the per-segment pass is power: each segment must show non-inferiority with its own share
of the data, so with k equal segments a healthy candidate needs about k times the samples of a pooled
comparison (measured in ``make bench-stats``, scenario ``segments``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from model_rollouts.analysis import stats
from model_rollouts.analysis.judge import Judge
from model_rollouts.analysis.vocabulary import Finding
from model_rollouts.api.common import Verdict
from model_rollouts.api.segments import SegmentRow, Segments

Data = stats.ProportionData | stats.MeanData
SegmentStatus = Literal["pass", "fail", "inconclusive", "tooSmall"]
TooSmall = Literal["hold", "ignore"]

#: Samples the smaller arm of a segment needs before the segment is judged at all.
DEFAULT_MIN_SAMPLES = 200
#: Name of the segment that collects the values left out by ``values`` or ``top``.
OTHER = "(other)"


@dataclass(frozen=True)
class SegmentFinding:
    """One segment's row of the table."""

    segment: str
    status: SegmentStatus
    comparison: stats.ComparisonResult
    #: Anytime-valid p-value of "harmed beyond the margin" (1 when the estimate is on the good side).
    harm_p_value: float
    #: ``harm_p_value`` Holm-adjusted over the judged segments (1 for a segment too small to judge).
    adjusted_p_value: float
    reason: str

    @property
    def smaller_arm(self) -> float:
        return min(self.comparison.control_n, self.comparison.treatment_n)


@dataclass(frozen=True)
class SegmentsResult:
    """The judge's verdict over all segments, the per-segment table and the pooled comparison."""

    verdict: stats.Verdict
    segments: tuple[SegmentFinding, ...]
    pooled: stats.ComparisonResult
    reason: str

    @property
    def harmed(self) -> tuple[str, ...]:
        return tuple(f.segment for f in self.segments if f.status == "fail")

    @property
    def too_small(self) -> tuple[str, ...]:
        return tuple(f.segment for f in self.segments if f.status == "tooSmall")


def select_segments(
    data: Mapping[str, Sequence[tuple[Data, Data]]],
    *,
    values: Sequence[str] | None = None,
    top: int | None = None,
) -> dict[str, list[tuple[Data, Data]]]:
    """Keep the segments named in ``values`` (in that order), or the ``top`` segments by traffic.

    What is left out is merged, epoch by epoch, into one segment named :data:`OTHER` (so no traffic
    escapes the judge). With neither option every segment is kept, sorted by name.
    """
    if values is not None and top is not None:
        raise ValueError("give values or top, not both")
    if top is not None and top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    names = sorted(data)
    if values is not None:
        kept = [v for v in values if v in data]
    elif top is not None:
        kept = sorted(names, key=lambda n: (-_traffic(data[n]), n))[:top]
    else:
        kept = names
    out = {n: list(data[n]) for n in kept}
    rest = [n for n in names if n not in out]
    if rest:
        out[OTHER] = _pool([data[n] for n in rest])
    return out


def _traffic(strata: Sequence[tuple[Data, Data]]) -> float:
    return sum(_n(c) + _n(t) for c, t in strata)


def _n(d: Data) -> float:
    return d.trials if isinstance(d, stats.ProportionData) else d.count


def segment_key(name: str, value: str) -> str:
    """Where a segment's counts are kept next to its comparison's (``status.epochs``, observations)."""
    return f"{name}/{value}"


def add(a: Data, b: Data) -> Data:
    """Two arms' counts of the same kind, summed."""
    return _add(a, b)


def _add(a: Data, b: Data) -> Data:
    if isinstance(a, stats.ProportionData) and isinstance(b, stats.ProportionData):
        return stats.ProportionData(a.successes + b.successes, a.trials + b.trials)
    if isinstance(a, stats.MeanData) and isinstance(b, stats.MeanData):
        return stats.MeanData(a.count + b.count, a.total + b.total, a.sum_squares + b.sum_squares)
    raise ValueError("all segments must have data of the same type")


def _pool(groups: Sequence[Sequence[tuple[Data, Data]]]) -> list[tuple[Data, Data]]:
    """Sum several segments epoch by epoch (epoch i of every segment is the same time span)."""
    depth = max((len(g) for g in groups), default=0)
    out: list[tuple[Data, Data]] = []
    for i in range(depth):
        pairs = [g[i] for g in groups if i < len(g)]
        c, t = pairs[0]
        for c2, t2 in pairs[1:]:
            c, t = _add(c, c2), _add(t, t2)
        out.append((c, t))
    return out


def _compare(
    strata: Sequence[tuple[Data, Data]],
    *,
    alpha: float,
    better: stats.Better,
    margin: float,
    max_information: float | None,
    labels: tuple[str, str],
) -> stats.ComparisonResult:
    kinds = {type(x) for pair in strata for x in pair}
    fn = stats.compare_means_stratified if kinds == {stats.MeanData} else stats.compare_proportions_stratified
    if not kinds <= {stats.ProportionData} and kinds != {stats.MeanData}:
        raise ValueError("a segment's arms must have data of the same type")
    return fn(
        strata,  # type: ignore[arg-type]
        alpha=alpha,
        better=better,
        test="nonInferiority",
        margin=margin,
        max_information=max_information,
        labels=labels,
    )


def _harm_p(c: stats.ComparisonResult, better: stats.Better, margin: float) -> float:
    """The comparison's p-value for its threshold when the estimate is on the harmful side, else 1."""
    threshold = -margin if better == "higher" else margin
    bad = c.difference < threshold if better == "higher" else c.difference > threshold
    return c.p_value if bad else 1.0


def segment_information_cap(margin: float, segments: int, alpha: float = 0.05) -> float:
    """Each segment's capped design: power ``DEFAULT_POWER ** (1 / segments)`` at the margin.

    A candidate passes only when every segment passes, so with k segments each planned for 80% power
    the chance that all k pass by their caps would be about 0.8^k (0.41 for four). Planning each for
    0.8^(1/k) (0.946 for four) keeps the joint power near 80%, for about 1.6 times the samples per
    segment of the 80% plan.
    """
    power = stats.DEFAULT_POWER ** (1.0 / max(1, segments))
    return stats.information_cap(margin, alpha=alpha, power=power, looks=stats.DEFAULT_PLAN_LOOKS)


def judge_segments(
    data: Mapping[str, Sequence[tuple[Data, Data]]],
    *,
    margin: float,
    better: stats.Better = "higher",
    alpha: float = 0.05,
    min_samples: float = DEFAULT_MIN_SAMPLES,
    max_information: float | None = None,
    labels: tuple[str, str] = ("stable", "candidate"),
    too_small: TooSmall = "hold",
) -> SegmentsResult:
    """Judge every segment; see the module docstring for the rule.

    ``data``: {segment: [(baseline, candidate) per epoch, in time order]}, each epoch's own counts (as
    for :func:`engine.stats.compare_proportions_stratified`); every segment lists the same epochs.
    ``margin`` (absolute, > 0): how much worse a segment may be. ``max_information``: the capped design
    per segment (default: :func:`segment_information_cap`); the pooled comparison keeps the default
    design of a pooled comparison (80% power at the margin).
    """
    if not margin > 0 or not math.isfinite(margin):
        raise ValueError(f"margin must be > 0, got {margin}")
    if not data:
        raise ValueError("data must name at least one segment")
    if not min_samples >= 0:
        raise ValueError(f"min_samples must be >= 0, got {min_samples}")
    kw = {"alpha": alpha, "better": better, "margin": margin}
    cap = (
        max_information if max_information is not None else segment_information_cap(margin, len(data), alpha)
    )
    comps = {s: _compare(strata, labels=labels, max_information=cap, **kw) for s, strata in data.items()}  # type: ignore[arg-type]
    pooled = _compare(_pool(list(data.values())), labels=labels, max_information=None, **kw)  # type: ignore[arg-type]
    judged = [s for s, c in comps.items() if min(c.control_n, c.treatment_n) >= min_samples]
    harm = {s: _harm_p(comps[s], better, margin) for s in comps}
    adjusted = dict(zip(judged, stats.holm([harm[s] for s in judged]), strict=True))
    rows = tuple(_row(s, comps[s], harm[s], adjusted.get(s), alpha, min_samples, len(judged)) for s in comps)
    return SegmentsResult(_overall(rows, too_small), rows, pooled, _summary(rows, pooled, too_small))


def _row(
    segment: str,
    c: stats.ComparisonResult,
    harm: float,
    adjusted: float | None,
    alpha: float,
    min_samples: float,
    judged: int,
) -> SegmentFinding:
    n_small = min(c.control_n, c.treatment_n)
    if adjusted is None:
        why = f"too small to judge (smaller arm n={n_small:g} < minSamples {min_samples:g})"
        return SegmentFinding(segment, "tooSmall", c, harm, 1.0, why)
    status: SegmentStatus
    if adjusted <= alpha:
        status = "fail"
        why = f"harmed beyond the margin: {c.reason}; Holm-adjusted p={adjusted:.3g} over {judged} segments"
    elif c.verdict == "pass":
        status, why = "pass", c.reason
    else:
        status, why = "inconclusive", c.reason
    return SegmentFinding(segment, status, c, harm, adjusted, why)


def _overall(rows: Sequence[SegmentFinding], too_small: TooSmall) -> stats.Verdict:
    if any(r.status == "fail" for r in rows):
        return "fail"
    judged = [r for r in rows if r.status != "tooSmall"]
    if too_small == "hold" and len(judged) < len(rows):
        return "inconclusive"
    if judged and all(r.status == "pass" for r in judged):
        return "pass"
    return "inconclusive"


def _summary(rows: Sequence[SegmentFinding], pooled: stats.ComparisonResult, too_small: TooSmall) -> str:
    harmed = [r for r in rows if r.status == "fail"]
    small = [r.segment for r in rows if r.status == "tooSmall"]
    if harmed:
        parts = [
            f"{r.segment} (diff {r.comparison.difference:+.4g}, p={r.adjusted_p_value:.3g})" for r in harmed
        ]
        text = "harmed beyond the margin in " + ", ".join(parts)
        if pooled.verdict == "pass":
            text += " although the pooled comparison passes"
    else:
        open_ = [r.segment for r in rows if r.status == "inconclusive"]
        text = (
            "not worse than the margin in every judged segment"
            if not open_
            else ("waiting for evidence in " + ", ".join(open_))
        )
    if small:
        held = " (held until they reach minSamples)" if too_small == "hold" and not harmed else ""
        text += "; too small to judge: " + ", ".join(small) + held
    return text


def rows(res: SegmentsResult) -> list[SegmentRow]:
    """The per-segment table as status stores it (only finite numbers)."""

    def fin(x: float) -> float | None:
        return float(x) if math.isfinite(x) else None

    return [
        SegmentRow(
            segment=f.segment,
            status=f.status,
            stableN=f.comparison.control_n,
            candidateN=f.comparison.treatment_n,
            difference=fin(f.comparison.difference),
            ciLow=fin(f.comparison.ci_low),
            ciHigh=fin(f.comparison.ci_high),
            pValue=fin(f.adjusted_p_value) if f.status != "tooSmall" else None,
        )
        for f in res.segments
    ]


def combine(pooled: Verdict, segmented: Verdict) -> Verdict:
    """A segmented comparison's verdict: the pooled comparison's, held back or failed by the segments.

    Fails when either fails; passes only when both pass; a pooled noData or error stays as it is.
    """
    if pooled in ("noData", "error"):
        return pooled
    if "fail" in (pooled, segmented):
        return "fail"
    if pooled == "pass" and segmented == "pass":
        return "pass"
    return "inconclusive"


@dataclass(frozen=True)
class SegmentsSpec:
    """The judge's spec: the user's ``Segments`` with its comparison's margin and direction."""

    spec: Segments
    margin: float
    better: stats.Better = "higher"
    alpha: float = 0.05


Strata = Sequence[tuple[Data, Data]]


def evaluate(s: SegmentsSpec, strata: Mapping[str, Strata]) -> SegmentsResult:
    """:func:`judge_segments` with the spec's settings (the table and the pooled result included)."""
    return judge_segments(
        strata,
        margin=s.margin,
        better=s.better,
        alpha=s.alpha,
        min_samples=s.spec.minSamples,
        labels=("stable", "candidate"),
        too_small=s.spec.tooSmall,
    )


def finding(s: SegmentsSpec, res: SegmentsResult) -> Finding:
    """The verdict over all segments, with a sentence that names the harmed and the too-small ones."""
    label = s.spec.label
    text = f"by {label}: {res.reason}"
    if res.harmed:
        text = f"{label} " + ", ".join(res.harmed) + f" harmed beyond the margin; {text}"
    numbers = {
        "segments": float(len(res.segments)),
        "segmentsHarmed": float(len(res.harmed)),
        "segmentsTooSmall": float(len(res.too_small)),
    }
    return Finding(res.verdict, text, threshold=f"every {label} within margin {s.margin:g}", numbers=numbers)


def judge(s: SegmentsSpec, strata: Mapping[str, Strata]) -> Finding:
    """The segments judge: {segment: its (stable, candidate) counts per epoch} -> one verdict."""
    return finding(s, evaluate(s, strata))


_: Judge[SegmentsSpec, Mapping[str, Strata]] = judge
