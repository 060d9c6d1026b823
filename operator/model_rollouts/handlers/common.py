"""I/O shared by the handlers: API clients, status writes, Events, providers and routers from a spec."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import json
import logging
import tempfile
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, cast
from urllib.parse import urlsplit

import kopf
import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from model_rollouts import leader, telemetry
from model_rollouts.analysis import stats
from model_rollouts.api.common import (
    GROUP,
    MAX_MESSAGE,
    MAX_TIMEOUT,
    VERSION,
    AnalysisBase,
    Model,
    ResourceSpec,
    ResourceStatus,
    SecretKeyRef,
    TemplateRef,
    TrafficRouting,
    dump,
    parse_duration,
    set_condition,
    truncate,
)
from model_rollouts.api.provider import (
    PROVIDER_PLURAL,
    ClusterMetricProviderSpec,
    inline_query_fields,
    namespaced_template_fields,
)
from model_rollouts.api.template import (
    CLUSTER_TEMPLATE_PLURAL,
    TEMPLATE_KIND,
    TEMPLATE_PLURAL,
    MetricTemplateSpec,
)
from model_rollouts.engine.actions import LIMIT_REASONS, Event
from model_rollouts.engine.status import bound_texts
from model_rollouts.engine.status import invalid as invalid_status
from model_rollouts.metrics import policy, pools
from model_rollouts.metrics.prometheus import PrometheusProvider
from model_rollouts.metrics.provider import (
    Budgeted,
    MetricProvider,
    Result,
    TemplateError,
    check_template,
    render,
)
from model_rollouts.metrics.templates import check_platform_template, fill
from model_rollouts.notify import Notice
from model_rollouts.notify import events as notify_events
from model_rollouts.notify import sender as notify_sender
from model_rollouts.traffic.gateway_api import GatewayAPIRouter
from model_rollouts.traffic.router import NotOptedIn, RouterError, TrafficRouter

#: Seconds any single Kubernetes API call may take.
REQUEST_TIMEOUT = 10
_api: client.ApiClient | None = None
_lock = threading.Lock()


def api() -> client.ApiClient:
    global _api
    with _lock:
        if _api is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            _api = client.ApiClient()
        return _api


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def get_object(plural: str, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        obj = cast(
            dict[str, Any],
            client.CustomObjectsApi(api()).get_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name, _request_timeout=REQUEST_TIMEOUT
            ),
        )
        return obj
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def write_status(plural: str, obj: dict[str, Any], status: dict[str, Any]) -> bool:
    """Replace status via the status subresource, guarded by resourceVersion. False on a real conflict.

    A 409 whose fresh object carries the very status, spec and annotations this decision was made
    from (someone touched only other metadata, or a proxy answered 409) is retried with the fresh
    resourceVersion, and so is a transient 5xx or dropped connection (twice): the analysis that led
    here is recorded rather than thrown away and repeated.
    """
    kopf_state = (obj.get("status") or {}).get("kopf")
    if kopf_state is not None:
        status = {**status, "kopf": kopf_state}
    meta = obj["metadata"]
    rv = meta["resourceVersion"]
    for attempt in range(3):
        body = {
            "apiVersion": obj["apiVersion"],
            "kind": obj["kind"],
            "metadata": {"name": meta["name"], "namespace": meta["namespace"], "resourceVersion": rv},
            "status": status,
        }
        try:
            client.CustomObjectsApi(api()).replace_namespaced_custom_object_status(
                GROUP,
                VERSION,
                meta["namespace"],
                plural,
                meta["name"],
                body,
                _request_timeout=REQUEST_TIMEOUT,
            )
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            if e.status == 409:
                fresh = get_object(plural, meta["namespace"], meta["name"])
                if fresh is None or not _same_inputs(obj, fresh):
                    return False
                rv = fresh["metadata"]["resourceVersion"]
                continue
            if e.status is None or e.status < 500 or attempt == 2:
                raise
        except urllib3.exceptions.HTTPError:
            if attempt == 2:
                raise
        time.sleep(0.2 * (attempt + 1))
    return False


def _same_inputs(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two versions of an object carry the same spec, annotations and status (minus Kopf's)."""

    def strip(o: Mapping[str, Any]) -> tuple[Any, ...]:
        st = {k: v for k, v in (o.get("status") or {}).items() if k != "kopf"}
        return (o.get("spec"), (o["metadata"].get("annotations") or {}), st, o["metadata"].get("generation"))

    return strip(a) == strip(b)


def post_event(obj: dict[str, Any], event_type: str, reason: str, message: str) -> None:
    meta = obj["metadata"]
    ts = dt.datetime.now(dt.UTC)
    ev = client.CoreV1Event(
        metadata=client.V1ObjectMeta(
            name=f"{meta['name']}.{uuid.uuid4().hex[:12]}", namespace=meta["namespace"]
        ),
        involved_object=client.V1ObjectReference(
            api_version=obj["apiVersion"],
            kind=obj["kind"],
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta.get("uid"),
            resource_version=meta.get("resourceVersion"),
        ),
        reason=reason,
        message=truncate(message, MAX_MESSAGE),
        type=event_type,
        first_timestamp=ts,
        last_timestamp=ts,
        count=1,
        source=client.V1EventSource(component="model-rollouts"),
        reporting_component="model-rollouts",
        reporting_instance="model-rollouts",
    )
    with contextlib.suppress(Exception):  # Events are best effort; status holds the record.
        client.CoreV1Api(api()).create_namespaced_event(
            meta["namespace"], ev, _request_timeout=REQUEST_TIMEOUT
        )


