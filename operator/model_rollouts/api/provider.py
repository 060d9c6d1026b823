"""ClusterMetricProvider: a metric provider owned by the platform team (cluster-scoped).

A tenant's ModelRollout or ModelExperiment names one as ``analysis.provider``; it never carries
an address together with a credential. The credentials Secret is read only from the operator's own
namespace (``--provider-secret-namespace``), never from the tenant's.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from model_rollouts.api.calibration import Calibration
from model_rollouts.api.common import (
    MAX_TIMEOUT,
    Address,
    CountMetric,
    Duration,
    Guardrail,
    Model,
    SecretKeyRef,
    cel,
    check_timeout,
)
from model_rollouts.api.shift import PredictionShift

PROVIDER_KIND = "ClusterMetricProvider"
PROVIDER_PLURAL = "clustermetricproviders"


class ProviderPrometheus(Model):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.timeout) || (duration(self.timeout) > duration('0s') && "
                    f"duration(self.timeout) <= duration('{MAX_TIMEOUT}'))",
                    f"timeout must be more than 0s and at most {MAX_TIMEOUT}",
                    ".timeout",
                )
            ]
        },
    )
    address: Address = Field(description="Base URL of the Prometheus HTTP API.")
    timeout: Duration = Field(default="5s", description="Per-query timeout (more than 0s, at most 30s).")
    insecureSkipVerify: bool = Field(default=False, description="Do not verify the server's TLS certificate.")
    caSecret: SecretKeyRef | None = Field(
        default=None,
        description="PEM CA bundle to verify the server with, in a Secret of the operator's namespace.",
    )
    bearerTokenSecret: SecretKeyRef | None = Field(
        default=None,
        description="Bearer token (one line) in a Secret of the operator's namespace; never a tenant's.",
    )

    _timeout = field_validator("timeout")(check_timeout)


class ClusterMetricProviderSpec(Model):
    prometheus: ProviderPrometheus
    allowInlineQueries: bool = Field(
        default=True,
        description="false: objects using this provider (by name, or by naming its server inline) must "
        "take every query from a ClusterMetricTemplate (templateRef); an inline query or a tenant's "
        "MetricTemplate gives Valid=False naming its field.",
    )


_QUERY_FIELDS: tuple[tuple[type[BaseModel], tuple[str, ...]], ...] = (
    (Guardrail, ("query",)),
    (CountMetric, ("successes", "trials", "sum", "count", "sumSquares")),
    (PredictionShift, ("buckets",)),
    (Calibration, ("outcomes", "scoreSums")),
)


def _metrics(model: BaseModel, path: str) -> list[tuple[str, BaseModel]]:
    """(path, item) of every Guardrail, CountMetric or model judge in ``model``, walked generically, so a
    new place that holds one is covered."""
    out: list[tuple[str, BaseModel]] = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
        for i, item in items:
            if not isinstance(item, BaseModel):
                continue
            sub = f"{path}.{name}" if i is None else f"{path}.{name}[{i}]"
            if isinstance(item, tuple(cls for cls, _ in _QUERY_FIELDS)):
                out.append((sub, item))
            out += _metrics(item, sub)
    return out


def inline_query_fields(model: BaseModel, path: str) -> list[str]:
    """Paths of the inline PromQL queries in ``model`` (guardrails, comparisons, primary metrics)."""
    out: list[str] = []
    for sub, item in _metrics(model, path):
        for cls, fields in _QUERY_FIELDS:
            if isinstance(item, cls):
                out += [f"{sub}.{q}" for q in fields if getattr(item, q) is not None]
    return out


def namespaced_template_fields(model: BaseModel, path: str) -> list[str]:
    """Paths of the templateRefs in ``model`` that name a (tenant's) MetricTemplate, not the platform's
    ClusterMetricTemplate: a provider that allows no inline queries refuses them too."""
    out: list[str] = []
    for sub, item in _metrics(model, path):
        ref = getattr(item, "templateRef", None)
        if ref is not None and ref.kind != "ClusterMetricTemplate":
            out.append(f"{sub}.templateRef.kind")
    return out


PROVIDER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Address", "type": "string", "jsonPath": ".spec.prometheus.address"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]
