"""ModelExperiment: a controlled A/B/n (fixed split) or Thompson-sampling bandit experiment."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import ConfigDict, Field

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
    TrafficRouting,
    cel,
)

KIND = "ModelExperiment"
PLURAL = "modelexperiments"

ExperimentPhase = Literal["Pending", "Running", "Paused", "Concluded", "RolledBack", "Aborted", "Invalid"]
TERMINAL_PHASES = ("Concluded", "RolledBack", "Aborted")


class Variant(Model):
    name: Name
    service: Name = Field(description="Service named in the HTTPRoute backendRefs.")
    control: bool = Field(default=False, description="Exactly one variant is the control.")
    weight: int | None = Field(
        default=None, ge=0, le=100, description="Fixed allocation weight; default: an equal split."
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
                    "!self.variants.exists(v, has(v.weight)) || "
                    "self.variants.map(v, has(v.weight) ? v.weight : 0).sum() == 100",
                    "variant weights must sum to 100 when set",
                    ".variants",
                ),
            ]
        },
    )
    variants: list[Variant] = Field(min_length=2, max_length=10)
    trafficRouting: TrafficRouting
    allocation: Allocation = Field(default_factory=Allocation)
    primaryMetric: PrimaryMetric
    guardrails: list[Guardrail] = Field(default_factory=list, max_length=20)
    successCriteria: SuccessCriteria
    stoppingRules: StoppingRules = Field(default_factory=StoppingRules)
    analysis: ExperimentAnalysis
    onSuccess: Literal["promoteWinner", "keep"] = "promoteWinner"
    onFailure: Literal["rollback", "keep"] = "rollback"
    paused: bool = False


class VariantStatus(Model):
    name: str
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
    verdict: str | None = None
    reason: str | None = None


class Handled(Model):
    """The annotation values already acted on (each new value acts once)."""

    abort: str | None = None
    resume: str | None = None


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
    sampleSizePerVariant: int | None = None
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
    srmSince: datetime | None = Field(default=None, description="When the split last changed.")


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Winner", "type": "string", "jsonPath": ".status.winner"},
    {"name": "SRM-p", "type": "number", "jsonPath": ".status.srmPValue"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Message", "type": "string", "jsonPath": ".status.message"},
]