def make_router(
    routing: TrafficRouting, namespace: str, owner: tuple[str, str] | None = None
) -> TrafficRouter:
    """``owner`` (kind, name) writes the weights (the route must opt in to it); None: read only."""
    if routing.gatewayAPI is not None:
        gw = routing.gatewayAPI
        return GatewayAPIRouter(api(), namespace, gw.httpRoute, gw.ruleIndex, owner=owner)
    for field in ("istio", "replicas", "kserve"):
        if getattr(routing, field) is not None:
            raise RouterError(
                f"spec.trafficRouting.{field}",
                "this router is not implemented in this version; use gatewayAPI",
            )
    raise RouterError("spec.trafficRouting", "set exactly one router")


#: Seconds a list of ClusterMetricProviders (for the inline-address allowlist) is reused.
PROVIDER_CACHE_SECONDS = 10.0
_provider_list: tuple[float, list[tuple[str, ClusterMetricProviderSpec]]] = (0.0, [])
_providers: dict[tuple[Any, ...], PrometheusProvider] = {}
_providers_lock = threading.Lock()


def _cluster_providers() -> list[tuple[str, ClusterMetricProviderSpec]]:
    """(name, spec) of every valid ClusterMetricProvider (cached briefly); [] if they cannot be listed."""
    global _provider_list
    at, found = _provider_list
    if time.monotonic() - at < PROVIDER_CACHE_SECONDS:
        return found
    found = []
    try:
        listing = client.CustomObjectsApi(api()).list_cluster_custom_object(
            GROUP, VERSION, PROVIDER_PLURAL, _request_timeout=REQUEST_TIMEOUT
        )
        for i in cast(dict[str, Any], listing)["items"]:
            with contextlib.suppress(ValidationError):
                found.append(
                    (
                        str(i["metadata"]["name"]),
                        ClusterMetricProviderSpec.model_validate(i.get("spec") or {}),
                    )
                )
    except Exception:
        found = []
    _provider_list = (time.monotonic(), found)
    return found


def _server(address: str) -> tuple[str, str, int | None]:
    """Scheme, host and port of an address (default ports filled in): what "the same server" means."""
    parts = urlsplit(address.strip())
    try:
        port = parts.port
    except ValueError:
        port = None
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)


def _secret_value(ref: SecretKeyRef, field: str, what: str) -> str:
    """A key of a Secret in the operator's own namespace; RouterError (fixed text) if it cannot be had."""
    namespace = policy.POLICY.secret_namespace
    try:
        secret = client.CoreV1Api(api()).read_namespaced_secret(
            ref.name, namespace, _request_timeout=REQUEST_TIMEOUT
        )
    except ApiException as e:
        raise RouterError(field, f"{what}: its Secret cannot be read (HTTP {e.status})") from None
    except Exception as e:
        raise RouterError(field, f"{what}: its Secret cannot be read ({type(e).__name__})") from None
    data = (secret.data or {}).get(ref.key)
    if data is None:
        raise RouterError(field, f"{what}: its Secret has no key {ref.key!r}")
    try:
        return base64.b64decode(data).decode()
    except ValueError:
        raise RouterError(field, f"{what}: its Secret's key {ref.key!r} is not UTF-8 text") from None


def _cached_provider(key: tuple[Any, ...], make: Callable[[], PrometheusProvider]) -> PrometheusProvider:
    """One provider (and HTTP session) per distinct configuration, reused across ticks and objects."""
    with _providers_lock:
        p = _providers.get(key)
        if p is None:
            if len(_providers) >= 256:
                for old in _providers.values():
                    old.close()
                _providers.clear()
            p = _providers[key] = make()
        return p


#: Longest one object's measurement may take (at least its interval, within these bounds).
ANALYSIS_BUDGET = (30.0, 120.0)


class Scoped:
    """A provider used within one tenant's budget ``key`` (provider and namespace, see provider_for)."""

    def __init__(self, inner: PrometheusProvider, key: str) -> None:
        self.inner, self.key = inner, key

    def query(self, promql: str) -> Result:
        return self.inner.query(promql, budget=self.key)


class Measurement(Budgeted):
    """One object's analysis: its provider within the tenant's budget and this analysis's time budget."""

    def __init__(self, inner: Scoped, seconds: float) -> None:
        super().__init__(inner, seconds)
        self.key = inner.key


def make_provider(
    analysis: AnalysisBase, namespace: str, inline: Sequence[str] = (), namespaced: Sequence[str] = ()
) -> Measurement:
    """:func:`provider_for`, with a time budget for this one analysis (see :class:`Budgeted`)."""
    lo, hi = ANALYSIS_BUDGET
    p = provider_for(analysis, namespace, inline, namespaced)
    return Measurement(p, min(hi, max(lo, parse_duration(analysis.interval))))


