"""ModelRollout: a progressive canary from a stable to a candidate model version."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from model_rollouts.api.common import (
    COUNT_METRIC_RULES,
    AnalysisBase,
    ArmCounts,
    CountMetric,
    Duration,
    Guardrail,
    Measurement,
    Model,
    Name,
    ResourceSpec,
    ResourceStatus,
    SeriesValue,
    TrafficRouting,
    cel,
    list_map,
    parse_duration,
)
from model_rollouts.api.notification import GATES_FIELD, NOTIFICATIONS_FIELD, Gate, GateState, NotificationRef
from model_rollouts.api.segments import Segments

KIND = "ModelRollout"
PLURAL = "modelrollouts"

# Annotations a user (or the kubectl plugin, or an Argo CD action) sets to act on a rollout. The
# operator never writes them: it remembers the last value it acted on in status.handled.
#: Move past the current pause or analysis step (a manual gate included); analysis, guardrails and
#: gates still apply to every later step. As Argo Rollouts' `promote`.
ANNOTATION_PROMOTE = "mlrollouts.io/promote"
#: Skip every remaining step, analysis and gate: 100% to the candidate now. As Argo Rollouts'
#: `promote --full`.
ANNOTATION_PROMOTE_FULL = "mlrollouts.io/promote-full"
ANNOTATION_ABORT = "mlrollouts.io/abort"
ANNOTATION_RESUME = "mlrollouts.io/resume"
ANNOTATION_RETRY = "mlrollouts.io/retry"

Phase = Literal[
    "Pending", "Progressing", "Paused", "Baking", "Promoted", "RolledBack", "Aborted", "Invalid", "Idle"
]
#: Left only by a new revision (a changed candidate) or the retry annotation.
TERMINAL_PHASES = ("Promoted", "RolledBack", "Aborted", "Idle")


class VariantRef(Model):
    service: Name = Field(
        description="Service named in the route (HTTPRoute backendRef, VirtualService destination)."
    )
    deployment: Name | None = Field(
        default=None, description="Deployment serving this variant (informational)."
    )
    modelVersion: str | None = Field(default=None, max_length=128)


class Pause(Model):
    duration: Duration | None = Field(default=None, description="Omit to wait until resumed.")


class AnalysisStep(Model):
    duration: Duration = Field(description="Hold the current weight and analyse for this long.")


class ShadowStep(Model):
    percent: int = Field(
        ge=1, le=100, description="Share of live requests (1..100) the route mirrors to the candidate."
    )
    duration: Duration = Field(
        description="How long the candidate answers mirrored requests (nobody sees its answers) while "
        "the analysis judges it, before the next step."
    )


class Step(Model):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "[has(self.setWeight), has(self.pause), has(self.analysis), has(self.shadow)]"
                    ".filter(x, x).size() == 1",
                    "each step sets exactly one of setWeight, pause, analysis, shadow",
                ),
            ]
        },
    )
    setWeight: int | None = Field(default=None, ge=0, le=100, description="Candidate traffic percentage.")
    pause: Pause | None = None
    analysis: AnalysisStep | None = None
    shadow: ShadowStep | None = Field(
        default=None,
        description="Mirror percent% of live requests to the candidate for duration, at candidate "
        "weight 0: users get only the stable's answers. Only before the first setWeight above 0.",
    )


#: The same rule for the API server (Kubernetes' CEL list library: indexOf, lastIndexOf).
SHADOW_ORDER_RULE = (
    "!self.exists(s, has(s.shadow)) || !self.exists(s, has(s.setWeight) && s.setWeight > 0) || "
    "self.map(s, has(s.shadow)).lastIndexOf(true) < "
    "self.map(s, has(s.setWeight) && s.setWeight > 0).indexOf(true)"
)
SHADOW_ORDER_MESSAGE = "a shadow step must come before the first setWeight above 0"


def shadow_problem(steps: list[Step]) -> str | None:
    """Why these steps cannot run (naming the field), or None: a shadow step comes before any
    setWeight above 0 (a candidate users already see gains nothing from a mirror)."""
    first = next((i for i, st in enumerate(steps) if st.setWeight), None)
    for i, st in enumerate(steps):
        if st.shadow is not None and first is not None and i > first:
            return (
                f"spec.steps[{i}].shadow: a shadow step must come before the first setWeight above 0 "
                f"(spec.steps[{first}])"
            )
    return None


#: A non-inferiority test at margin 0 can never pass for a candidate equal to stable (it would have
#: to show "not worse by more than nothing"), so the default test would hold every healthy rollout
#: forever. There is no margin that fits every metric's scale, so there is no default: the API server
#: refuses a nonInferiority comparison without a margin > 0, naming the field.
MARGIN_RULE = "self.test != 'nonInferiority' || (has(self.margin) && self.margin > 0.0)"
MARGIN_MESSAGE = (
    "margin is required and must be > 0 for a nonInferiority comparison (the largest worsening, on the "
    "metric's own scale, that still counts as no worse); a candidate equal to stable can never pass at 0"
)
#: A comparison with segments: judged against its margin, with queries that select one segment.
SEGMENTS_TEST_RULE = "!has(self.segments) || self.test == 'nonInferiority'"
SEGMENTS_TEST_MESSAGE = "segments need test nonInferiority (a segment is judged against the margin)"
SEGMENT_SLOT = re.compile(r"\{\{\s*segment\s*\}\}")
LABEL_DELAY_SLOT = re.compile(r"\{\{\s*labelDelay\s*\}\}")
SEGMENT_FIELDS = {"proportion": ("successes", "trials"), "mean": ("sum", "count", "sumSquares")}
_SLOT_RE = "[{][{] *segment *[}][}]"
SEGMENTS_QUERY_RULE = (
    "!has(self.segments) || (!has(self.templateRef) && (self.type == 'mean' ? "
    f"(has(self.sum) && self.sum.matches('{_SLOT_RE}') && "
    f"has(self.count) && self.count.matches('{_SLOT_RE}') "
    f"&& has(self.sumSquares) && self.sumSquares.matches('{_SLOT_RE}')) : "
    f"(has(self.successes) && self.successes.matches('{_SLOT_RE}') && has(self.trials) && "
    f"self.trials.matches('{_SLOT_RE}'))))"
)
SEGMENTS_QUERY_MESSAGE = (
    "segments need the comparison's own queries (not templateRef), each selecting one segment with "
    '{{ segment }}, e.g. region="{{ segment }}"'
)


class Comparison(CountMetric):
    """Candidate vs stable on one metric, tested with an always-valid sequential test."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "x-kubernetes-validations": [
                *COUNT_METRIC_RULES,
                cel(MARGIN_RULE, MARGIN_MESSAGE, ".margin"),
                cel(SEGMENTS_TEST_RULE, SEGMENTS_TEST_MESSAGE, ".segments"),
                cel(SEGMENTS_QUERY_RULE, SEGMENTS_QUERY_MESSAGE, ".segments"),
                cel(
                    "!has(self.labelDelay) || duration(self.labelDelay) <= duration('24h')",
                    "labelDelay must be at most 24h",
                    ".labelDelay",
                ),
            ]
        },
    )

    test: Literal["nonInferiority", "superiority"] = Field(
        default="nonInferiority",
        description="nonInferiority (default): pass when the candidate is shown to be no worse than stable "
        "by more than margin (required, > 0). superiority: pass when it is shown to be better.",
    )
    margin: float | None = Field(
        default=None,
        ge=0,
        validate_default=True,
        description="Absolute non-inferiority margin, on the metric's scale (e.g. 0.01 = one percentage "
        "point of a proportion). Required and > 0 for nonInferiority; ignored by superiority.",
    )

    @field_validator("margin")
    @classmethod
    def _margin_for_non_inferiority(cls, v: float | None, info: ValidationInfo) -> float | None:
        if info.data.get("test", "nonInferiority") == "nonInferiority" and not (v is not None and v > 0):
            raise ValueError(MARGIN_MESSAGE)
        return v

    segments: Segments | None = Field(
        default=None,
        description="Judge the comparison in every segment too (no cohort left behind): fail when any "
        "segment is shown worse than the margin, even if the pooled comparison passes; pass only when "
        "every segment with minSamples shows non-inferiority. Needs test nonInferiority and queries that "
        'select one segment with {{ segment }}, e.g. region="{{ segment }}".',
    )

    labelDelay: Duration | None = Field(
        default=None,
        description="Labels (successes, or a mean's sums) arrive up to this long after their prediction. "
        "Per epoch, {{ window }} then spans the labels that arrived after the epoch start plus labelDelay, "
        "and the trials query shifts its window back with offset {{ labelDelay }}, so labels are compared "
        "with the predictions they belong to; no verdict from an epoch before its start plus labelDelay. "
        "At most 24h.",
    )

    @field_validator("labelDelay")
    @classmethod
    def _label_delay_at_most_a_day(cls, v: str | None) -> str | None:
        if v is not None and parse_duration(v) > 86400:
            raise ValueError("labelDelay must be at most 24h")
        return v

    @model_validator(mode="after")
    def _segments_need_their_placeholder(self) -> Comparison:
        if self.segments is None:
            return self
        if self.test != "nonInferiority":
            raise ValueError(SEGMENTS_TEST_MESSAGE)
        if self.templateRef is not None or not all(
            SEGMENT_SLOT.search(getattr(self, f) or "") for f in SEGMENT_FIELDS[self.type]
        ):
            raise ValueError(SEGMENTS_QUERY_MESSAGE)
        return self

    advisory: bool = Field(
        default=False,
        description="false (default): the candidate is never given full traffic until this comparison "
        "has passed its test. true: reported, and a significant failure still rolls back, but it does not "
        "block promotion.",
    )


