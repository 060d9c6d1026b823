"""Types shared by ModelRollout and ModelExperiment (pydantic v2; the CRD schemas are generated from them)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from pydantic.json_schema import JsonDict

GROUP = "mlrollouts.io"
VERSION = "v1alpha1"

# Go/Kubernetes duration syntax, so CEL's duration() can check bounds at apply time.
DURATION_PATTERN = r"^([0-9]+(ms|s|m|h))+$"
_DURATION_PART = re.compile(r"([0-9]+)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

Duration = Annotated[str, StringConstraints(pattern=DURATION_PATTERN, max_length=32)]
# DNS-1123 label: every name that ends up inside PromQL or an API path is one, so it cannot inject.
Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)]
PromQL = Annotated[str, StringConstraints(min_length=1, max_length=4096)]


#: Longest value of an action annotation (``mlrollouts.io/abort``, ``promote``, ``resume``, ``retry``) that
#: the operator copies into status, Events and notifications; a longer one is cut and marked.
MAX_ANNOTATION_VALUE = 256
#: The action annotations (each new value acts once); ModelExperiment has all but promote.
ACTION_ANNOTATIONS = (
    f"{GROUP}/promote",
    f"{GROUP}/promote-full",
    f"{GROUP}/abort",
    f"{GROUP}/resume",
    f"{GROUP}/retry",
)
#: Longest free text (status.message, a condition's or history entry's message, a notification's
#: message) the operator writes; a longer one is cut and ends with TRUNCATED.
MAX_MESSAGE = 1024
#: ``status.series`` keeps at most this many points (analyses; the rest are in the series archive)...
SERIES_LIMIT = 5
#: ...and at most this many bytes of JSON (the points as written to status), the newest point always kept.
SERIES_MAX_BYTES = 8 * 1024
TRUNCATED = "…[truncated]"


def truncate(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` if it has at most ``limit`` characters, else its start and TRUNCATED (``limit`` in all)."""
    if len(text) <= limit:
        return text
    return text[: max(0, limit - len(TRUNCATED))] + TRUNCATED


def annotation_value(value: str) -> str:
    """An action annotation's value as the operator records it: at most MAX_ANNOTATION_VALUE characters.

    A longer value keeps its start and ends with ``…[truncated <12 hex of its SHA-256>]``, so two
    different long values stay different (each new value of an action annotation acts once).
    """
    if len(value) <= MAX_ANNOTATION_VALUE:
        return value
    mark = f"…[truncated {hashlib.sha256(value.encode()).hexdigest()[:12]}]"
    return value[: MAX_ANNOTATION_VALUE - len(mark)] + mark


def action_annotations(annotations: Mapping[str, Any] | None) -> dict[str, str]:
    """The object's action annotations (ACTION_ANNOTATIONS; no other), each bounded by
    :func:`annotation_value`: all the operator ever reads or copies of an object's annotations."""
    got = annotations or {}
    return {k: annotation_value(str(got[k])) for k in ACTION_ANNOTATIONS if k in got}


