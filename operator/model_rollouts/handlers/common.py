"""I/O shared by the handlers: API clients, status writes, Events, providers and routers from a spec."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from model_rollouts.api.common import (
    GROUP,
    MAX_MESSAGE,
    MAX_TIMEOUT,
    VERSION,
    AnalysisBase,
    Model,
    SecretKeyRef,
    TemplateRef,
    parse_duration,
    truncate,
)
from model_rollouts.api.provider import (
    PROVIDER_PLURAL,
    ClusterMetricProviderSpec,
)
from model_rollouts.api.template import (
    CLUSTER_TEMPLATE_PLURAL,
    TEMPLATE_KIND,
    TEMPLATE_PLURAL,
    MetricTemplateSpec,
)
from model_rollouts.engine import stats
from model_rollouts.metrics import policy
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
from model_rollouts.traffic.router import RouterError

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


# -- moved: the route registry (traffic/registry.py) and the Controller (handlers/controller.py) --
#: Importable from here for callers of the old names.
from model_rollouts.traffic.registry import FINISHED_PHASES as FINISHED_PHASES  # noqa: E402
from model_rollouts.traffic.registry import RouteClaim as RouteClaim  # noqa: E402
from model_rollouts.traffic.registry import RouteOwners as RouteOwners  # noqa: E402
from model_rollouts.traffic.registry import route_claim as route_claim  # noqa: E402
from model_rollouts.traffic.registry import route_owners as route_owners  # noqa: E402

_MOVED = (
    "Controller",
    "Measuring",
    "backoff",
    "safe_error",
    "DELETE_RETRIES",
    "INVALID_RECHECK",
    "MAX_BACKOFF",
)


def __getattr__(name: str) -> Any:
    """The Controller and its helpers, from handlers/controller.py (which imports this module)."""
    if name in _MOVED:
        from model_rollouts.handlers import controller

        return getattr(controller, name)
    raise AttributeError(name)