class Analysis(AnalysisBase):
    guardrails: list[Guardrail] = Field(default_factory=list, max_length=20, json_schema_extra=list_map())
    comparisons: list[Comparison] = Field(default_factory=list, max_length=10, json_schema_extra=list_map())
    alpha: float = Field(default=0.05, gt=0, lt=0.5, description="Family-wise error rate of the comparisons.")
    onInconclusive: Literal["rollback", "hold", "promote"] = Field(
        default="hold",
        description="What happens when progressDeadline passes while a required comparison has been "
        "measured but has not yet shown what its test asks: hold (default: keep the weight and keep "
        "testing; condition Progressing=False, reason Inconclusive), rollback, or promote (full traffic "
        "without that evidence). Missing data is not inconclusive: onProgressDeadline applies.",
    )


#: Longest bake and holdout a spec may ask for (the operator keeps analysing every interval meanwhile).
MAX_BAKE_SECONDS = 7 * 86400
MAX_HOLDOUT_SECONDS = 30 * 86400
#: Points of a holdout comparison's effect trajectory kept in status (thinned evenly when full).
TRAJECTORY_POINTS = 48
HOLDOUT_NEEDS_COMPARISONS = (
    "postPromotion.holdout needs a comparison to keep measuring: set postPromotion.comparisons or "
    "analysis.comparisons"
)