def parse_duration(value: str) -> float:
    """Seconds in a Go-style duration such as ``90s``, ``5m``, ``1h30m`` or ``500ms``."""
    if not re.fullmatch(DURATION_PATTERN, value):
        raise ValueError(f"invalid duration {value!r}: use a number and a unit of ms, s, m or h, e.g. 30s")
    return sum(int(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(value))


def format_duration(seconds: float) -> str:
    """A whole-second Go duration (``0s`` minimum) for PromQL range selectors."""
    return f"{max(1, round(seconds))}s"


def list_map(key: str = "name") -> JsonDict:
    """Schema extra for a list whose items are unique by ``key`` (the API server rejects duplicates)."""
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": [key]}


def cel(rule: str, message: str, field_path: str | None = None) -> JsonDict:
    """One x-kubernetes-validations rule, checked by the API server at apply time."""
    out: JsonDict = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


class Model(BaseModel):
    """Base: camelCase field names as in Kubernetes, unknown fields rejected."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class SecretKeyRef(Model):
    name: Name
    key: str = Field(default="token", min_length=1, max_length=253)


#: An http(s) URL with a host name, an optional port and path: no user:password@, no query or fragment
#: (IPv6 literals are not accepted). Everything the operator sends goes to scheme://host:port/path/api/v1.
ADDRESS_PATTERN = r"^https?://[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?(:[0-9]{1,5})?(/[-A-Za-z0-9._~/]*)?$"
Address = Annotated[str, StringConstraints(min_length=8, max_length=2048, pattern=ADDRESS_PATTERN)]
#: Longest per-query timeout (CEL and the operator both check it).
MAX_TIMEOUT = "30s"
#: Longest guardrail window.
MAX_WINDOW = "24h"


def _timeout_rule(field: str) -> JsonDict:
    return cel(
        f"!has(self.{field}) || (duration(self.{field}) > duration('0s') && "
        f"duration(self.{field}) <= duration('{MAX_TIMEOUT}'))",
        f"{field} must be more than 0s and at most {MAX_TIMEOUT}",
        f".{field}",
    )


def check_timeout(value: str) -> str:
    seconds = parse_duration(value)
    if not 0 < seconds <= parse_duration(MAX_TIMEOUT):
        raise ValueError(f"must be more than 0s and at most {MAX_TIMEOUT}")
    return value


def check_window(value: str) -> str:
    seconds = parse_duration(value)
    if not 0 < seconds <= parse_duration(MAX_WINDOW):
        raise ValueError(f"must be more than 0s and at most {MAX_WINDOW}")
    return value


class PrometheusConfig(Model):
    """Inline Prometheus of a tenant's object: an address only, which the operator's allowlist must admit."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"x-kubernetes-validations": [_timeout_rule("timeout")]}
    )
    address: Address = Field(
        description="Base URL of the Prometheus HTTP API, e.g. http://prometheus.monitoring:9090. Used only "
        "if the operator's --allowed-provider-address list (or a ClusterMetricProvider) admits it."
    )
    timeout: Duration = Field(default="5s", description="Per-query timeout (more than 0s, at most 30s).")
    bearerTokenSecret: SecretKeyRef | None = Field(
        default=None,
        description="Refused (Valid=False): a tenant's object never names both a credential and a "
        "destination. Put credentials in a ClusterMetricProvider and reference it as analysis.provider.",
    )
    insecureSkipVerify: bool = False

    _timeout = field_validator("timeout")(check_timeout)


class GatewayAPIRouting(Model):
    httpRoute: Name = Field(description="HTTPRoute whose backendRefs weights the operator sets.")
    ruleIndex: int = Field(default=0, ge=0, le=63, description="Which rule of the HTTPRoute to weight.")


class IstioRouting(Model):
    virtualService: Name = Field(
        description="Istio VirtualService (networking.istio.io/v1) whose route destinations' weights the "
        "operator sets; it must opt in with the mlrollouts.io/managed-by annotation."
    )
    routeName: str | None = Field(
        default=None,
        max_length=253,
        description="Which entry of the VirtualService's spec.http to weight, by its name; unset: the "
        "VirtualService must have exactly one http route. A destination is an arm's Service by its "
        "host (short or <svc>.<namespace>[.svc[.cluster.local]]), or by its subset when it has one.",
    )


class ReplicaRouting(Model):
    totalReplicas: int = Field(ge=1, le=1000)


class KServeRouting(Model):
    inferenceService: Name


HeaderName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$", max_length=128)]
# RFC 6265 cookie-name (a token) and cookie-octets: nothing that needs escaping in a Cookie header.
CookieName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$", max_length=128)]
CookieValue = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9!#$%&'()*+./:<=>?@^_`{|}~-]*$", max_length=256)
]


class HeaderMatch(Model):
    """A request header a matching request carries."""

    name: HeaderName = Field(description="Header name (not Cookie: use cookies).")
    value: str = Field(min_length=1, max_length=1024, description="The value, or a regular expression (RE2).")
    type: Literal["Exact", "RegularExpression"] = Field(
        default="Exact", description="Exact, or RegularExpression matched against the whole value."
    )


class CookieMatch(Model):
    """A cookie a matching request carries (matched in the Cookie header)."""

    name: CookieName
    value: CookieValue = Field(description="The cookie's exact value.")