def provider_for(
    analysis: AnalysisBase, namespace: str, inline: Sequence[str] = (), namespaced: Sequence[str] = ()
) -> Scoped:
    """The provider an object may use, scoped to the object's namespace; RouterError naming the field
    when it may not use one.

    A tenant's object never chooses a credential and a destination together: an inline address
    carries no credential and must be allowed (``--allowed-provider-address`` or a
    ClusterMetricProvider's address); credentials come only from a ClusterMetricProvider, read from
    the operator's own namespace. Messages are fixed texts: nothing a server or Secret holds.
    ``inline``: the object's inline query fields; ``namespaced``: its templateRefs to a tenant's
    MetricTemplate. A provider with allowInlineQueries false refuses both, whether it is named as
    ``analysis.provider`` or its server (scheme, host, port) is named inline: an inline address on a
    provider's server is that provider, and the strictest such provider's policy applies.
    The budget (cool-down, concurrency, "slow" mark, measurement threads) is the provider's per
    namespace: another tenant's timeouts and slow queries never spend it.
    """
    if analysis.prometheus is not None:
        cfg = analysis.prometheus
        if cfg.bearerTokenSecret is not None:
            raise RouterError(
                "spec.analysis.prometheus.bearerTokenSecret",
                "a credential cannot be named together with an address in a ModelRollout or "
                "ModelExperiment; ask the platform team for a ClusterMetricProvider, set analysis.provider",
            )
        providers = _cluster_providers()
        if not policy.address_allowed(cfg.address, [p.prometheus.address for _, p in providers]):
            raise RouterError(
                "spec.analysis.prometheus.address",
                "this address is not allowed by the operator (--allowed-provider-address); "
                "use analysis.provider with a ClusterMetricProvider",
            )
        server = _server(cfg.address)
        same = sorted(
            (p.allowInlineQueries, name) for name, p in providers if _server(p.prometheus.address) == server
        )
        if same and not same[0][0] and (inline or namespaced):
            raise RouterError(
                "spec.analysis.prometheus.address",
                f"is the server of ClusterMetricProvider {same[0][1]}, which allows only queries from a "
                f"ClusterMetricTemplate; {(list(inline) + list(namespaced))[0]} is not one: set "
                f"analysis.provider: {same[0][1]} and templateRef to a ClusterMetricTemplate",
            )
        timeout = max(0.1, min(parse_duration(cfg.timeout), parse_duration(MAX_TIMEOUT)))
        key = ("inline", cfg.address, timeout, not cfg.insecureSkipVerify)
        p = _cached_provider(
            key,
            lambda: PrometheusProvider(cfg.address, timeout_s=timeout, verify_tls=not cfg.insecureSkipVerify),
        )
        owner = f"provider/{same[0][1]}" if same else "address/{}://{}:{}".format(*server)
        return Scoped(p, f"{owner}@{namespace}")
    name = analysis.provider
    if name is None:
        raise RouterError("spec.analysis", "set provider (a ClusterMetricProvider) or prometheus")
    field = "spec.analysis.provider"
    try:
        raw = client.CustomObjectsApi(api()).get_cluster_custom_object(
            GROUP, VERSION, PROVIDER_PLURAL, name, _request_timeout=REQUEST_TIMEOUT
        )
    except ApiException as e:
        if e.status == 404:
            raise RouterError(field, f"ClusterMetricProvider {name} not found") from None
        raise RouterError(field, f"ClusterMetricProvider {name} cannot be read (HTTP {e.status})") from None
    try:
        spec = ClusterMetricProviderSpec.model_validate(cast(dict[str, Any], raw).get("spec") or {})
    except ValidationError:
        raise RouterError(field, f"ClusterMetricProvider {name} has an invalid spec") from None
    prom = spec.prometheus
    what = f"ClusterMetricProvider {name}"
    if inline and not spec.allowInlineQueries:
        raise RouterError(
            inline[0],
            f"{what} allows only queries from a ClusterMetricTemplate (templateRef); this query is inline",
        )
    if namespaced and not spec.allowInlineQueries:
        raise RouterError(
            namespaced[0],
            f"{what} allows only queries from a ClusterMetricTemplate (the platform's); this templateRef "
            "names a MetricTemplate (the namespace's own)",
        )
    token = _secret_value(prom.bearerTokenSecret, field, what) if prom.bearerTokenSecret else None
    verify: bool | str = not prom.insecureSkipVerify
    if prom.caSecret is not None and verify:
        verify = _ca_file(_secret_value(prom.caSecret, field, what))
    timeout = parse_duration(prom.timeout)
    digest = hashlib.sha256((token or "").encode()).hexdigest()
    p = _cached_provider(
        ("provider", name, prom.address, timeout, verify, digest),
        lambda: PrometheusProvider(prom.address, timeout_s=timeout, token=token, verify_tls=verify),
    )
    if p.unusable:
        raise RouterError(field, f"{what}: {p.unusable}; it is never sent")
    return Scoped(p, f"provider/{name}@{namespace}")


def _ca_file(pem: str) -> str:
    """A CA bundle on disk (requests wants a path), one file per distinct content."""
    d = Path(tempfile.gettempdir()) / "model-rollouts-ca"
    d.mkdir(mode=0o700, exist_ok=True)
    path = d / (hashlib.sha256(pem.encode()).hexdigest()[:32] + ".pem")
    if not path.exists():
        path.write_text(pem)
    return str(path)


def check_queries(queries: list[tuple[str, str | None]]) -> None:
    """RouterError naming the field of the first query template with a placeholder outside the fixed set."""
    for field, query in queries:
        if query:
            try:
                check_template(query)
            except TemplateError as e:
                raise RouterError(field, str(e)) from e


METRIC_FIELDS = {"proportion": ("successes", "trials"), "mean": ("count", "sum", "sumSquares")}

#: Seconds a fetched metric template is reused (an edit takes effect within this).
TEMPLATE_CACHE_SECONDS = 5.0
#: Metric templates kept parsed at once; beyond this the least recently used are dropped.
TEMPLATE_CACHE_MAX = 256
#: One entry per template (kind, namespace, name), tagged with the resourceVersion it was parsed from:
#: a new generation replaces the old one (and is parsed only if its resourceVersion changed), a
#: deleted template (404) leaves at once, and every entry leaves TEMPLATE_CACHE_SECONDS after its
#: fetch unless fetched again. So the cache holds at most TEMPLATE_CACHE_MAX specs, however many
#: templates and generations come and go.
_templates: OrderedDict[tuple[str, str, str], tuple[float, str, MetricTemplateSpec]] = OrderedDict()
_templates_lock = threading.Lock()

