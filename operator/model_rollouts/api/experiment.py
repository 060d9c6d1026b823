"""ModelExperiment: a controlled A/B/n (fixed split) or Thompson-sampling bandit experiment."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import ConfigDict, Field

from model_rollouts.api.calibration import Calibration
from model_rollouts.api.common import (
    AnalysisBase,
    CountMetric,
    Duration,
    Guardrail,
    Measurement,
    Model,
    Name,
    PromQL,
    ResourceSpec,
    ResourceStatus,
    SeriesValue,
    TrafficRouting,
    VariantVerdict,
    cel,
    list_map,
)
from model_rollouts.api.notification import NOTIFICATIONS_FIELD, NotificationRef
from model_rollouts.api.shift import PredictionShift

KIND = "ModelExperiment"
PLURAL = "modelexperiments"

ExperimentPhase = Literal["Pending", "Running", "Paused", "Concluded", "RolledBack", "Aborted", "Invalid"]
TERMINAL_PHASES = ("Concluded", "RolledBack", "Aborted")


class Variant(Model):
    name: Name
    service: Name = Field(
        description="Service named in the route (HTTPRoute backendRef, VirtualService destination)."
    )
    control: bool = Field(default=False, description="Exactly one variant is the control.")
    weight: int | None = Field(
        default=None,
        ge=1,
        le=100,
        description="Fixed allocation weight, 1..100 (a variant with no traffic could never be decided); "
        "set on every variant or on none (default: an equal split).",
    )


class Allocation(Model):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.strategy != 'thompson' || self.minWeight <= 50",
                    "allocation.minWeight must be at most 50 for thompson",
                ),
            ]
        },
    )
    strategy: Literal["fixed", "thompson"] = "fixed"
    minWeight: int = Field(
        default=5, ge=0, le=100, description="Thompson: the least weight of an active arm."
    )
    maxStep: int = Field(default=10, ge=1, le=100, description="Thompson: largest weight change per update.")


class PrimaryMetric(CountMetric):
    """The metric the experiment is decided on, per variant, cumulative since the start."""


class SuccessCriteria(Model):
    alpha: float = Field(default=0.05, gt=0, lt=0.5)
    power: float = Field(default=0.8, gt=0.5, lt=1)
    minimumDetectableEffect: float = Field(gt=0, description="Absolute effect size to detect.")
    method: Literal["sequential", "fixedHorizon", "bayesian"] = "sequential"
    probabilityToBeBest: float = Field(default=0.95, gt=0.5, lt=1, description="Bayesian: threshold to win.")


class StoppingRules(Model):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "duration(self.maxDuration) > duration('0s')",
                    "stoppingRules.maxDuration must be above 0 (an experiment that must stop at once can "
                    "never decide)",
                    ".maxDuration",
                ),
                cel(
                    "!has(self.maxSamplesPerVariant) || "
                    "self.maxSamplesPerVariant >= self.minSamplesPerVariant",
                    "stoppingRules.maxSamplesPerVariant must be >= minSamplesPerVariant",
                    ".maxSamplesPerVariant",
                ),
            ]
        },
    )
    maxDuration: Duration = "168h"
    minSamplesPerVariant: int = Field(default=100, ge=1)
    maxSamplesPerVariant: int | None = Field(default=None, ge=1)
    futility: bool = Field(
        default=True, description="Stop early when the effect is shown to be below the MDE."
    )
    srmAlpha: float = Field(
        default=0.001, gt=0, lt=0.5, description="Pause when the SRM p-value falls below."
    )


class ExperimentAnalysis(AnalysisBase):
    requests: PromQL | None = Field(
        default=None,
        description="Requests served by a variant over {{ window }} (= time since start); the SRM check "
        "compares these counts with the weights. Default: the primary metric's trials (or count).",
    )
    noDataTimeout: Duration = Field(
        default="10m",
        description="How long an active variant may go without data (every analysis of it has a no-data "
        "or NaN measurement) before onNoDataTimeout applies.",
    )
    onNoDataTimeout: Literal["drop", "hold"] = Field(
        default="drop",
        description="drop: after noDataTimeout a variant without data is dropped to weight 0 like a "
        "breaching one (the control: onFailure applies). hold: keep holding the whole experiment.",
    )
    predictionShift: list[PredictionShift] = Field(
        default_factory=list,
        max_length=5,
        json_schema_extra=list_map(),
        description="Compare each variant's prediction-score distribution (histogram buckets) with the "
        "control's since the start: a significant shift with PSI >= maxPSI drops the variant; too few "
        "scores or not enough evidence holds the decision.",
    )
    calibration: list[Calibration] = Field(
        default_factory=list,
        max_length=5,
        json_schema_extra=list_map(),
        description="Compare each variant's expected calibration error with the control's since the start: "
        "significantly worse by margin or more drops the variant; too few labels or not enough evidence "
        "holds the decision.",
    )


class ModelExperimentSpec(ResourceSpec):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.variants.filter(v, v.control).size() == 1",
                    "exactly one variant must be the control",
                    ".variants",
                ),
                cel(
                    "self.variants.all(a, self.variants.exists_one(b, b.name == a.name))",
                    "variant names must be unique",
                    ".variants",
                ),
                cel(
                    "self.variants.all(a, self.variants.exists_one(b, b.service == a.service))",
                    "variant services must be unique",
                    ".variants",
                ),
                cel(
                    "!self.variants.exists(v, has(v.weight)) || self.variants.all(v, has(v.weight))",
                    "set a weight on every variant or on none (a variant without one would get no traffic)",
                    ".variants",
                ),
                cel(
                    "!self.variants.exists(v, has(v.weight)) || "
                    "self.variants.map(v, has(v.weight) ? v.weight : 0).sum() == 100",
                    "variant weights must sum to 100 when set",
                    ".variants",
                ),
                cel(
                    "self.primaryMetric.type != 'proportion' || "
                    "self.successCriteria.minimumDetectableEffect < 1.0",
                    "successCriteria.minimumDetectableEffect must be below 1 for a proportion metric "
                    "(an absolute difference of two rates cannot reach 1)",
                    ".successCriteria.minimumDetectableEffect",
                ),
            ]
        },
    )
    variants: list[Variant] = Field(min_length=2, max_length=10, json_schema_extra=list_map())
    trafficRouting: TrafficRouting
    allocation: Allocation = Field(default_factory=Allocation)
    primaryMetric: PrimaryMetric
    guardrails: list[Guardrail] = Field(default_factory=list, max_length=20, json_schema_extra=list_map())
    successCriteria: SuccessCriteria
    stoppingRules: StoppingRules = Field(default_factory=StoppingRules)
    analysis: ExperimentAnalysis
    onSuccess: Literal["promoteWinner", "keep"] = "promoteWinner"
    onFailure: Literal["rollback", "keep"] = "rollback"
    paused: bool = False
    notifications: list[NotificationRef] = NOTIFICATIONS_FIELD


class VariantStatus(Model):
    name: str
    service: str | None = Field(default=None, description="The variant's Service when it started.")
    weight: int = 0
    active: bool = True
    n: float = 0
    requests: float | None = Field(default=None, description="Traffic count used by the SRM check.")
    estimate: float | None = None
    ciLow: float | None = None
    ciHigh: float | None = None
    pValue: float | None = None
    adjustedPValue: float | None = None
    probabilityToBeBest: float | None = None
    verdict: VariantVerdict | None = None
    reason: str | None = None
    noDataSince: datetime | None = Field(
        default=None, description="Since when every analysis of this variant had a no-data measurement."
    )
    unready: bool = Field(
        default=False,
        description="Its Service had no ready endpoint at the last analysis: weight 0 (a non-control "
        "variant; the control is never zeroed, the analysis holds) until it is ready again.",
    )


class Handled(Model):
    """The annotation values already acted on (each new value acts once)."""

    abort: str | None = None
    resume: str | None = None
    retry: str | None = None


class Confirmation(Model):
    """Thompson allocation: the fixed-split phase that confirms the bandit's leader on fresh samples."""

    variant: str = Field(description="The leader being confirmed against the control.")
    since: datetime
    baseline: dict[str, list[float]] = Field(
        default_factory=dict,
        description="Per variant, its cumulative counts (successes, trials) when the confirmation started; "
        "the confirmation test uses only the samples after them.",
    )


