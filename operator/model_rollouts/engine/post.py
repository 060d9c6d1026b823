"""After promotion: the bake and the holdout of ``spec.postPromotion`` (pure, no I/O).

When the step walk would promote and the spec has ``postPromotion``, :func:`start` enters phase
``Baking`` instead: the candidate has 100%, the replaced model (``status.stableService``, unchanged
until the end) stays in the route at weight 0, and the guardrails (``postPromotion.guardrails``, else
``analysis.guardrails``) are measured every interval. A guardrail at its failureLimit (or no data
under ``noData: fail``, or the error limit under ``onErrorLimit: rollback``) sends all traffic back to
the replaced model: phase RolledBack, reason ``BakeFailed`` (``HoldoutFailed`` in the holdout).

Analyses stay paced by ``analysis.interval``; the bake ends at the first passing analysis at or after
``bake`` (never without data; ``progressDeadline`` after the stage's end, ``onProgressDeadline``
applies). With ``holdout`` the replaced model then gets ``percent`` for ``duration`` while the
comparisons keep being measured (within that single constant-weight epoch, pooled); each comparison's
effect and confidence sequence is kept in status as a bounded trajectory and judged held / decayed /
undecided. They are informational: only guardrails roll back. Then the rollout is Promoted as usual.

Everything lives in ``status.postPromotion``: a restarted operator resumes the stage where it stood.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from model_rollouts.analysis import sequential, stats, threshold
from model_rollouts.analysis.assess import Policy, assess
from model_rollouts.analysis.comparison import ROLLOUT_NAMES
from model_rollouts.analysis.vocabulary import Result
from model_rollouts.api.common import Guardrail, Measurement, parse_duration, set_condition
from model_rollouts.api.rollout import (
    TRAJECTORY_POINTS,
    Comparison,
    EffectPoint,
    GainVerdict,
    HoldoutComparison,
    ModelRolloutSpec,
    ModelRolloutStatus,
    PostPromotionStatus,
)
from model_rollouts.engine.actions import Event
from model_rollouts.engine.steps import record


class ComparisonData(Protocol):
    """One comparison's counts (engine.rollout.ComparisonData; a Protocol: rollout imports this module)."""

    @property
    def stable(self) -> stats.ProportionData | stats.MeanData | None: ...
    @property
    def candidate(self) -> stats.ProportionData | stats.MeanData | None: ...
    @property
    def problem(self) -> Result | None: ...


class Observations(Protocol):
    """One analysis (engine.rollout.Observations)."""

    @property
    def guardrails(self) -> Mapping[str, Result]: ...
    @property
    def comparisons(self) -> Mapping[str, ComparisonData]: ...


PHASE: Literal["Baking"] = "Baking"
CONDITION = "Baking"
#: Comparisons a holdout measures at most (the first ones of analysis.comparisons when not its own).
MAX_HOLDOUT_COMPARISONS = 5


@dataclass(frozen=True)
class End:
    """How the post-promotion phase ends at this tick: Promoted or RolledBack."""

    phase: str
    weight: int
    reason: str
    message: str
    values: dict[str, float] | None = None


@dataclass
class Outcome:
    events: list[Event] = field(default_factory=list)
    end: End | None = None


def guardrails(spec: ModelRolloutSpec) -> list[Guardrail]:
    pp = spec.postPromotion
    return list(pp.guardrails) if pp is not None and pp.guardrails else list(spec.analysis.guardrails)


def comparisons(spec: ModelRolloutSpec) -> list[Comparison]:
    pp = spec.postPromotion
    own = list(pp.comparisons) if pp is not None and pp.comparisons else list(spec.analysis.comparisons)
    return own[:MAX_HOLDOUT_COMPARISONS]


def running(status: ModelRolloutStatus) -> bool:
    """A bake or holdout is under way (status.postPromotion, whatever the phase shows now)."""
    return status.postPromotion is not None and status.postPromotion.stage != "Done"


def measured_spec(spec: ModelRolloutSpec, status: ModelRolloutStatus) -> ModelRolloutSpec:
    """The spec whose analysis the handler measures: in Baking, the post-promotion guardrails and (in
    the holdout) comparisons, pooled (no segments); otherwise the spec itself."""
    if status.phase != PHASE or spec.postPromotion is None:
        return spec
    holdout = status.postPromotion is not None and status.postPromotion.stage == "Holdout"
    comps = [c.model_copy(update={"segments": None}) for c in comparisons(spec)] if holdout else []
    analysis = spec.analysis.model_copy(update={"guardrails": guardrails(spec), "comparisons": comps})
    return spec.model_copy(update={"analysis": analysis})