class RouteMatch(Model):
    """Requests that go to the candidate (a ModelExperiment: to ``variant``) from the start: testers,
    a beta cohort. The operator adds one route rule of its own for them and removes it at the end."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "(has(self.headers) ? size(self.headers) : 0) + "
                    "(has(self.cookies) ? size(self.cookies) : 0) >= 1",
                    "match: name at least one header or cookie",
                ),
                cel(
                    "!has(self.headers) || self.headers.all(h, h.name.lowerAscii() != 'cookie')",
                    "match.headers: match a cookie with match.cookies",
                ),
                cel(
                    "!has(self.headers) || self.headers.all(h, self.headers.filter(g, g.name.lowerAscii() == "
                    "h.name.lowerAscii()).size() == 1)",
                    "match.headers: each header at most once",
                ),
            ]
        },
    )
    headers: list[HeaderMatch] = Field(
        default_factory=list, max_length=8, description="All must be present (AND)."
    )
    cookies: list[CookieMatch] = Field(
        default_factory=list,
        max_length=1,
        description="At most one cookie: a route match tests the Cookie header once.",
    )
    variant: Name | None = Field(
        default=None,
        description="ModelExperiment only (required there): the variant matching requests go to. "
        "A ModelRollout's matching requests go to its candidate.",
    )


class Affinity(Model):
    """Sticky cohorts: once sent to an arm, a user stays on it for the rollout or experiment."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("has(self.cookie) != has(self.header)", "affinity: set exactly one of cookie, header"),
            ]
        },
    )
    cookie: CookieName | None = Field(
        default=None, description="Cookie the proxy sets on each weighted answer (NAME=<arm's backend>)."
    )
    header: HeaderName | None = Field(
        default=None,
        description="Response header carrying the arm's backend; clients that send it back stay on that arm.",
    )


class TrafficRouting(Model):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "[has(self.gatewayAPI), has(self.istio), has(self.replicas), has(self.kserve)]"
                    ".filter(x, x).size() == 1",
                    "trafficRouting: set exactly one of gatewayAPI, istio, replicas, kserve",
                ),
            ]
        },
    )
    gatewayAPI: GatewayAPIRouting | None = None
    istio: IstioRouting | None = Field(
        default=None, description="Istio: weights of the destinations of one http route of a VirtualService."
    )
    replicas: ReplicaRouting | None = Field(default=None, description="Not implemented yet: Valid=False.")
    kserve: KServeRouting | None = Field(default=None, description="Not implemented yet: Valid=False.")
    match: RouteMatch | None = Field(
        default=None,
        description="Requests with these headers/cookies go to the candidate (an experiment: match.variant) "
        "while the rollout or experiment runs, through one route rule the operator adds and removes.",
    )
    affinity: Affinity | None = Field(
        default=None,
        description="Sticky cohorts: each user stays on the arm it was first sent to, by a cookie or header "
        "the proxy sets per arm and route rules the operator adds and removes.",
    )


ArgValue = Annotated[str, StringConstraints(max_length=253)]


class TemplateRef(Model):
    """Use a MetricTemplate or ClusterMetricTemplate instead of inline PromQL."""

    name: Name
    kind: Literal["MetricTemplate", "ClusterMetricTemplate"] = Field(
        default="ClusterMetricTemplate",
        description="ClusterMetricTemplate (the platform's) or MetricTemplate (in this object's namespace).",
    )
    args: dict[str, ArgValue] = Field(
        default_factory=dict,
        json_schema_extra={"maxProperties": 16},
        description="Values of the template's args, by name; each is checked against the arg's type.",
    )


