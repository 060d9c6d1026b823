"""The prediction-shift judge's spec: the candidate's score distribution against the stable's."""

from __future__ import annotations

from pydantic import ConfigDict, Field

from model_rollouts.api.common import JsonDict, Model, Name, PromQL, cel

#: A judge's query must select one arm (else both arms read the same series and nothing is compared).
ARM_SLOT_RE = "[{][{] *(service|variant|deployment) *[}][}]"
ARM_SLOT_MESSAGE = "must select one arm with {{ service }} (or {{ variant }}, {{ deployment }})"


def arm_rule(field: str) -> JsonDict:
    """The CEL rule that a query field selects one arm (checked by the API server; the pydantic model
    does not repeat it, so a judge can be built from a bare query in the pure core)."""
    return cel(f"self.{field}.matches('{ARM_SLOT_RE}')", f"{field} {ARM_SLOT_MESSAGE}", f".{field}")


DEFAULT_MAX_PSI = 0.1
DEFAULT_MIN_SAMPLES = 500


class PredictionShift(Model):
    """Stop a candidate whose prediction-score distribution has moved away from the stable's."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"x-kubernetes-validations": [arm_rule("buckets")]}
    )

    name: Name
    buckets: PromQL = Field(
        description="PromQL template giving one arm's cumulative histogram buckets by le, e.g. sum by (le) "
        '(increase(model_prediction_score_bucket{service="{{ service }}"}[{{ window }}])).'
    )
    maxPSI: float = Field(
        default=DEFAULT_MAX_PSI,
        gt=0,
        le=10,
        description="The population stability index (PSI) that counts as a material shift (0.1: moderate, "
        "0.25: major). Fail when the shift is significant and its bias-corrected PSI is at least this; pass "
        "when the data show a PSI below it.",
    )
    minSamples: int = Field(
        default=DEFAULT_MIN_SAMPLES, ge=1, description="Scores each arm needs before any verdict."
    )