class Holdout(Model):
    """After the bake, keep ``percent`` of the traffic on the replaced model for ``duration`` and keep
    comparing: does the gain hold or decay?"""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "duration(self.duration) >= duration('1s') && "
                    "duration(self.duration) <= duration('720h')",
                    "holdout.duration must be between 1s and 720h (30 days)",
                    ".duration",
                ),
            ]
        },
    )
    percent: int = Field(
        ge=1, le=50, description="Share of traffic (1-50) the replaced model keeps during the holdout."
    )
    duration: Duration = Field(description="How long the holdout lasts (at most 720h, 30 days).")

    @field_validator("duration")
    @classmethod
    def _duration_bounds(cls, v: str) -> str:
        if not 1 <= parse_duration(v) <= MAX_HOLDOUT_SECONDS:
            raise ValueError("holdout.duration must be between 1s and 720h (30 days)")
        return v


class PostPromotion(Model):
    """What happens after the candidate reaches 100%: a bake (the replaced model stays in the route at
    weight 0, guardrails keep running; a breach sends all traffic back to it), then an optional holdout."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "duration(self.bake) <= duration('168h')",
                    "postPromotion.bake must be at most 168h (7 days)",
                    ".bake",
                ),
            ]
        },
    )
    bake: Duration = Field(
        description="How long the candidate runs at 100% with the replaced model kept at weight 0 and the "
        "guardrails watched (at most 168h). It ends at the first passing analysis at or after this time."
    )
    guardrails: list[Guardrail] = Field(
        default_factory=list,
        max_length=20,
        json_schema_extra=list_map(),
        description="Guardrails during the bake and holdout; empty: analysis.guardrails.",
    )
    comparisons: list[Comparison] = Field(
        default_factory=list,
        max_length=5,
        json_schema_extra=list_map(),
        description="Comparisons measured during the holdout (pooled, informational); empty: "
        "analysis.comparisons (their first 5).",
    )
    holdout: Holdout | None = Field(
        default=None, description="After the bake: keep a share of traffic on the replaced model."
    )

    @field_validator("bake")
    @classmethod
    def _bake_at_most_a_week(cls, v: str) -> str:
        if parse_duration(v) > MAX_BAKE_SECONDS:
            raise ValueError("postPromotion.bake must be at most 168h (7 days)")
        return v


class ModelRolloutSpec(ResourceSpec):
    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.postPromotion) || !has(self.postPromotion.holdout) || "
                    "(has(self.postPromotion.comparisons) && size(self.postPromotion.comparisons) > 0) || "
                    "(has(self.analysis.comparisons) && size(self.analysis.comparisons) > 0)",
                    HOLDOUT_NEEDS_COMPARISONS,
                    ".postPromotion.holdout",
                ),
            ]
        },
    )
    stable: VariantRef
    candidate: VariantRef
    trafficRouting: TrafficRouting
    steps: list[Step] = Field(
        min_length=1,
        max_length=100,
        json_schema_extra={"x-kubernetes-validations": [cel(SHADOW_ORDER_RULE, SHADOW_ORDER_MESSAGE)]},
    )
    analysis: Analysis
    maxWeightStep: int | None = Field(
        default=None, ge=1, le=100, description="Split larger weight jumps into steps of at most this."
    )
    paused: bool = False
    progressDeadline: Duration = Field(
        default="30m",
        description="How long the rollout may hold without progress (no data, measurement errors, "
        "waiting for evidence, an unready candidate) before onProgressDeadline (or, when it waits for "
        "comparison evidence, analysis.onInconclusive) applies. Pauses do not count.",
    )
    onProgressDeadline: Literal["rollback", "hold"] = Field(
        default="rollback", description="rollback (default) or hold (condition and Event only)."
    )
    revertOnDeletion: bool = Field(
        default=False,
        description="On deletion, send all traffic to the serving stable even after the rollout finished. "
        "By default traffic moves on deletion only while a rollout is in progress.",
    )
    notifications: list[NotificationRef] = NOTIFICATIONS_FIELD
    gates: list[Gate] = GATES_FIELD
    postPromotion: PostPromotion | None = Field(
        default=None,
        description="After the candidate reaches 100%: bake (phase Baking, the replaced model kept at "
        "weight 0; a guardrail breach rolls back with reason BakeFailed) and an optional holdout.",
    )

    @model_validator(mode="after")
    def _holdout_needs_a_comparison(self) -> ModelRolloutSpec:
        pp = self.postPromotion
        if pp is not None and pp.holdout is not None and not (pp.comparisons or self.analysis.comparisons):
            raise ValueError(HOLDOUT_NEEDS_COMPARISONS)
        return self

    @field_validator("steps")
    @classmethod
    def _shadow_before_weights(cls, v: list[Step]) -> list[Step]:
        why = shadow_problem(v)
        if why is not None:
            raise ValueError(why)
        return v


class Handled(Model):
    promote: str | None = None
    promoteFull: str | None = None
    abort: str | None = None
    resume: str | None = None
    retry: str | None = None


class EpochCounts(Model):
    """One closed constant-weight epoch of one comparison: each arm's counts within it."""

    weight: int
    stable: ArmCounts
    candidate: ArmCounts