class Guardrail(Model):
    """A metric that must stay within bounds at every analysis interval."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("has(self.min) || has(self.max)", "guardrail: set min, max or both"),
                cel(
                    "has(self.query) != has(self.templateRef)",
                    "guardrail: set exactly one of query or templateRef",
                ),
                cel(
                    "!has(self.min) || !has(self.max) || self.min <= self.max",
                    "guardrail: min must not exceed max",
                ),
            ]
        },
    )
    name: Name
    query: PromQL | None = Field(
        default=None,
        description="PromQL template; placeholders {{ variant }}, {{ service }}, "
        "{{ namespace }}, {{ deployment }}, {{ window }}. Or set templateRef.",
    )
    templateRef: TemplateRef | None = Field(default=None, description="A metric template's query instead.")
    min: float | None = None
    max: float | None = None
    failureLimit: int = Field(
        default=1, ge=1, le=100, description="Consecutive breaching measurements that fail the analysis."
    )


#: The CEL rules of every count metric (a rollout's comparison adds its own to these).
COUNT_METRIC_RULES: list[JsonDict] = [
    cel(
        "has(self.templateRef) || self.type != 'proportion' || (has(self.successes) && has(self.trials))",
        "a proportion metric needs successes and trials queries (or templateRef)",
    ),
    cel(
        "has(self.templateRef) || self.type != 'mean' || "
        "(has(self.sum) && has(self.count) && has(self.sumSquares))",
        "a mean metric needs sum, count and sumSquares queries (or templateRef)",
    ),
    cel(
        "!has(self.templateRef) || !(has(self.successes) || has(self.trials) || has(self.sum) "
        "|| has(self.count) || has(self.sumSquares))",
        "set templateRef or the metric's own queries, not both",
    ),
]


class CountMetric(Model):
    """A metric read as cumulative counts: a proportion (successes of trials) or a mean (n, Σx, Σx²)."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"x-kubernetes-validations": list(COUNT_METRIC_RULES)}
    )
    name: Name
    type: Literal["proportion", "mean"] = "proportion"
    successes: PromQL | None = None
    trials: PromQL | None = None
    sum: PromQL | None = None
    count: PromQL | None = None
    sumSquares: PromQL | None = None
    templateRef: TemplateRef | None = Field(
        default=None, description="A metric template's successes/trials (or count/sum/sumSquares) instead."
    )
    better: Literal["higher", "lower"] = "higher"


