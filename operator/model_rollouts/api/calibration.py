"""The calibration judge's spec: the candidate's expected calibration error against the stable's."""

from __future__ import annotations

from pydantic import ConfigDict, Field

from model_rollouts.api.common import Model, Name, PromQL, cel
from model_rollouts.api.shift import ARM_SLOT_RE, arm_rule

DEFAULT_MARGIN = 0.05
DEFAULT_MIN_SAMPLES = 500


class Calibration(Model):
    """Roll back a candidate whose predicted probabilities are less calibrated than the stable's."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "x-kubernetes-validations": [
                arm_rule("outcomes"),
                cel(
                    f"!has(self.scoreSums) || self.scoreSums.matches('{ARM_SLOT_RE}')",
                    "scoreSums must select one arm with {{ service }} (or {{ variant }}, {{ deployment }})",
                    ".scoreSums",
                ),
            ]
        },
    )

    name: Name
    outcomes: PromQL = Field(
        description="PromQL template giving one arm's labelled predictions by bin (the predicted-probability "
        "bin's upper bound) and outcome (positive or negative), e.g. sum by (bin, outcome) (increase("
        'model_calibration_outcomes_total{service="{{ service }}"}[{{ window }}])).'
    )
    scoreSums: PromQL | None = Field(
        default=None,
        description="Optional: the sum of predicted probabilities by bin (each bin's mean prediction); "
        "without it, the bin's midpoint.",
    )
    margin: float = Field(
        default=DEFAULT_MARGIN,
        gt=0,
        lt=1,
        description="How much higher the candidate's expected calibration error (ECE) may be.",
    )
    minSamples: int = Field(
        default=DEFAULT_MIN_SAMPLES,
        ge=1,
        description="Labelled predictions each arm needs before any verdict.",
    )
