"""ModelRollout: a progressive canary from a stable to a candidate model version."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import ConfigDict, Field

from model_rollouts.api.common import (
    AnalysisBase,
    CountMetric,
    Duration,
    Guardrail,
    Measurement,
    Model,
    Name,
    ResourceSpec,
    ResourceStatus,
    TrafficRouting,
    cel,
)

KIND = "ModelRollout"
PLURAL = "modelrollouts"

# Annotations a user (or the kubectl plugin) sets to act on a rollout. The operator never
# writes them: it remembers the last value it acted on in status.handled.
ANNOTATION_PROMOTE = "mlrollouts.io/promote"
ANNOTATION_ABORT = "mlrollouts.io/abort"
ANNOTATION_RESUME = "mlrollouts.io/resume"

Phase = Literal["Pending", "Progressing", "Paused", "Promoted", "RolledBack", "Aborted", "Invalid"]
TERMINAL_PHASES = ("Promoted", "RolledBack", "Aborted")


class VariantRef(Model):
    service: Name = Field(description="Service named in the HTTPRoute backendRefs.")
    deployment: Name | None = Field(
        default=None, description="Deployment serving this variant (informational)."
    )
    modelVersion: str | None = Field(default=None, max_length=128)


class Pause(Model):
    duration: Duration | None = Field(default=None, description="Omit to wait until resumed.")


class AnalysisStep(Model):
    duration: Duration = Field(description="Hold the current weight and analyse for this long.")


class Step(Model):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "[has(self.setWeight), has(self.pause), has(self.analysis)].filter(x, x).size() == 1",
                    "each step sets exactly one of setWeight, pause, analysis",
                ),
            ]
        },
    )
    setWeight: int | None = Field(default=None, ge=0, le=100, description="Candidate traffic percentage.")
    pause: Pause | None = None
    analysis: AnalysisStep | None = None


class Comparison(CountMetric):
    """Candidate vs stable on one metric, tested with an always-valid sequential test."""

    test: Literal["nonInferiority", "superiority"] = "nonInferiority"
    margin: float = Field(default=0.0, ge=0, description="Absolute non-inferiority margin.")
    requiredToPromote: bool = Field(
        default=False, description="Hold before promotion until this comparison passes."
    )


class Analysis(AnalysisBase):
    guardrails: list[Guardrail] = Field(default_factory=list, max_length=20)
    comparisons: list[Comparison] = Field(default_factory=list, max_length=10)
    alpha: float = Field(default=0.05, gt=0, lt=0.5, description="Family-wise error rate of the comparisons.")


class ModelRolloutSpec(ResourceSpec):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.stable.service != self.candidate.service",
                    "candidate.service must differ from stable.service",
                    ".candidate.service",
                ),
            ]
        },
    )
    stable: VariantRef
    candidate: VariantRef
    trafficRouting: TrafficRouting
    steps: list[Step] = Field(min_length=1, max_length=100)
    analysis: Analysis
    maxWeightStep: int | None = Field(
        default=None, ge=1, le=100, description="Split larger weight jumps into steps of at most this."
    )
    paused: bool = False


class Handled(Model):
    promote: str | None = None
    abort: str | None = None
    resume: str | None = None


class ModelRolloutStatus(ResourceStatus):
    phase: Phase = "Pending"
    revision: str | None = None
    revisionStartedAt: datetime | None = None
    currentStep: int = 0
    stepStartedAt: datetime | None = None
    stepWeight: int | None = Field(default=None, description="Intermediate weight while a jump is split.")
    weight: int = 0
    guardrailFailures: dict[str, int] = Field(default_factory=dict)
    lastAnalysis: list[Measurement] = Field(default_factory=list)
    handled: Handled = Field(default_factory=Handled)


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.currentStep"},
    {"name": "Weight", "type": "integer", "jsonPath": ".status.weight"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 0},
]
