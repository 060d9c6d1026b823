"""Provider, Secret and metric-template resolution for one object's analysis (Kubernetes reads).

What an object may measure with is decided here: an inline Prometheus address (allowlisted, never
with a credential) or a ClusterMetricProvider (its credentials read from the operator's own
namespace), each scoped to the object's namespace; and its templateRefs resolved to queries. Every
refusal is a :class:`ProviderError` naming the spec field, so the object is ``Valid=False``.

Providers, templates and Secrets are read from the operator's watches (metrics/watched.py) when
they hold them, so a tick sends no request for them; a miss GETs as without the watch.
"""

from __future__ import annotations

import base64
import hashlib
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from model_rollouts import policy
from model_rollouts.api.common import (
    GROUP,
    MAX_TIMEOUT,
    VERSION,
    AnalysisBase,
    Model,
    SecretKeyRef,
    TemplateRef,
    parse_duration,
)
from model_rollouts.api.provider import PROVIDER_PLURAL, ClusterMetricProviderSpec
from model_rollouts.api.template import (
    CLUSTER_TEMPLATE_PLURAL,
    TEMPLATE_KIND,
    TEMPLATE_PLURAL,
    MetricTemplateSpec,
)
from model_rollouts.kube.client import REQUEST_TIMEOUT, api
from model_rollouts.metrics import watched
from model_rollouts.metrics.errors import ProviderError
from model_rollouts.metrics.prometheus import PrometheusProvider
from model_rollouts.metrics.provider import Budgeted, Result, TemplateError, Vector, check_template
from model_rollouts.metrics.templates import check_platform_template, fill

#: Seconds a list of ClusterMetricProviders (for the inline-address allowlist) is reused.
PROVIDER_CACHE_SECONDS = 10.0
_provider_list: tuple[float, list[tuple[str, ClusterMetricProviderSpec]]] = (0.0, [])
_providers: dict[tuple[Any, ...], PrometheusProvider] = {}
_providers_lock = threading.Lock()


def _cluster_providers() -> list[tuple[str, ClusterMetricProviderSpec]]:
    """(name, spec) of every valid ClusterMetricProvider; [] if they cannot be listed.

    From the operator's watch (metrics/watched.py) once one listing has been merged into it (the
    first call lists, then the watch keeps it: no request; listed again after CONFIRM_SECONDS);
    without the watch, listed and reused for PROVIDER_CACHE_SECONDS."""
    cache = watched.PROVIDERS
    if cache.enabled and cache.listed:
        return _watched_providers()
    global _provider_list
    at, found = _provider_list
    if time.monotonic() - at < PROVIDER_CACHE_SECONDS:
        return found
    found = []
    try:
        listing = client.CustomObjectsApi(api()).list_cluster_custom_object(
            GROUP, VERSION, PROVIDER_PLURAL, _request_timeout=REQUEST_TIMEOUT
        )
        items = cast(dict[str, Any], listing)["items"]
        if cache.enabled:
            cache.relisted(
                items, (cast(dict[str, Any], listing).get("metadata") or {}).get("resourceVersion")
            )
            return _watched_providers()
        for i in items:
            spec = _valid_provider(i)
            if spec is not None:
                found.append((str(i["metadata"]["name"]), spec))
    except Exception:
        found = []
    _provider_list = (time.monotonic(), found)
    return found


def _watched_providers() -> list[tuple[str, ClusterMetricProviderSpec]]:
    return sorted((name, e.value) for name, e in watched.PROVIDERS.items() if e.value is not None)


