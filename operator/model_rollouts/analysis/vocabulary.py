"""The one vocabulary of an analysis: verdicts, arm roles, a measurement's result, a judge's finding."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from model_rollouts.api.common import (
    ArmCounts,
    Measurement,
    MeasurementKind,
    Outcome,
    VariantVerdict,
    Verdict,
)

__all__ = [
    "ROLES",
    "ArmCounts",
    "Finding",
    "Outcome",
    "Result",
    "Role",
    "VariantVerdict",
    "Verdict",
    "measurement",
]

#: The two sides of every comparison: the baseline (a rollout's stable, an experiment's control) and
#: the candidate (a rollout's candidate, an experiment's variant).
#: Per arm, its sufficient statistics are ``ArmCounts`` (n, total, squares), stored per epoch in status.
Role = Literal["baseline", "candidate"]
ROLES: tuple[Role, Role] = ("baseline", "candidate")


@dataclass(frozen=True)
class Result:
    """One measurement from a provider. Exactly one of four outcomes; only ``value`` can ever pass."""

    outcome: Outcome
    value: float | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome == "value"


@dataclass(frozen=True)
class Finding:
    """What a judge concludes: a verdict, a sentence saying why, and the numbers behind it."""

    verdict: Verdict
    message: str
    outcome: Outcome = "value"
    value: float | None = None
    threshold: str | None = None
    numbers: dict[str, float] = field(default_factory=dict)


def measurement(f: Finding, name: str, kind: MeasurementKind, variant: str | None) -> Measurement:
    """A finding as it is stored in status (``lastAnalysis``)."""
    return Measurement(
        name=name,
        kind=kind,
        variant=variant,
        outcome=f.outcome,
        value=f.value,
        threshold=f.threshold,
        verdict=f.verdict,
        message=f.message,
        details=dict(f.numbers) or None,
    )
