"""MetricTemplate (namespaced) and ClusterMetricTemplate: named queries with typed args.

A guardrail, comparison or primary metric sets ``templateRef`` instead of its own PromQL. The
template's queries use the usual placeholders (``{{ service }}``, ``{{ window }}``, ...) plus
``{{ args.NAME }}`` for each declared arg; an arg's value is checked against its type before it
is put into PromQL, so no quote, brace or operator can be injected through it.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, StringConstraints

from model_rollouts.api.common import DURATION_PATTERN, ArgValue, Model, PromQL, cel, list_map

TEMPLATE_KIND = "MetricTemplate"
TEMPLATE_PLURAL = "metrictemplates"
CLUSTER_TEMPLATE_KIND = "ClusterMetricTemplate"
CLUSTER_TEMPLATE_PLURAL = "clustermetrictemplates"

ArgName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=63)]

#: What a value of each arg type may look like once it is inside PromQL.
ARG_PATTERNS: dict[str, re.Pattern[str]] = {
    # Label values and metric-name fragments: no quote, backslash, brace, bracket, space or operator.
    "string": re.compile(r"^[A-Za-z0-9_.:/-]{0,253}$"),
    "number": re.compile(r"^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$"),
    "duration": re.compile(DURATION_PATTERN),
}

QUERY_FIELDS = ("query", "successes", "trials", "sum", "count", "sumSquares")


class TemplateArg(Model):
    name: ArgName = Field(description="Referenced in the template's queries as {{ args.NAME }}.")
    type: Literal["string", "number", "duration"] = Field(
        default="string",
        description="string: letters, digits and _ . : / - only; number: a decimal number; duration: 5m.",
    )
    default: ArgValue | None = Field(default=None, description="Used when a reference does not set it.")


class MetricTemplateSpec(Model):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "has(self.query) || has(self.successes) || has(self.sum)",
                    "a metric template needs query (for guardrails) or successes/trials or "
                    "count/sum/sumSquares (for comparisons and primary metrics)",
                ),
                cel(
                    "has(self.successes) == has(self.trials)",
                    "successes and trials go together",
                ),
                cel(
                    "has(self.sum) == has(self.count) && has(self.sum) == has(self.sumSquares)",
                    "count, sum and sumSquares go together",
                ),
            ]
        },
    )
    description: str | None = Field(default=None, max_length=1024)
    args: list[TemplateArg] = Field(default_factory=list, max_length=16, json_schema_extra=list_map())
    query: PromQL | None = Field(default=None, description="A single value, for guardrails.")
    successes: PromQL | None = None
    trials: PromQL | None = None
    sum: PromQL | None = None
    count: PromQL | None = None
    sumSquares: PromQL | None = None


TEMPLATE_COLUMNS: list[dict[str, Any]] = [
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]