class AnalysisBase(Model):
    """When and where metrics are measured."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "duration(self.interval) >= duration('5s')",
                    "analysis.interval must be at least 5s",
                    ".interval",
                ),
                cel(
                    "!has(self.window) || (duration(self.window) > duration('0s') && "
                    f"duration(self.window) <= duration('{MAX_WINDOW}'))",
                    f"analysis.window must be more than 0s and at most {MAX_WINDOW}",
                    ".window",
                ),
                cel(
                    "has(self.provider) != has(self.prometheus)",
                    "analysis: set exactly one of provider (a ClusterMetricProvider's name) or prometheus",
                ),
            ]
        },
    )
    interval: Duration = Field(default="30s", description="How often metrics are measured (>= 5s).")
    window: Duration = Field(
        default="1m", description="Value of {{ window }} in guardrail queries (more than 0s, at most 24h)."
    )
    provider: Name | None = Field(
        default=None,
        description="Name of a ClusterMetricProvider: the platform's address, TLS settings and credentials.",
    )
    prometheus: PrometheusConfig | None = Field(
        default=None,
        description="Inline Prometheus address (no credentials), used only where the operator's "
        "allowlist admits it. Prefer provider.",
    )
    noData: Literal["hold", "fail"] = Field(
        default="hold", description="hold: never advance, promote or decide without data. fail: roll back."
    )
    errorLimit: int = Field(
        default=4,
        ge=1,
        le=1000,
        description="Consecutive analyses with a failed measurement (Prometheus unreachable, timeout, "
        "bad query) before onErrorLimit applies. No data is governed by noData, not by this.",
    )
    _window = field_validator("window")(check_window)

    onErrorLimit: Literal["rollback", "hold"] = Field(
        default="rollback",
        description="rollback: all traffic back to stable/control when errorLimit is reached. "
        "hold: keep the weights, set Healthy=False (reason ErrorLimitReached) and keep trying.",
    )


class ResourceSpec(Model):
    """What every spec of ours has; subclasses narrow ``analysis`` to their own analysis."""

    trafficRouting: TrafficRouting
    analysis: AnalysisBase


class Condition(Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    lastTransitionTime: datetime
    observedGeneration: int = 0


#: What a measurement concludes; the strings stored in status (analysis.vocabulary re-exports it).
Verdict = Literal["pass", "fail", "inconclusive", "noData", "error"]
#: Where an experiment variant stands, as stored in status.variants[].verdict.
VariantVerdict = Literal["control", "better", "worse", "inconclusive", "dropped", "notSelected"]
#: What a measurement returned: a finite value, no series, NaN/inf, or the provider could not be asked.
Outcome = Literal["value", "noData", "error", "nan"]


class SegmentRow(Model):
    """One segment of a segmented comparison, as the last analysis judged it."""

    segment: str
    status: Literal["pass", "fail", "inconclusive", "tooSmall"]
    stableN: float = 0.0
    candidateN: float = 0.0
    difference: float | None = None
    ciLow: float | None = None
    ciHigh: float | None = None
    pValue: float | None = Field(
        default=None, description="Anytime-valid p-value of harm beyond the margin, Holm-adjusted."
    )


#: What judged a measurement: a guardrail, a comparison, or a model judge (prediction shift, calibration).
MeasurementKind = Literal["guardrail", "comparison", "predictionShift", "calibration"]


class Measurement(Model):
    """One evaluated metric with the numbers behind its verdict."""

    name: str
    kind: MeasurementKind
    variant: str | None = None
    outcome: Outcome
    value: float | None = None
    threshold: str | None = None
    verdict: Verdict
    message: str
    details: dict[str, float] | None = None
    carried: bool | None = Field(
        default=None,
        description="Not measured in this analysis (e.g. a comparison at weight 100): the last value.",
    )
    segments: list[SegmentRow] | None = Field(
        default=None, description="A comparison with segments: each segment's verdict and numbers."
    )


class SeriesValue(Model):
    """One metric of one analysis in status.series (numbers rounded to 5 significant digits)."""

    name: str
    kind: MeasurementKind
    variant: str | None = None
    verdict: str
    value: float | None = Field(
        default=None, description="Guardrail: the measured value. Comparison: the estimated difference."
    )
    ciLow: float | None = Field(default=None, description="Comparison: low end of its confidence sequence.")
    ciHigh: float | None = Field(default=None, description="Comparison: high end of its confidence sequence.")


class ArmCounts(Model):
    """Sufficient statistics of one arm: n (trials or count), total (successes or sum), squares (means)."""

    n: float = 0.0
    total: float = 0.0
    squares: float = 0.0


class HistoryEntry(Model):
    time: datetime
    event: str
    phase: str
    weight: int | None = None
    step: int | None = None
    reason: str
    message: str
    values: dict[str, float] | None = None


class ResourceStatus(Model):
    """What every status of ours has; subclasses narrow ``phase`` to their own phases."""

    phase: str = "Pending"
    message: str = ""
    observedGeneration: int = 0
    lastAnalysisTime: datetime | None = Field(
        default=None,
        description="When metrics were last measured; the next analysis is due one interval later.",
    )
    consecutiveErrors: int = Field(
        default=0, description="Consecutive analyses with a failed measurement (see analysis.errorLimit)."
    )
    reconcileErrors: int = Field(
        default=0, description="Consecutive failed attempts to apply a decision (route write, API error)."
    )
    lastReconcileErrorTime: datetime | None = Field(
        default=None, description="When applying a decision last failed; retries back off exponentially."
    )
    conditions: list[Condition] = Field(default_factory=list)
    history: list[HistoryEntry] = Field(default_factory=list)


def set_condition(
    conditions: list[Condition],
    cond_type: str,
    status: Literal["True", "False", "Unknown"],
    reason: str,
    message: str,
    now: datetime,
    generation: int,
) -> list[Condition]:
    """Kubernetes-style upsert: lastTransitionTime moves only when status changes."""
    old = get_condition(conditions, cond_type)
    new = Condition(
        type=cond_type,
        status=status,
        reason=reason,
        message=message,
        lastTransitionTime=old.lastTransitionTime if old is not None and old.status == status else now,
        observedGeneration=generation,
    )
    if old is None:
        return [*conditions, new]
    return [new if c.type == cond_type else c for c in conditions]


def get_condition(conditions: list[Condition], cond_type: str) -> Condition | None:
    return next((c for c in conditions if c.type == cond_type), None)


def dump(model: BaseModel) -> dict[str, Any]:
    """JSON-ready dict for the API server (datetimes as RFC 3339, no nulls)."""
    return model.model_dump(mode="json", exclude_none=True, by_alias=True)
