"""The segments judge's spec (``comparisons[].segments``) and its per-segment status rows."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints, field_validator

from model_rollouts.api.common import Model, SegmentRow

#: The placeholder a segmented comparison's queries use for the segment's value.
SEGMENT_PLACEHOLDER = "segment"
#: Default smallest sample (the smaller arm) for a segment to be judged at all.
DEFAULT_MIN_SAMPLES = 200
MAX_SEGMENTS = 20
__all__ = ["DEFAULT_MIN_SAMPLES", "SEGMENT_PLACEHOLDER", "SegmentRow", "Segments"]

# A Prometheus label name, and a value that is safe inside a PromQL string (the operator renders it
# into the queries, so only DNS-label-like values are accepted: no quote, brace or backslash).
LabelName = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$", max_length=63)]
SegmentValue = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=63)]


class Segments(Model):
    """Judge the comparison in every segment too: "no cohort left behind"."""

    label: LabelName = Field(
        description="The label the segments are told apart by (e.g. region); it names them in status, "
        "Events and the plugin. The queries select one segment with {{ segment }}, e.g. "
        'region="{{ segment }}".'
    )
    values: list[SegmentValue] = Field(
        min_length=2,
        max_length=MAX_SEGMENTS,
        json_schema_extra={"x-kubernetes-list-type": "set"},
        description="The segments to judge, each rendered into {{ segment }} (lowercase letters, digits, "
        "'-' and '.'). The pooled comparison is their sum.",
    )
    minSamples: int = Field(
        default=DEFAULT_MIN_SAMPLES,
        ge=1,
        le=10_000_000,
        description="A segment whose smaller arm has fewer samples is reported tooSmall: never a pass or a "
        "fail.",
    )
    tooSmall: Literal["hold", "ignore"] = Field(
        default="hold",
        description="hold (default): while a segment is tooSmall the comparison cannot pass (the candidate "
        "stays below 100% until it fills, or progressDeadline applies). ignore: a tooSmall segment is "
        "reported and left out of the decision.",
    )

    @field_validator("values")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("segment values must be distinct")
        return v