class RolloutSeriesPoint(Model):
    """One analysis in status.series: its metrics and the weight that followed from it."""

    time: datetime
    weight: int = Field(description="Candidate traffic percentage after this analysis's decision.")
    step: int
    phase: str
    values: list[SeriesValue] = Field(default_factory=list)


class WeightEstimate(Model):
    weight: int = Field(description="Candidate traffic percentage.")
    seconds: float = Field(description="Expected seconds to a decision if sampled at this weight alone.")


class DecisionPlan(Model):
    """When a required comparison is expected to decide, at the observed rate (see analysis/plan.py)."""

    name: str = Field(description="The comparison.")
    feasible: bool | None = Field(
        default=None,
        description="Whether the decision is expected within the remaining steps plus what is left of "
        "progressDeadline; unset while the rate or the sample need is unknown.",
    )
    expectedDecisionSeconds: float | None = Field(
        default=None, description="Expected seconds from the last analysis to a decision along the steps."
    )
    budgetSeconds: float | None = Field(
        default=None, description="Seconds the plan has: remaining timed steps plus progressDeadline left."
    )
    samplesPerSecond: float | None = Field(
        default=None, description="Observed samples per second, both arms, in the current epoch."
    )
    moreSamplesNeeded: float | None = None
    atWeights: list[WeightEstimate] = Field(default_factory=list)
    message: str = ""