class SeriesVariant(Model):
    """One variant in one analysis of status.series (numbers rounded to 5 significant digits)."""

    name: str
    weight: int = Field(description="Traffic percentage after this analysis's decision (the allocation).")
    n: float | None = None
    estimate: float | None = None
    difference: float | None = Field(default=None, description="estimate minus the control's estimate.")
    ciLow: float | None = Field(default=None, description="Lower end of the difference's interval.")
    ciHigh: float | None = Field(default=None, description="Upper end of the difference's interval.")
    adjustedPValue: float | None = None
    probabilityToBeBest: float | None = None
    verdict: str | None = None


class ExperimentSeriesPoint(Model):
    """One analysis in status.series: each variant's numbers, SRM and the guardrails."""

    time: datetime
    phase: str
    srmPValue: float | None = None
    srm: str | None = Field(default=None, description="Reason of the SampleRatioMismatch condition.")
    variants: list[SeriesVariant] = Field(default_factory=list)
    values: list[SeriesValue] = Field(default_factory=list, description="Guardrails, per variant.")


class ModelExperimentStatus(ResourceStatus):
    phase: ExperimentPhase = "Pending"
    revision: str | None = Field(
        default=None,
        description="Hash of the variants (names, services, control) and the primary metric; "
        "a change restarts the experiment.",
    )
    startedAt: datetime | None = None
    variants: list[VariantStatus] = Field(default_factory=list)
    srmPValue: float | None = None
    sampleSizePerVariant: int | None = Field(
        default=None,
        description="Samples the smaller arm of a comparison needs for successCriteria.power at the MDE, "
        "for the test that really runs (fixedHorizon; sequential with maxSamplesPerVariant: the capped "
        "boundary; without: the uncapped mixture test) at the split in force; unset for bayesian.",
    )
    decision: str | None = None
    decisionReason: str | None = None
    winner: str | None = None
    guardrailFailures: dict[str, int] = Field(default_factory=dict)
    lastAnalysis: list[Measurement] = Field(default_factory=list)
    handled: Handled = Field(default_factory=Handled)
    srmBaseline: dict[str, float] = Field(
        default_factory=dict,
        description="Per variant, its sample count when the split last changed; SRM counts samples since.",
    )
    srmSince: datetime | None = Field(
        default=None,
        description="With srmBaseline: when the SRM count started. Without it: when the split last changed "
        "(the count starts at the first analysis after that, once the new split is in effect).",
    )
    retiredServices: list[str] = Field(
        default_factory=list,
        description="Services of variants removed from the spec (or whose service changed): the route "
        "write that starts the new revision sets them to 0; cleared at the next analysis tick.",
    )
    confirmation: Confirmation | None = Field(
        default=None, description="Thompson allocation: the confirmation phase, once the bandit has a leader."
    )
    series: list[ExperimentSeriesPoint] = Field(
        default_factory=list,
        description="The last analyses, oldest first (at most 5 points and 8 KiB): every analysis "
        "is also archived in ConfigMaps owned by this object (label mlrollouts.io/series-of=<uid>), "
        "read by `kubectl mlrollouts report`. Informational: nothing reads it back.",
    )


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Winner", "type": "string", "jsonPath": ".status.winner"},
    {"name": "SRM-p", "type": "number", "jsonPath": ".status.srmPValue"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Message", "type": "string", "jsonPath": ".status.message"},
]