def _valid_provider(body: dict[str, Any]) -> ClusterMetricProviderSpec | None:
    try:
        return ClusterMetricProviderSpec.model_validate(body.get("spec") or {})
    except ValidationError:
        return None


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
    """A key of a Secret in the operator's own namespace; ProviderError (fixed text) if it cannot be had.

    From the operator's watch of its namespace's Secrets when it holds this one (no request); else
    one GET, kept for the next look-ups (the watch keeps it current from then on)."""
    namespace = policy.POLICY.secret_namespace
    hit = watched.SECRETS.want(ref.name)
    if hit is not None:
        data: dict[str, str] = hit.value
    else:
        try:
            secret: Any = client.CoreV1Api(api()).read_namespaced_secret(
                ref.name, namespace, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as e:
            raise ProviderError(field, f"{what}: its Secret cannot be read (HTTP {e.status})") from None
        except Exception as e:
            raise ProviderError(field, f"{what}: its Secret cannot be read ({type(e).__name__})") from None
        data = dict(secret.data or {})
        watched.SECRETS.put(ref.name, secret.metadata.resource_version, data)
    value = data.get(ref.key)
    if value is None:
        raise ProviderError(field, f"{what}: its Secret has no key {ref.key!r}")
    try:
        return base64.b64decode(value).decode()
    except ValueError:
        raise ProviderError(field, f"{what}: its Secret's key {ref.key!r} is not UTF-8 text") from None


def _cached_provider(key: tuple[Any, ...], make: Callable[[], PrometheusProvider]) -> PrometheusProvider:
    """One provider (and HTTP session) per distinct configuration, reused across ticks and objects."""
    with _providers_lock:
        p = _providers.get(key)
        if p is None:
            # A provider's earlier configuration (its spec or Secret changed) is not used again.
            for old_key in [k for k in _providers if k[:2] == key[:2] and key[0] == "provider"]:
                del _providers[old_key]
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

    def query_many(self, promqls: Sequence[str]) -> list[Result]:
        return self.inner.query_many(promqls, budget=self.key)

    def query_vector(self, promql: str, labels: tuple[str, ...]) -> Vector:
        return self.inner.query_vector(promql, labels, budget=self.key)


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
    """The provider an object may use, scoped to the object's namespace; ProviderError naming the field
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
            raise ProviderError(
                "spec.analysis.prometheus.bearerTokenSecret",
                "a credential cannot be named together with an address in a ModelRollout or "
                "ModelExperiment; ask the platform team for a ClusterMetricProvider, set analysis.provider",
            )
        providers = _cluster_providers()
        if not policy.address_allowed(cfg.address, [p.prometheus.address for _, p in providers]):
            raise ProviderError(
                "spec.analysis.prometheus.address",
                "this address is not allowed by the operator (--allowed-provider-address); "
                "use analysis.provider with a ClusterMetricProvider",
            )
        server = _server(cfg.address)
        same = sorted(
            (p.allowInlineQueries, name) for name, p in providers if _server(p.prometheus.address) == server
        )
        if same and not same[0][0] and (inline or namespaced):
            raise ProviderError(
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
        raise ProviderError("spec.analysis", "set provider (a ClusterMetricProvider) or prometheus")
    field = "spec.analysis.provider"
    spec = _provider_spec(name, field)
    prom = spec.prometheus
    what = f"ClusterMetricProvider {name}"
    if inline and not spec.allowInlineQueries:
        raise ProviderError(
            inline[0],
            f"{what} allows only queries from a ClusterMetricTemplate (templateRef); this query is inline",
        )
    if namespaced and not spec.allowInlineQueries:
        raise ProviderError(
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
        raise ProviderError(field, f"{what}: {p.unusable}; it is never sent")
    return Scoped(p, f"provider/{name}@{namespace}")


def _provider_spec(name: str, field: str) -> ClusterMetricProviderSpec:
    """A ClusterMetricProvider's spec: from the operator's watch (no request), else one GET (kept)."""
    hit = watched.PROVIDERS.get(name)
    if hit is not None:
        spec = hit.value
    else:
        try:
            raw = client.CustomObjectsApi(api()).get_cluster_custom_object(
                GROUP, VERSION, PROVIDER_PLURAL, name, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as e:
            if e.status == 404:
                raise ProviderError(field, f"ClusterMetricProvider {name} not found") from None
            raise ProviderError(
                field, f"ClusterMetricProvider {name} cannot be read (HTTP {e.status})"
            ) from None
        body = cast(dict[str, Any], raw)
        spec = watched.PROVIDERS.store(body) if watched.PROVIDERS.enabled else _valid_provider(body)
    if spec is None:
        raise ProviderError(field, f"ClusterMetricProvider {name} has an invalid spec")
    return spec


def forget_provider(name: str) -> None:
    """Drop the providers (HTTP sessions) made for a ClusterMetricProvider that was deleted."""
    with _providers_lock:
        for key in [k for k in _providers if k[:2] == ("provider", name)]:
            del _providers[key]


def _ca_file(pem: str) -> str:
    """A CA bundle on disk (requests wants a path), one file per distinct content."""
    d = Path(tempfile.gettempdir()) / "model-rollouts-ca"
    d.mkdir(mode=0o700, exist_ok=True)
    path = d / (hashlib.sha256(pem.encode()).hexdigest()[:32] + ".pem")
    if not path.exists():
        path.write_text(pem)
    return str(path)


def check_queries(queries: list[tuple[str, str | None]]) -> None:
    """ProviderError naming the field of the first query template with a placeholder outside the fixed set."""
    for field, query in queries:
        if query:
            try:
                check_template(query)
            except TemplateError as e:
                raise ProviderError(field, str(e)) from e


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
    """A metric template's spec: from the operator's watch when it holds it (no request), else one
    GET (kept by the watch's cache; without the watch, in ``_templates`` for TEMPLATE_CACHE_SECONDS)."""
    key = (ref.kind, namespace if ref.kind == TEMPLATE_KIND else "", ref.name)
    if watched.TEMPLATES.enabled:
        return _watched_template(ref, key, namespace, field)
    t = time.monotonic()
    with _templates_lock:
        for k in [k for k, (at, _, _) in _templates.items() if t - at >= TEMPLATE_CACHE_SECONDS]:
            del _templates[k]
        hit = _templates.get(key)
        if hit is not None:
            _templates.move_to_end(key)
            return hit[2]
    obj = _get_template(ref, namespace, field)
    rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
    try:
        spec = MetricTemplateSpec.model_validate(obj.get("spec") or {})
    except ValidationError:
        raise ProviderError(field, f"{ref.kind} {ref.name} has an invalid spec") from None
    if ref.kind != TEMPLATE_KIND:
        check_platform_template(spec, f"{field} ({ref.kind} {ref.name})")
    with _templates_lock:
        _templates[key] = (time.monotonic(), rv, spec)
        _templates.move_to_end(key)
        while len(_templates) > TEMPLATE_CACHE_MAX:
            _templates.popitem(last=False)
    return spec


def _watched_template(
    ref: TemplateRef, key: tuple[str, str, str], namespace: str, field: str
) -> MetricTemplateSpec:
    hit = watched.TEMPLATES.get(key)
    spec = hit.value if hit is not None else watched.TEMPLATES.store(_get_template(ref, namespace, field))
    if spec is None:
        raise ProviderError(field, f"{ref.kind} {ref.name} has an invalid spec")
    if ref.kind != TEMPLATE_KIND:
        check_platform_template(spec, f"{field} ({ref.kind} {ref.name})")
    return spec


def _get_template(ref: TemplateRef, namespace: str, field: str) -> dict[str, Any]:
    """One GET of a metric template; ProviderError naming ``field`` if it cannot be read."""
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
            raise ProviderError(field, f"{ref.kind} {ref.name} not found") from None
        raise ProviderError(field, f"{ref.kind} {ref.name} cannot be read (HTTP {e.status})") from None
    return cast(dict[str, Any], raw)


def resolve_metric(metric: M, field: str, namespace: str, names: tuple[str, ...]) -> M:
    """A guardrail or count metric with its templateRef replaced by the template's queries (filled args).

    ProviderError naming ``field.templateRef`` when the template is missing, lacks a query, or an arg
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
        raise ProviderError(where, str(e)) from None
    return metric.model_copy(update={**queries, "templateRef": None})