def start(spec: ModelRolloutSpec, s: ModelRolloutStatus, now: datetime, generation: int) -> list[Event]:
    """The candidate reached 100% with passing analysis: bake instead of finishing."""
    assert spec.postPromotion is not None
    previous = s.stableService or spec.stable.service
    bake = parse_duration(spec.postPromotion.bake)
    s.phase, s.weight, s.stepWeight, s.heldSince = PHASE, 100, None, None
    s.shadowPercent = None  # no mirror after reaching 100% (a shadow step ended before the last move)
    s.postPromotion = PostPromotionStatus(
        stage="Bake",
        startedAt=now,
        stageStartedAt=now,
        stageEndsAt=now + timedelta(seconds=bake),
        previousStable=previous,
        holdout=[_at_promotion(c.name, s, now) for c in comparisons(spec)]
        if spec.postPromotion.holdout
        else [],
    )
    s.guardrailFailures, s.consecutiveErrors = {}, 0
    s.message = (
        f"baking: {s.candidateService} has 100% for {spec.postPromotion.bake}; {previous} stays in the "
        "route at weight 0 and a guardrail breach sends all traffic back to it"
    )
    record(s, now, "Baking", "BakeStarted", s.message)
    _baking_condition(s, "True", "BakeStarted", now, generation)
    return [Event("Normal", "BakeStarted", s.message)]


def _at_promotion(name: str, s: ModelRolloutStatus, now: datetime) -> HoldoutComparison:
    last = next((m for m in s.lastAnalysis if m.kind == "comparison" and m.name == name), None)
    point = None
    if last is not None and last.details:
        d = last.details
        point = EffectPoint(
            time=s.lastAnalysisTime or now,
            effect=d.get("difference"),
            lower=d.get("ciLow"),
            upper=d.get("ciHigh"),
            samples=d.get("baselineN", 0.0) + d.get("candidateN", 0.0),
        )
    return HoldoutComparison(name=name, atPromotion=point)


def tick(
    spec: ModelRolloutSpec, s: ModelRolloutStatus, obs: Observations | None, now: datetime, generation: int
) -> Outcome:
    """One tick in phase Baking: the analysis (if due), then the stage's end."""
    pp = s.postPromotion
    assert pp is not None
    out = Outcome()
    if spec.postPromotion is None:  # removed from the spec: the bake is over
        out.end = End("Promoted", 100, "BakeSkipped", "spec.postPromotion removed: promoted without the rest")
        return out
    passed = False
    if obs is not None:
        end, passed = _analyse(spec, s, obs, now, generation)
        if end is not None:
            out.end = end
            return out
    if pp.stageEndsAt is not None and now >= pp.stageEndsAt and passed:
        if pp.stage == "Bake" and spec.postPromotion.holdout is not None:
            out.events.append(_start_holdout(spec, s, now))
        else:
            out.end = _done(spec, s, now, generation)
        return out
    _message(spec, s, now, passed)
    out.end = _overdue(spec, s, now, obs is not None and not passed, out.events)
    return out


def _overdue(
    spec: ModelRolloutSpec, s: ModelRolloutStatus, now: datetime, held: bool, events: list[Event]
) -> End | None:
    """A stage past its end without a passing analysis for progressDeadline (no data, failed
    measurements): onProgressDeadline applies, as to any hold of the rollout."""
    pp = s.postPromotion
    assert pp is not None
    if not held or pp.stageEndsAt is None:
        return None
    late = (now - pp.stageEndsAt).total_seconds()
    if late < parse_duration(spec.progressDeadline):
        return None
    why = (
        f"{_stage(pp)} ended {late:.0f}s ago without a passing analysis (progressDeadline "
        f"{spec.progressDeadline})"
    )
    if spec.onProgressDeadline == "rollback":
        reason = "BakeFailed" if pp.stage == "Bake" else "HoldoutFailed"
        return End("RolledBack", 0, reason, f"{why}; all traffic back to {pp.previousStable}")
    if "progressDeadline" not in (s.history[-1].message if s.history else ""):
        events.append(Event("Warning", "ProgressDeadlineExceeded", why + "; holding"))
        record(s, now, "ProgressDeadlineExceeded", "ProgressDeadlineExceeded", why)
    s.message = f"{s.message}; {why}"
    return None