M = TypeVar("M", bound=Model)


def _template(ref: TemplateRef, namespace: str, field: str) -> MetricTemplateSpec:
    key = (ref.kind, namespace if ref.kind == TEMPLATE_KIND else "", ref.name)
    t = time.monotonic()
    with _templates_lock:
        for k in [k for k, (at, _, _) in _templates.items() if t - at >= TEMPLATE_CACHE_SECONDS]:
            del _templates[k]
        hit = _templates.get(key)
        if hit is not None:
            _templates.move_to_end(key)
            return hit[2]
    co = client.CustomObjectsApi(api())
    try:
        if ref.kind == TEMPLATE_KIND:
            raw = co.get_namespaced_custom_object(
                GROUP, VERSION, namespace, TEMPLATE_PLURAL, ref.name, _request_timeout=REQUEST_TIMEOUT
            )
        else:
            raw = co.get_cluster_custom_object(
                GROUP, VERSION, CLUSTER_TEMPLATE_PLURAL, ref.name, _request_timeout=REQUEST_TIMEOUT
            )
    except ApiException as e:
        if e.status == 404:
            raise RouterError(field, f"{ref.kind} {ref.name} not found") from None
        raise RouterError(field, f"{ref.kind} {ref.name} cannot be read (HTTP {e.status})") from None
    obj = cast(dict[str, Any], raw)
    rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
    try:
        spec = MetricTemplateSpec.model_validate(obj.get("spec") or {})
    except ValidationError:
        raise RouterError(field, f"{ref.kind} {ref.name} has an invalid spec") from None
    if ref.kind != TEMPLATE_KIND:
        check_platform_template(spec, f"{field} ({ref.kind} {ref.name})")
    with _templates_lock:
        _templates[key] = (time.monotonic(), rv, spec)
        _templates.move_to_end(key)
        while len(_templates) > TEMPLATE_CACHE_MAX:
            _templates.popitem(last=False)
    return spec


def resolve_metric(metric: M, field: str, namespace: str, names: tuple[str, ...]) -> M:
    """A guardrail or count metric with its templateRef replaced by the template's queries (filled args).

    RouterError naming ``field.templateRef`` when the template is missing, lacks a query, or an arg
    is unknown, missing or not of its type. A metric without templateRef is returned as it is.
    """
    ref: TemplateRef | None = getattr(metric, "templateRef", None)
    if ref is None:
        return metric
    where = f"{field}.templateRef"
    template = _template(ref, namespace, where)
    try:
        queries = fill(template, ref, names)
    except TemplateError as e:
        raise RouterError(where, str(e)) from None
    return metric.model_copy(update={**queries, "templateRef": None})


def read_counts(
    metric: Any, provider: MetricProvider, values: dict[str, str]
) -> tuple[stats.ProportionData | stats.MeanData | None, Result | None]:
    """Cumulative counts of a proportion (successes, trials) or mean (count, sum, sumSquares) metric.

    ``metric`` is a rollout comparison or an experiment's primary metric (same query fields).
    Returns the data, or the measurement problem (error or NaN) that prevented reading it.
    """
    nums: list[float] = []
    for f in METRIC_FIELDS[metric.type]:
        r = provider.query(render(getattr(metric, f) or "", values))
        # No data is not zero: a query that matches no series (a typo, a counter that does not
        # exist yet) is a measurement problem that holds, never "zero events".
        if not r.ok or r.value is None:
            return None, Result(r.outcome, message=f"{f}: {r.message or r.outcome}")
        nums.append(max(0.0, r.value))
    if metric.type == "proportion":
        successes, trials = nums
        return stats.ProportionData(min(successes, trials), trials), None
    count, total, squares = nums
    if count <= 0:
        return stats.MeanData(0.0, 0.0, 0.0), None
    # increase() extrapolates each counter on its own: keep the sums consistent with one sample.
    return stats.MeanData(count, total, max(squares, total * total / count)), None


def validation_message(err: ValidationError) -> str:
    """The first pydantic error as 'spec.a.b: message'."""
    parts = []
    for e in err.errors()[:3]:
        loc = ".".join(str(p) for p in e["loc"])
        parts.append(f"spec.{loc}: {e['msg']}")
    return "; ".join(parts)


class Measuring(Exception):
    """The due analysis is being measured in its tenant's pool; a later wake-up picks up the result."""


T = TypeVar("T")

#: Phases in which an object no longer claims its route (the one-owner check skips it).
FINISHED_PHASES = ("Promoted", "RolledBack", "Aborted", "Concluded", "Idle", "Invalid")


@dataclass(frozen=True)
class RouteClaim:
    """One object's claim on one HTTPRoute rule, as the operator's watch last saw it (a Kopf index value)."""

    created: str
    kind: str
    name: str
    uid: str
    phase: str | None
    deleting: bool


#: (namespace, HTTPRoute, rule index) -> the claims on it, read from the operator's indices.
RouteOwners = Callable[[tuple[str, str, int]], list[RouteClaim]]