class EffectPoint(Model):
    """A holdout comparison's effect (candidate minus the replaced model, on the metric's scale) with its
    always-valid (1 - alpha) confidence sequence, at one analysis."""

    time: datetime
    effect: float | None = None
    lower: float | None = None
    upper: float | None = None
    samples: float = Field(default=0, description="Samples of both arms so far in the holdout.")


GainVerdict = Literal["held", "decayed", "undecided"]


class HoldoutComparison(Model):
    name: str
    gain: GainVerdict = Field(
        default="undecided",
        description="held: the holdout shows again what the comparison's test asks (non-inferiority or "
        "superiority); decayed: its confidence sequence shows the candidate worse than the test allows, "
        "or lies wholly below the effect's lower bound at promotion; undecided: neither yet.",
    )
    message: str = ""
    atPromotion: EffectPoint | None = Field(
        default=None, description="The rollout's last estimate before promotion (for reference)."
    )
    trajectory: list[EffectPoint] = Field(
        default_factory=list,
        max_length=TRAJECTORY_POINTS,
        description=f"The effect over the holdout, oldest first (at most {TRAJECTORY_POINTS} points: when "
        "full, the inner point closest to its neighbours is dropped, so it spans the whole holdout).",
    )


class PostPromotionStatus(Model):
    stage: Literal["Bake", "Holdout", "Done"] = "Bake"
    startedAt: datetime = Field(description="When the candidate got 100% and the bake began.")
    stageStartedAt: datetime
    stageEndsAt: datetime | None = Field(
        default=None, description="The stage ends at the first passing analysis at or after this time."
    )
    previousStable: str = Field(description="The replaced model: kept at weight 0 (bake) or P% (holdout).")
    holdout: list[HoldoutComparison] = Field(default_factory=list, max_length=10)
    gain: GainVerdict | None = Field(
        default=None,
        description="After a holdout: decayed if any comparison decayed, held if all held, else undecided.",
    )


class ModelRolloutStatus(ResourceStatus):
    phase: Phase = "Pending"
    revision: str | None = None
    revisionStartedAt: datetime | None = None
    currentStep: int = 0
    stepStartedAt: datetime | None = None
    stepWeight: int | None = Field(default=None, description="Intermediate weight while a jump is split.")
    weight: int = 0
    shadowPercent: int | None = Field(
        default=None,
        description="During a shadow step: the share of live requests mirrored to the candidate "
        "(its weight stays 0). Unset otherwise.",
    )
    candidateUnready: bool = Field(
        default=False,
        description="The candidate has no ready endpoint: the route gives it 0 (the stable the rest) "
        "until it is ready again, then `weight` (the step's weight, kept) again.",
    )
    candidateService: str | None = Field(default=None, description="The candidate of this revision.")
    stableService: str | None = Field(
        default=None, description="The Service serving as the baseline: rolled back to, compared against."
    )
    retiredServices: list[str] = Field(
        default_factory=list, description="Services of an earlier revision held at weight 0 in this one."
    )
    stepsHash: str | None = None
    epochStartedAt: datetime | None = Field(
        default=None, description="Start of the current constant-weight epoch; comparisons count from here."
    )
    epochs: dict[str, list[EpochCounts]] = Field(
        default_factory=dict, description="Closed epochs' counts per comparison (stratified test)."
    )
    heldSince: datetime | None = Field(
        default=None, description="Since when the rollout has been held without progress (progressDeadline)."
    )
    passedComparisons: list[str] = Field(
        default_factory=list,
        description="Comparisons whose always-valid test has passed in this revision (a pass stays valid).",
    )
    guardrailFailures: dict[str, int] = Field(default_factory=dict)
    lastAnalysis: list[Measurement] = Field(default_factory=list)
    handled: Handled = Field(default_factory=Handled)
    plan: list[DecisionPlan] = Field(
        default_factory=list,
        description="Per required comparison not yet decided: its expected time to a decision at the "
        "observed rate and at each planned weight, against the time left (condition Planned).",
    )
    gates: list[GateState] = Field(
        default_factory=list, description="The last answer of each gate asked in this revision."
    )
    postPromotion: PostPromotionStatus | None = Field(
        default=None,
        description="The bake and holdout after the candidate reached 100% (spec.postPromotion).",
    )
    series: list[RolloutSeriesPoint] = Field(
        default_factory=list,
        description="The last analyses, oldest first (at most 120 points and 256 KiB; older ones are "
        "dropped): for `kubectl mlrollouts report`. Informational: nothing reads it back.",
    )


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.currentStep"},
    {"name": "Weight", "type": "integer", "jsonPath": ".status.weight"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 0},
]