def _analyse(
    spec: ModelRolloutSpec, s: ModelRolloutStatus, obs: Observations, now: datetime, generation: int
) -> tuple[End | None, bool]:
    """Guardrails (and the holdout's comparisons) at this analysis: an End when a breach rolls back,
    else whether the analysis passed (nothing holds)."""
    pp = s.postPromotion
    assert pp is not None
    s.lastAnalysisTime = now
    gs = guardrails(spec)
    results = [threshold.measure(g, obs.guardrails.get(g.name), "candidate") for g in gs]
    # The holdout's comparisons are informational: reported, never a hold or a rollback.
    compared = _holdout(spec, s, obs, now) if pp.stage == "Holdout" else []
    s.lastAnalysis = results + compared
    policy = Policy(spec.analysis, gs, per_arm=False, breach_holds=True, breach_unhealthy=False)
    a = assess(policy, {"candidate": results}, s.guardrailFailures, s.consecutiveErrors)
    s.guardrailFailures, s.consecutiveErrors = a.failures, a.consecutive_errors
    reason = "BakeFailed" if pp.stage == "Bake" else "HoldoutFailed"
    back = f"all traffic back to {pp.previousStable}"
    values = {m.name: m.value for m in s.lastAnalysis if m.value is not None}
    if limit := a.at_limit("candidate"):
        return End(
            "RolledBack", 0, reason, f"{_stage(pp)}: guardrail {limit[0].text()}; {back}", values
        ), False
    if "candidate" in a.no_data_fail:
        msg = f"{_stage(pp)}: {a.no_data_fail['candidate'].message} and analysis.noData is fail; {back}"
        return End("RolledBack", 0, reason, msg, values), False
    if a.error_limit_reached and spec.analysis.onErrorLimit == "rollback":
        return End("RolledBack", 0, reason, f"{_stage(pp)}: {a.error_limit_message()}; {back}", values), False
    h = a.health()
    s.conditions = set_condition(s.conditions, "Healthy", h.status, h.reason, h.message, now, generation)
    return None, not a.hold_reasons()


def _stage(pp: PostPromotionStatus) -> str:
    return "bake" if pp.stage == "Bake" else "holdout"


def _start_holdout(spec: ModelRolloutSpec, s: ModelRolloutStatus, now: datetime) -> Event:
    pp, hold = s.postPromotion, spec.postPromotion.holdout if spec.postPromotion else None
    assert pp is not None and hold is not None
    pp.stage, pp.stageStartedAt = "Holdout", now
    pp.stageEndsAt = now + timedelta(seconds=parse_duration(hold.duration))
    s.weight = 100 - hold.percent
    s.epochStartedAt = now  # the holdout's comparisons count from here, at this one split
    s.message = (
        f"bake passed; holdout: {pp.previousStable} keeps {hold.percent}% for {hold.duration} while "
        f"{', '.join(c.name for c in comparisons(spec))} keep being compared"
    )
    record(s, now, "Holdout", "HoldoutStarted", s.message)
    return Event("Normal", "HoldoutStarted", s.message)


def _holdout(
    spec: ModelRolloutSpec, s: ModelRolloutStatus, obs: Observations, now: datetime
) -> list[Measurement]:
    """Each holdout comparison over the holdout so far: its measurement, trajectory point and gain."""
    pp = s.postPromotion
    assert pp is not None
    comps = comparisons(spec)
    out = []
    for c in comps:
        alpha = spec.analysis.alpha / max(len(comps), 1)
        row = next((h for h in pp.holdout if h.name == c.name), None)
        if row is None:
            row = HoldoutComparison(name=c.name)
            pp.holdout = [*pp.holdout, row][-MAX_HOLDOUT_COMPARISONS:]
        out.append(_judge(c, obs.comparisons.get(c.name), row, alpha, s.weight, now))
    return out


def _judge(
    c: Comparison,
    data: ComparisonData | None,
    row: HoldoutComparison,
    alpha: float,
    weight: int,
    now: datetime,
) -> Measurement:
    """One holdout comparison: informational (its verdict never rolls back; guardrails do)."""
    base: dict[str, Any] = {"name": c.name, "kind": "comparison", "variant": "candidate"}
    if data is None or data.problem is not None or data.stable is None or data.candidate is None:
        why = data.problem.message if data is not None and data.problem is not None else "not measured"
        outcome = (
            "error" if data is not None and data.problem and data.problem.outcome == "error" else "noData"
        )
        row.message = f"{c.name}: {why}"
        return Measurement(**base, outcome=outcome, verdict="noData", message=row.message)
    spec = sequential.SequentialSpec(
        alpha=alpha, better=c.better, test=c.test, margin=c.margin or 0.0,
        allocation=weight / 100.0, names=ROLLOUT_NAMES,
    )  # fmt: skip
    f = sequential.judge(spec, [(data.stable, data.candidate)])
    n = f.numbers
    point = EffectPoint(
        time=now, effect=n.get("difference"), lower=n.get("ciLow"), upper=n.get("ciHigh"),
        samples=n.get("baselineN", 0.0) + n.get("candidateN", 0.0),
    )  # fmt: skip
    add_point(row.trajectory, point)
    row.gain = gain(c, f.verdict, point, row.atPromotion)
    row.message = f"{c.name}: gain {row.gain} in the holdout; {f.message}"
    return Measurement(
        **base, outcome="value", value=f.value, verdict="pass" if f.verdict != "fail" else "fail",
        threshold=f"holdout {c.test} margin {c.margin or 0.0:g}, alpha {alpha:.4g}, informational",
        message=row.message, details=dict(n),
    )  # fmt: skip