def route_claim(kind: str, body: Mapping[str, Any]) -> dict[tuple[str, str, int], RouteClaim] | None:
    """The index entry of one ModelRollout or ModelExperiment: its route rule and who it is."""
    spec = body.get("spec") or {}
    gw = ((spec.get("trafficRouting") or {}) if isinstance(spec, Mapping) else {}).get("gatewayAPI") or {}
    route = gw.get("httpRoute") if isinstance(gw, Mapping) else None
    if not isinstance(route, str) or not route:
        return None
    try:
        rule = int(gw.get("ruleIndex") or 0)
    except (TypeError, ValueError):
        return None
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    claim = RouteClaim(
        created=str(meta.get("creationTimestamp") or ""),
        kind=kind,
        name=str(meta.get("name") or ""),
        uid=str(meta.get("uid") or ""),
        phase=status.get("phase") if isinstance(status, Mapping) else None,
        deleting=bool(meta.get("deletionTimestamp")),
    )
    return {(str(meta.get("namespace") or ""), route, rule): claim}


def route_owners(*indices: Mapping[tuple[str, str, int], Iterable[RouteClaim]]) -> RouteOwners:
    """A reader of Kopf's route indices for a handler thread (they are updated on the event loop)."""

    def owners(key: tuple[str, str, int]) -> list[RouteClaim]:
        for attempt in range(5):
            try:
                return [c for index in indices for c in (index.get(key) or ())]
            except RuntimeError:  # changed while read: read again
                if attempt == 4:
                    raise
                time.sleep(0.01)
        return []

    return owners


SpecT = TypeVar("SpecT", bound=ResourceSpec)
StatusT = TypeVar("StatusT", bound=ResourceStatus)

#: Seconds between re-checks of an object whose spec is invalid (an edit re-checks at once).
INVALID_RECHECK = 15.0
#: Longest backoff between attempts to apply a decision that failed.
MAX_BACKOFF = 300.0


def backoff(errors: int) -> float:
    return min(MAX_BACKOFF, 2.0 ** max(0, errors - 1))


def safe_error(e: BaseException) -> str:
    """A fixed, sanitised description of an exception: never a response body or a header."""
    if isinstance(e, ApiException):
        return f"Kubernetes API answered HTTP {e.status} {str(e.reason or '')[:60]}".strip()
    if isinstance(e, RouterError):
        return str(e)[:300]
    return type(e).__name__


class Controller(Generic[SpecT, StatusT]):
    """Per-object loop shared by the resource handlers; subclasses supply the kind-specific hooks.

    Kopf calls :func:`wake` every half second for objects that are not finished. Pacing lives in
    the object's status: a tick is due when the engine's ``next_due`` (one interval after
    ``status.lastAnalysisTime``) has passed, after a failed write's backoff, or when the generation
    or an action annotation changed. Nothing in memory decides when to measure or advance: a
    restart, retry, conflict or second replica never adds an analysis. The only memory here is a
    hint that saves API reads between due times.

    Write order: the route first, read back and verified; then status; then Events. A failed or
    unverified route write keeps the old status, adds ``ReconcileError`` and backs off.
    """

    kind = ""
    plural = ""
    phases: tuple[str, ...] = ()
    terminal: tuple[str, ...] = ()
    annotations: tuple[str, ...] = ()
    spec_model: type[SpecT]
    status_model: type[StatusT]

    def __init__(self, namespace: str, name: str) -> None:
        self.namespace, self.name = namespace, name
        self.logger = logging.getLogger(f"model_rollouts.{self.kind.lower()}")
        self._last_key: tuple[Any, ...] | None = None
        self._not_before = 0.0
        self._invalid_checked = 0.0
        #: The analysis being measured: (what it was asked for, its result to come).
        self._measuring: tuple[Any, Future[Any], dt.datetime] | None = None
        self._asked: Any = None
        self._tick_now = now()

    # -- hooks --------------------------------------------------------------------------------------
    def problem(self, spec: SpecT) -> str | None:
        """A semantic problem the schema cannot express, naming the field; None if there is none."""
        return None

    def queries(self, spec: SpecT) -> list[tuple[str, str | None]]:
        """(field, PromQL template) pairs to check for unknown placeholders."""
        raise NotImplementedError

    def services(self, spec: SpecT, status: StatusT) -> list[str]:
        """The Services the router must be able to weight."""
        raise NotImplementedError

    def route(self, spec: SpecT) -> tuple[str, int] | None:
        """(HTTPRoute name, rule index) this object manages, for the one-owner check."""
        gw = spec.trafficRouting.gatewayAPI
        return (gw.httpRoute, gw.ruleIndex) if gw is not None else None

    def decide(
        self,
        spec: SpecT,
        status: StatusT,
        provider: MetricProvider,
        now: dt.datetime,
        generation: int,
        annotations: dict[str, str],
    ) -> tuple[StatusT, list[object]]:
        """Measure if the engine says an analysis is due, then ask the engine."""
        raise NotImplementedError

    def weights(self, spec: SpecT, status: StatusT) -> tuple[dict[str, int], dict[str, int]] | None:
        """(weights per Service, the same per variant label) that the route must carry, or None."""
        raise NotImplementedError

    def next_due(self, spec: SpecT, status: StatusT) -> dt.datetime | None:
        """When the engine next wants a tick (from status); None: not until the object changes."""
        raise NotImplementedError

    def guard_weights(self, spec: SpecT, status: StatusT) -> dict[str, int] | None:
        """After RolledBack/Aborted: weights a slow guard re-asserts if the route drifts."""
        return None

    def deletion_weights(self, spec: SpecT, status: StatusT) -> dict[str, int] | None:
        """What the route gets when the object is deleted; None leaves it alone."""
        return None

    @staticmethod
    def active(spec: Mapping[str, Any], status: Mapping[str, Any], annotations: Mapping[str, str]) -> bool:
        """The object needs the fast timer (finished objects do not)."""
        raise NotImplementedError

    # -- pacing -------------------------------------------------------------------------------------
    def _status(self, obj: Mapping[str, Any]) -> StatusT:
        return self.status_model.model_validate(
            {k: v for k, v in (obj.get("status") or {}).items() if k != "kopf"}
        )

    def due_at(self, obj: Mapping[str, Any]) -> dt.datetime | None:
        """When this object next needs a tick, read from its status alone."""
        status = self._status(obj)
        if status.phase == "Invalid":
            return None  # re-checked on edits and every INVALID_RECHECK seconds
        try:
            spec = self.spec_model.model_validate(obj["spec"])
        except ValidationError:
            return None
        due = self.next_due(spec, status)
        if status.reconcileErrors and status.lastReconcileErrorTime is not None:
            retry = status.lastReconcileErrorTime + dt.timedelta(seconds=backoff(status.reconcileErrors))
            due = retry if due is None else max(due, retry)
        return due

    def _key(self, obj: Mapping[str, Any]) -> tuple[Any, ...]:
        meta = obj["metadata"]
        return (
            meta.get("generation"),
            tuple((meta.get("annotations") or {}).get(a) for a in self.annotations),
        )

    def _wait(self, obj: Mapping[str, Any]) -> float:
        """Seconds until this object is due for a tick (<= 0: now), from its status alone."""
        if (obj.get("status") or {}).get("phase") == "Invalid":
            return INVALID_RECHECK - (time.monotonic() - self._invalid_checked)
        due = self.due_at(obj)
        return INVALID_RECHECK if due is None else (due - now()).total_seconds()

    def wake(self, seen: Mapping[str, Any], owners: RouteOwners | None = None) -> None:
        if not leader.ELECTOR.is_leader() or seen["metadata"].get("deletionTimestamp"):
            return
        key = self._key(seen)
        changed = key != self._last_key
        if not changed and time.monotonic() < self._not_before:
            return
        if not changed and self._measuring is not None and not self._measuring[1].done():
            return  # a query is running in the tenant's pool: nothing to read or decide yet
        try:
            if not changed:
                # Nothing due by the watch's copy: no API read at all (an Invalid object or one
                # between analyses costs nothing at the API server until it is due).
                wait = self._wait(seen)
                if wait > 0:
                    self._not_before = time.monotonic() + min(wait, 5.0)
                    return
            obj = get_object(self.plural, self.namespace, self.name)
            if obj is None or obj["metadata"].get("deletionTimestamp"):
                return
            self._last_key = self._key(obj)
            if not changed:
                wait = self._wait(obj)  # the fresh read decides
                if wait > 0:
                    self._not_before = time.monotonic() + min(wait, 5.0)
                    return
            self._invalid_checked = time.monotonic()
            self.tick(obj, owners)
            self._not_before = time.monotonic() + 0.4
        except Exception as e:
            # Never the exception's text (an API or HTTP error may quote a body or a header): its
            # class and where it was raised.
            self.logger.error(
                "%s/%s: tick failed: %s\n%s",
                self.namespace,
                self.name,
                safe_error(e),
                "".join(traceback.format_tb(e.__traceback__)).rstrip(),
            )
            self._not_before = time.monotonic() + 5.0
            with contextlib.suppress(Exception):
                obj = get_object(self.plural, self.namespace, self.name)
                if obj is not None:
                    self.reconcile_error(obj, self._status(obj), "ReconcileFailed", safe_error(e))

    # -- the tick -----------------------------------------------------------------------------------
    def tick(self, obj: dict[str, Any], owners: RouteOwners | None = None) -> None:
        """Validate, measure, decide, apply. An unusable spec gives Valid=False and no traffic change.

        ``owners``: who claims which route, from the operator's watch (see :func:`route_owners`)."""
        t0 = time.monotonic()
        meta = obj["metadata"]
        generation = int(meta.get("generation") or 0)
        annotations = dict(meta.get("annotations") or {})
        status = self._status(obj)
        if status.phase in self.terminal and not self.active(
            obj.get("spec") or {}, obj.get("status") or {}, annotations
        ):
            return  # finished: nothing is re-validated, nothing can move traffic
        now_ = now()
        try:
            spec = self.spec_model.model_validate(obj["spec"])
        except ValidationError as e:
            return self.write(obj, status, *invalid_status(status, validation_message(e), now_, generation))
        problem = self.problem(spec)
        if problem:
            return self.write(obj, status, *invalid_status(status, problem, now_, generation))
        try:
            check_queries(self.queries(spec))
            self.check_providers(spec)
            if status.phase in ("Pending", "Invalid") or status.observedGeneration != generation:
                self.check_owner(obj, spec, owners)
            router = make_router(spec.trafficRouting, self.namespace, (self.kind, self.name))
            router.check(self.services(spec, status))
            provider = make_provider(
                spec.analysis,
                self.namespace,
                inline_query_fields(spec, "spec"),
                namespaced_template_fields(spec, "spec"),
            )
        except RouterError as e:
            return self.write(obj, status, *invalid_status(status, str(e), now_, generation))
        self._asked = (generation, json.dumps(dump(status), sort_keys=True))
        if self._measuring is not None and self._measuring[0] == self._asked:
            now_ = self._measuring[2]  # decided as of when it was measured: pacing as if measured inline
        self._tick_now = now_
        try:
            new, actions = self.decide(spec, status, provider, now_, generation, annotations)
        except Measuring:
            return  # the handler thread never waits on a provider; the next wake-up reads the result
        finished_before = status.phase in self.terminal
        route = None if finished_before and new.phase in self.terminal else self.weights(spec, new)
        if route is not None:
            desired, labels = route
            try:
                carried = router.set_weights(desired)
            except Exception as e:
                return self.reconcile_error(obj, status, "RouteWriteFailed", safe_error(e))
            wrong = {k: carried.get(k) for k, v in desired.items() if carried.get(k, 0) != v}
            if wrong:
                return self.reconcile_error(
                    obj, status, "RouteNotVerified", f"route carries {wrong} after the write, not {desired}"
                )
            for label, w in labels.items():
                telemetry.WEIGHT.labels(self.kind, self.namespace, self.name, label).set(w)
        if new.reconcileErrors:
            new.reconcileErrors, new.lastReconcileErrorTime = 0, None
            new.conditions = set_condition(
                new.conditions,
                "ReconcileError",
                "False",
                "Applied",
                "the last decision was applied",
                now_,
                generation,
            )
        self.write(obj, status, new, actions)
        telemetry.ANALYSIS_SECONDS.labels(self.kind).observe(time.monotonic() - t0)

    def check_owner(self, obj: Mapping[str, Any], spec: SpecT, owners: RouteOwners | None) -> None:
        """One route, one owner: another active object managing the same route rule wins if older.

        Read from the operator's watch (the Kopf indices ``rollout_routes`` and ``experiment_routes``),
        never from a LIST: checking costs nothing at the API server however many objects there are.
        """
        mine = self.route(spec)
        if mine is None or owners is None:
            return
        me = obj["metadata"]
        my_key = (str(me.get("creationTimestamp") or ""), self.kind, self.name)
        for other in owners((self.namespace, *mine)):
            if other.uid == me.get("uid") or other.deleting or other.phase in FINISHED_PHASES:
                continue
            if (other.created, other.kind, other.name) < my_key:
                raise RouterError(
                    "spec.trafficRouting.gatewayAPI.httpRoute",
                    f"HTTPRoute {mine[0]} rule {mine[1]} is already managed by {other.kind} "
                    f"{self.namespace}/{other.name}; one route has one owner",
                )

    def check_providers(self, spec: SpecT) -> None:
        """RouterError naming the field of the first notification provider or gate that does not admit
        this namespace (its allowedNamespaces / namespaceSelector): the object is Valid=False."""
        named = [
            *(
                (f"spec.notifications[{i}].provider", r.provider)
                for i, r in enumerate(getattr(spec, "notifications", None) or [])
            ),
            *(
                (f"spec.gates[{i}].provider", g.provider)
                for i, g in enumerate(getattr(spec, "gates", None) or [])
            ),
        ]
        for field, provider in named:
            why = notify_sender.check(provider, self.namespace)
            if why is not None:
                raise RouterError(field, why)

    def measured(self, provider: MetricProvider, measure: Callable[[], T]) -> T:
        """The result of ``measure`` for the status this tick was asked about, run in the pool of the
        provider's budget key (the tenant's: provider and namespace, see metrics/pools.py); raises
        Measuring until it is ready. A measurement asked for an older status or generation is dropped."""
        pending = self._measuring
        if pending is not None and pending[0] == self._asked:
            if not pending[1].done():
                raise Measuring()
            self._measuring = None
            return cast(T, pending[1].result())  # the measurement's own exception, if any, is raised here
        key = str(getattr(provider, "key", None) or f"namespace@{self.namespace}")
        self._measuring = (self._asked, pools.submit(key, measure), self._tick_now)
        raise Measuring()

    def count_errors(self, results: Iterable[Result]) -> None:
        errors = sum(1 for r in results if r.outcome == "error")
        if errors:
            telemetry.MEASUREMENT_ERRORS.labels(self.kind, self.namespace, self.name).inc(errors)

    def reconcile_error(self, obj: dict[str, Any], status: ResourceStatus, reason: str, message: str) -> None:
        """Hold: keep the old status (so nothing advances), record the failure and back off."""
        s = status.model_copy(deep=True)
        s.reconcileErrors += 1
        s.lastReconcileErrorTime = now()
        wait = backoff(s.reconcileErrors)
        msg = f"attempt {s.reconcileErrors}: {message}; holding, next attempt in {wait:.0f}s or later"
        s.conditions = set_condition(
            s.conditions,
            "ReconcileError",
            "True",
            reason,
            msg,
            s.lastReconcileErrorTime,
            s.observedGeneration,
        )
        telemetry.RECONCILE_ERRORS.labels(self.kind, self.namespace, self.name, reason).inc()
        telemetry.record(self.kind, self.namespace, self.name, dump(s), obj.get("spec") or {})
        self.logger.warning("%s/%s %s: %s", self.namespace, self.name, reason, msg)
        self._not_before = time.monotonic() + wait
        if write_status(self.plural, obj, dump(s)):
            post_event(obj, "Warning", reason, msg)
            errs = notify_events.reconcile_error(self.kind, self.namespace, self.name, s, reason, msg)
            self.notify(obj, errs)

    def write(
        self, obj: dict[str, Any], old: ResourceStatus, status: ResourceStatus, actions: Iterable[object]
    ) -> None:
        """Status (the record; skipped when nothing changed), then Events and metrics."""
        bound_texts(status)
        if dump(status) != dump(old) and not write_status(self.plural, obj, dump(status)):
            self._not_before = 0.0  # conflict: read again and decide afresh at the next wake-up
            return
        for e in actions:
            if not isinstance(e, Event):
                continue
            post_event(obj, e.type, e.reason, e.message)
            telemetry.DECISIONS.labels(self.kind, self.namespace, self.name, e.reason).inc()
            if e.reason in LIMIT_REASONS:
                telemetry.LIMITS.labels(self.kind, self.namespace, self.name, e.reason).inc()
            log = self.logger.warning if e.type == "Warning" else self.logger.info
            log(
                "%s/%s %s: %s",
                self.namespace,
                self.name,
                e.reason,
                e.message,
                extra={
                    "namespace": self.namespace,
                    "object": self.name,
                    "kind": self.kind,
                    "phase": status.phase,
                    "revision": getattr(status, "revision", None),
                    "weight": getattr(status, "weight", None),
                    "decision": e.reason,
                },
            )
        telemetry.set_phase(self.kind, self.namespace, self.name, status.phase, self.phases)
        telemetry.record(self.kind, self.namespace, self.name, dump(status), obj.get("spec") or {})
        self.notify(obj, notify_events.notices(self.kind, self.namespace, self.name, old, status, actions))

    def notify(self, obj: Mapping[str, Any], notices: list[Notice]) -> None:
        """Queue the notifications of a written transition (spec.notifications); never blocks or raises."""
        if not notices:
            return
        refs = notify_events.subscriptions(obj.get("spec"))
        if refs:
            try:
                notify_sender.sender().publish(str(obj["metadata"].get("uid") or self.name), refs, notices)
            except Exception as e:
                self.logger.warning("%s/%s notifications: %s", self.namespace, self.name, safe_error(e))

    # -- after the end ------------------------------------------------------------------------------
    def guard(self, obj: Mapping[str, Any]) -> None:
        """Slow timer for RolledBack/Aborted objects: a rolled-back candidate gets no traffic again."""
        if not leader.ELECTOR.is_leader():
            return
        try:
            spec = self.spec_model.model_validate(obj["spec"])
            status = self._status(obj)
            if not obj["metadata"].get("deletionTimestamp"):  # a new leader exports it too: the alert stays
                telemetry.set_phase(self.kind, self.namespace, self.name, status.phase, self.phases)
                telemetry.record(self.kind, self.namespace, self.name, dump(status), dict(obj["spec"]))
            want = self.guard_weights(spec, status)
            if not want:
                return
            router = make_router(spec.trafficRouting, self.namespace, (self.kind, self.name))
            current = router.get_weights()
            drift = {k: current[k] for k, v in want.items() if v == 0 and current.get(k, 0) > 0}
            if not drift:
                return
            router.set_weights({k: v for k, v in want.items() if k in current})
            msg = f"route gave traffic to {drift} after {status.phase}; set back to {want}"
            post_event(dict(obj), "Warning", "RouteRestored", msg)
            self.logger.warning("%s/%s RouteRestored: %s", self.namespace, self.name, msg)
        except Exception as e:  # never Kopf's logging of the exception's text
            self.logger.info("%s/%s guard: %s", self.namespace, self.name, safe_error(e))

    def delete(self, spec_body: Mapping[str, Any], status_body: Mapping[str, Any], retry: int) -> None:
        """Finalizer: move traffic only if the engine says so; a persistent failure ends bounded."""
        if not leader.ELECTOR.is_leader():
            raise kopf.TemporaryError("not the leader; the leader handles the deletion", delay=5)
        telemetry.forget(self.kind, self.namespace, self.name)
        try:
            spec = self.spec_model.model_validate(dict(spec_body))
            status = self.status_model.model_validate(
                {k: v for k, v in dict(status_body).items() if k != "kopf"}
            )
        except ValidationError:
            self.logger.warning(
                "%s/%s deleted with an invalid spec: route left alone", self.namespace, self.name
            )
            return
        want = self.deletion_weights(spec, status)
        if not want:
            self.logger.info(
                "%s/%s deleted after %s: route left alone", self.namespace, self.name, status.phase
            )
            return
        try:
            router = make_router(spec.trafficRouting, self.namespace, (self.kind, self.name))
            current = router.get_weights()
            router.set_weights({k: v for k, v in want.items() if k in current})
            self.logger.info(
                "%s/%s deleted while %s: route set to %s", self.namespace, self.name, status.phase, want
            )
        except NotOptedIn:  # permanent: the route's owner has withdrawn it; no retries
            msg = "the route does not opt in to this object (any more): route left alone; deleting"
            self.logger.warning("%s/%s %s", self.namespace, self.name, msg)
            post_event({"apiVersion": f"{GROUP}/{VERSION}", "kind": self.kind,
                        "metadata": {"name": self.name, "namespace": self.namespace}},
                       "Warning", "RouteLeftAlone", msg)  # fmt: skip
        except Exception as e:  # never Kopf's logging of the exception's text
            if retry < DELETE_RETRIES:
                raise kopf.TemporaryError(
                    f"restoring the route failed: {safe_error(e)}", delay=2 + 2 * retry
                ) from e
            msg = f"gave up restoring the route after {retry + 1} attempts ({safe_error(e)}); deleting anyway"
            self.logger.warning("%s/%s %s", self.namespace, self.name, msg)
            post_event({"apiVersion": f"{GROUP}/{VERSION}", "kind": self.kind,
                        "metadata": {"name": self.name, "namespace": self.namespace}},
                       "Warning", "RouteRestoreFailed", msg)  # fmt: skip


#: Attempts to restore a route on deletion before the finalizer is released anyway.
DELETE_RETRIES = 4