def gain(c: Comparison, verdict: str, now: EffectPoint, then: EffectPoint | None) -> GainVerdict:
    """held: the comparison's test passes again on the holdout; decayed: the candidate is shown worse
    than the test allows, or the confidence sequence lies wholly below (on the worse side of) the
    effect's lower confidence bound at promotion; else undecided."""
    if verdict == "pass":
        return "held"
    if verdict == "fail":
        return "decayed"
    if then is None or now.lower is None or now.upper is None:
        return "undecided"
    if c.better == "higher" and then.lower is not None and now.upper < then.lower:
        return "decayed"
    if c.better == "lower" and then.upper is not None and now.lower > then.upper:
        return "decayed"
    return "undecided"


def add_point(trajectory: list[EffectPoint], point: EffectPoint) -> None:
    """Append, keeping at most TRAJECTORY_POINTS: when full, the inner point whose removal leaves the
    shortest gap goes (the first and the newest stay), so the points stay nearly evenly spaced over the
    whole holdout however long it runs."""
    trajectory.append(point)
    while len(trajectory) > TRAJECTORY_POINTS:
        gaps = [(trajectory[i + 1].time - trajectory[i - 1].time, i) for i in range(1, len(trajectory) - 1)]
        del trajectory[min(gaps)[1]]


def _done(spec: ModelRolloutSpec, s: ModelRolloutStatus, now: datetime, generation: int) -> End:
    pp = s.postPromotion
    assert pp is not None
    if pp.stage == "Holdout" and pp.holdout:
        gains = [h.gain for h in pp.holdout]
        pp.gain = (
            "decayed" if "decayed" in gains else "held" if all(g == "held" for g in gains) else "undecided"
        )
        rows = "; ".join(f"{h.name} {h.gain}" for h in pp.holdout)
        msg = f"holdout finished: gain {pp.gain} ({rows}); {pp.previousStable} set to 0"
        reason = "HoldoutFinished"
    else:
        bake = spec.postPromotion.bake if spec.postPromotion else "?"
        msg = f"bake passed ({bake}); {pp.previousStable} set to 0"
        reason = "BakePassed"
    pp.stage, pp.stageEndsAt = "Done", None
    _baking_condition(s, "False", reason, now, generation, msg)
    values = {m.name: m.value for m in s.lastAnalysis if m.value is not None}
    return End("Promoted", 100, reason, msg, values)


def ended(s: ModelRolloutStatus, reason: str, message: str, now: datetime, generation: int) -> None:
    """A finish during the bake or holdout (a breach, an abort, promote-full): Baking=False with its
    reason, and the stage is Done. Nothing when no bake is running."""
    if s.postPromotion is not None and s.postPromotion.stage != "Done":
        s.postPromotion.stage, s.postPromotion.stageEndsAt = "Done", None
        _baking_condition(s, "False", reason, now, generation, message)


def _message(spec: ModelRolloutSpec, s: ModelRolloutStatus, now: datetime, passed: bool) -> None:
    pp = s.postPromotion
    assert pp is not None
    left = max(0.0, (pp.stageEndsAt - now).total_seconds()) if pp.stageEndsAt else 0.0
    if pp.stage == "Bake":
        head = f"baking at 100% ({left:.0f}s left); {pp.previousStable} kept at weight 0 for a rollback"
    else:
        rows = ", ".join(f"{h.name} {h.gain}" for h in pp.holdout)
        head = f"holdout: {pp.previousStable} keeps {100 - s.weight}% ({left:.0f}s left); gain: {rows}"
    if left <= 0 and not passed:
        head += "; waiting for a passing analysis to end the stage"
    if spec.stable.service not in (pp.previousStable, spec.candidate.service):
        head += f"; spec.stable ({spec.stable.service}) is not used until the bake ends"
    s.message = head


def _baking_condition(
    s: ModelRolloutStatus,
    status: Literal["True", "False"],
    reason: str,
    now: datetime,
    generation: int,
    message: str = "",
) -> None:
    s.conditions = set_condition(
        s.conditions, CONDITION, status, reason, message or s.message or "", now, generation
    )
