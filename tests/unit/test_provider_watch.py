"""Providers, templates and provider Secrets from the operator's watches (metrics/watched.py, issue 18):
a hit sends no request, a miss GETs as before (and is kept), a deletion or a newer copy replaces the
entry, and what was derived from an old copy (the HTTP session with its token) is not used again."""

from __future__ import annotations

import base64
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from model_rollouts import policy
from model_rollouts.api.common import AnalysisBase, TemplateRef
from model_rollouts.metrics import resolve, watched
from model_rollouts.metrics.errors import ProviderError

ADDRESS = "http://prom-a.monitoring:9090"


def provider_body(name: str, rv: str, address: str = ADDRESS, **prom: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mlrollouts.io/v1alpha1",
        "kind": "ClusterMetricProvider",
        "metadata": {"name": name, "resourceVersion": rv},
        "spec": {"prometheus": {"address": address, **prom}},
    }


def template_body(name: str, rv: str, query: str, namespace: str | None = "ml") -> dict[str, Any]:
    kind = "MetricTemplate" if namespace else "ClusterMetricTemplate"
    meta: dict[str, Any] = {"name": name, "resourceVersion": rv}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "mlrollouts.io/v1alpha1", "kind": kind, "metadata": meta, "spec": {"query": query}}


class FakeApi:
    """The API server as resolve.py asks it: counts every request, answers from ``objects``."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.providers: dict[str, dict[str, Any]] = {}
        self.templates: dict[tuple[str, str], dict[str, Any]] = {}
        self.secrets: dict[str, tuple[str, dict[str, str]]] = {}

    # CustomObjectsApi
    def get_cluster_custom_object(self, group: str, version: str, plural: str, name: str, **_: Any) -> Any:
        self.calls[f"get {plural}"] += 1
        found = (
            self.providers.get(name) if plural == "clustermetricproviders" else self.templates.get(("", name))
        )
        if found is None:
            raise ApiException(status=404)
        return found

    def get_namespaced_custom_object(
        self, group: str, version: str, ns: str, plural: str, name: str, **_: Any
    ) -> Any:
        self.calls[f"get {plural}"] += 1
        if (ns, name) not in self.templates:
            raise ApiException(status=404)
        return self.templates[(ns, name)]

    def list_cluster_custom_object(self, group: str, version: str, plural: str, **_: Any) -> Any:
        self.calls[f"list {plural}"] += 1
        return {"metadata": {"resourceVersion": "10"}, "items": list(self.providers.values())}

    # CoreV1Api
    def read_namespaced_secret(self, name: str, namespace: str, **_: Any) -> Any:
        self.calls["get secrets"] += 1
        assert namespace == policy.POLICY.secret_namespace
        if name not in self.secrets:
            raise ApiException(status=404)
        rv, data = self.secrets[name]

        class Meta:
            resource_version = rv

        class Secret:
            metadata = Meta()

        s = Secret()
        s.data = data  # type: ignore[attr-defined]
        return s


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture()
def kube(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeApi]:
    fake = FakeApi()
    monkeypatch.setattr(resolve.client, "CustomObjectsApi", lambda *_: fake)
    monkeypatch.setattr(resolve.client, "CoreV1Api", lambda *_: fake)
    monkeypatch.setattr(resolve, "api", lambda: None)
    monkeypatch.setattr(resolve, "_provider_list", (0.0, []))
    caches = (watched.PROVIDERS, watched.TEMPLATES, watched.SECRETS)
    for c in caches:
        c.clear()
        c.enabled = True
    resolve._providers.clear()
    yield fake
    for c in caches:
        c.clear()
        c.enabled = False
    resolve._providers.clear()


def analysis(**spec: Any) -> AnalysisBase:
    return AnalysisBase.model_validate({"interval": "30s", **spec})


def bearer(p: resolve.Scoped) -> str | None:
    auth = (p.inner._client.headers or {}).get("Authorization")
    return str(auth) if auth is not None else None


# -- providers ------------------------------------------------------------------------------------
def test_a_provider_the_watch_holds_is_used_without_a_request(kube: FakeApi) -> None:
    watched.PROVIDERS.seen(None, provider_body("prom", "5"))
    for _ in range(100):
        p = resolve.provider_for(analysis(provider="prom"), "ml")
    assert p.inner.address == ADDRESS and p.key == "provider/prom@ml"
    assert kube.calls == Counter()


def test_a_provider_not_seen_yet_is_read_once_then_kept(kube: FakeApi) -> None:
    kube.providers["prom"] = provider_body("prom", "5")
    resolve.provider_for(analysis(provider="prom"), "ml")
    resolve.provider_for(analysis(provider="prom"), "ml")
    assert kube.calls == Counter({"get clustermetricproviders": 1})


def test_without_the_watch_every_look_up_reads_the_provider(kube: FakeApi) -> None:
    watched.PROVIDERS.enabled = False
    kube.providers["prom"] = provider_body("prom", "5")
    watched.PROVIDERS.seen(None, provider_body("prom", "5"))
    resolve.provider_for(analysis(provider="prom"), "ml")
    resolve.provider_for(analysis(provider="prom"), "ml")
    assert kube.calls == Counter({"get clustermetricproviders": 2})


def test_a_missing_provider_is_the_same_refusal_as_without_the_watch(kube: FakeApi) -> None:
    for enabled in (True, False):
        watched.PROVIDERS.enabled = enabled
        with pytest.raises(ProviderError) as e:
            resolve.provider_for(analysis(provider="nope"), "ml")
        assert str(e.value) == "spec.analysis.provider: ClusterMetricProvider nope not found"


def test_a_deleted_provider_is_refused_at_the_next_look_up(kube: FakeApi) -> None:
    watched.PROVIDERS.seen(None, provider_body("prom", "5"))
    resolve.provider_for(analysis(provider="prom"), "ml")
    watched.PROVIDERS.seen("DELETED", provider_body("prom", "9"))
    with pytest.raises(ProviderError, match="ClusterMetricProvider prom not found"):
        resolve.provider_for(analysis(provider="prom"), "ml")
    assert kube.calls == Counter({"get clustermetricproviders": 1})  # the miss asked, and heard 404


def test_a_changed_provider_replaces_its_entry_and_its_session(kube: FakeApi) -> None:
    watched.PROVIDERS.seen(None, provider_body("prom", "5"))
    first = resolve.provider_for(analysis(provider="prom"), "ml").inner
    watched.PROVIDERS.seen("MODIFIED", provider_body("prom", "6", "http://prom-b.monitoring:9090"))
    second = resolve.provider_for(analysis(provider="prom"), "ml").inner
    assert second.address == "http://prom-b.monitoring:9090" and second is not first
    assert first not in resolve._providers.values()  # the old configuration is not used again
    # A copy older than the one held (a slow GET, a late event) changes nothing.
    watched.PROVIDERS.seen("MODIFIED", provider_body("prom", "5"))
    assert resolve.provider_for(analysis(provider="prom"), "ml").inner is second
    assert kube.calls == Counter()


def test_a_read_older_than_a_deletion_does_not_bring_the_provider_back() -> None:
    cache: watched.ObjectCache[str, Any] = watched.ObjectCache(dict, lambda b: b["metadata"]["name"])
    cache.enabled = True
    cache.seen(None, provider_body("prom", "5"))
    cache.seen("DELETED", provider_body("prom", "7"))
    cache.store(provider_body("prom", "6"))  # a GET answered before the deletion
    assert cache.get("prom") is None
    cache.store(provider_body("prom", "8"))  # created again
    assert cache.get("prom") is not None


def test_an_invalid_provider_spec_is_refused_from_the_cache(kube: FakeApi) -> None:
    body = provider_body("prom", "5")
    body["spec"] = {"prometheus": {"address": "not a url", "timeout": "forever"}}
    watched.PROVIDERS.seen(None, body)
    with pytest.raises(ProviderError, match="ClusterMetricProvider prom has an invalid spec"):
        resolve.provider_for(analysis(provider="prom"), "ml")
    assert kube.calls == Counter()


def test_the_inline_allowlist_lists_providers_once_then_follows_the_watch(kube: FakeApi) -> None:
    kube.providers["prom"] = provider_body("prom", "5")
    inline = analysis(prometheus={"address": ADDRESS})
    for _ in range(5):
        resolve.provider_for(inline, "ml")
    assert kube.calls == Counter({"list clustermetricproviders": 1})
    # A new provider's address is admitted from its watch event, a deleted one's is not.
    other = "http://prom-c.monitoring:9090"
    watched.PROVIDERS.seen("ADDED", provider_body("c", "11", other))
    resolve.provider_for(analysis(prometheus={"address": other}), "ml")
    watched.PROVIDERS.seen("DELETED", provider_body("prom", "12"))
    with pytest.raises(ProviderError, match=r"spec\.analysis\.prometheus\.address"):
        resolve.provider_for(inline, "ml")
    assert kube.calls == Counter({"list clustermetricproviders": 1})


def test_a_deletion_the_watch_missed_is_found_by_a_read_after_confirm_seconds(
    kube: FakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Kopf lists again after a watch that cannot resume, without reporting what was deleted meanwhile.
    watched.PROVIDERS.seen(None, provider_body("prom", "5"))
    resolve.provider_for(analysis(provider="prom"), "ml")
    assert kube.calls == Counter()
    monkeypatch.setattr(watched, "CONFIRM_SECONDS", 0.0)
    with pytest.raises(ProviderError, match="ClusterMetricProvider prom not found"):
        resolve.provider_for(analysis(provider="prom"), "ml")
    assert kube.calls == Counter({"get clustermetricproviders": 1})


def test_a_new_listing_drops_providers_it_lacks(kube: FakeApi) -> None:
    kube.providers["a"] = provider_body("a", "5", "http://a.monitoring:9090")
    watched.PROVIDERS.seen(None, provider_body("b", "4", "http://b.monitoring:9090"))  # deleted, unseen
    assert [name for name, _ in resolve._cluster_providers()] == ["a"]
    assert [name for name, _ in resolve._cluster_providers()] == ["a"]
    assert kube.calls == Counter({"list clustermetricproviders": 1})


# -- Secrets --------------------------------------------------------------------------------------
def test_a_provider_token_comes_from_the_watched_secret(kube: FakeApi) -> None:
    kube.secrets["token"] = ("20", {"token": b64("first")})
    watched.PROVIDERS.seen(
        None, provider_body("prom", "5", bearerTokenSecret={"name": "token", "key": "token"})
    )
    assert bearer(resolve.provider_for(analysis(provider="prom"), "ml")) == "Bearer first"
    assert kube.calls == Counter({"get secrets": 1})  # not seen by the watch yet: one GET, kept
    for _ in range(10):
        resolve.provider_for(analysis(provider="prom"), "ml")
    assert kube.calls == Counter({"get secrets": 1})
    # The Secret changes: the next look-up uses the new token (a new session), with no request.
    watched.SECRETS.seen("MODIFIED", "token", "21", {"token": b64("second")})
    assert bearer(resolve.provider_for(analysis(provider="prom"), "ml")) == "Bearer second"
    assert kube.calls == Counter({"get secrets": 1})
    # It is deleted: the next look-up asks again and is refused, as without the watch.
    del kube.secrets["token"]
    watched.SECRETS.seen("DELETED", "token", "22", None)
    with pytest.raises(ProviderError, match=r"its Secret cannot be read \(HTTP 404\)"):
        resolve.provider_for(analysis(provider="prom"), "ml")


def test_only_secrets_a_look_up_asked_for_are_kept() -> None:
    cache = watched.SecretCache()
    cache.enabled = True
    cache.seen("ADDED", "sh.helm.release.v1.mr.v1", "3", {"release": "x" * 1000})
    cache.want("token")
    cache.seen("ADDED", "token", "4", {"token": b64("t")})
    assert cache.get("sh.helm.release.v1.mr.v1") is None
    entry = cache.get("token")
    assert entry is not None and entry.value == {"token": b64("t")}
    # A new listing (after a broken watch) drops what is no longer there.
    cache.relisted({"other": ("9", {})}, "9")
    assert cache.get("token") is None
    cache.put("token", "8", {"token": b64("stale")})  # a GET from before that listing
    assert cache.get("token") is None


# -- templates ------------------------------------------------------------------------------------
Q1 = 'sum(rate(errors{namespace="{{ namespace }}",service="{{ service }}"}[1m]))'
Q2 = 'sum(rate(failures{namespace="{{ namespace }}",service="{{ service }}"}[1m]))'


@pytest.mark.parametrize("namespace", ["ml", None])
def test_a_template_from_the_watch_then_changed_then_deleted(kube: FakeApi, namespace: str | None) -> None:
    kind = "MetricTemplate" if namespace else "ClusterMetricTemplate"
    plural = "metrictemplates" if namespace else "clustermetrictemplates"
    ref = TemplateRef(kind=kind, name="errors")
    field = "spec.analysis.guardrails[0].templateRef"
    watched.TEMPLATES.seen(None, template_body("errors", "5", Q1, namespace))
    for _ in range(10):
        assert resolve._template(ref, "ml", field).query == Q1
    assert kube.calls == Counter()
    watched.TEMPLATES.seen("MODIFIED", template_body("errors", "6", Q2, namespace))
    assert resolve._template(ref, "ml", field).query == Q2
    watched.TEMPLATES.seen("DELETED", template_body("errors", "7", Q2, namespace))
    with pytest.raises(ProviderError) as e:
        resolve._template(ref, "ml", field)
    assert str(e.value) == f"{field}: {kind} errors not found"
    assert kube.calls == Counter({f"get {plural}": 1})


def test_a_template_not_seen_yet_is_read_once_then_kept(kube: FakeApi) -> None:
    kube.templates[("ml", "errors")] = template_body("errors", "5", Q1)
    ref = TemplateRef(kind="MetricTemplate", name="errors")
    for _ in range(3):
        assert resolve._template(ref, "ml", "f").query == Q1
    assert kube.calls == Counter({"get metrictemplates": 1})
    # Another namespace's template of the same name is another entry.
    with pytest.raises(ProviderError, match="MetricTemplate errors not found"):
        resolve._template(ref, "other", "f")


def test_a_platform_template_that_does_not_bind_the_namespace_is_refused_from_the_cache(
    kube: FakeApi,
) -> None:
    watched.TEMPLATES.seen(
        None, template_body("loose", "5", 'sum(rate(errors{service="{{ service }}"}[1m]))', None)
    )
    with pytest.raises(ProviderError, match="must also match"):
        resolve._template(TemplateRef(kind="ClusterMetricTemplate", name="loose"), "ml", "f")


# -- what is watched ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("denied", "providers", "templates"),
    [
        (set(), True, True),
        # rbac.clusterMetricKinds false / manifests/namespace-install.yaml: no failing watch, GETs as before.
        ({"clustermetricproviders", "clustermetrictemplates"}, False, False),
        ({"metrictemplates"}, True, False),  # one cache serves both template kinds
    ],
)
def test_only_the_kinds_rbac_lets_the_operator_watch_are_watched(
    monkeypatch: pytest.MonkeyPatch, denied: set[str], providers: bool, templates: bool
) -> None:
    from model_rollouts.handlers import providers as handlers

    asked: list[tuple[str, str, str | None]] = []

    class Authz:
        def __init__(self, *_: object) -> None:
            pass

        def create_self_subject_access_review(self, review: Any, **_: Any) -> Any:
            a = review.spec.resource_attributes
            asked.append((a.verb, a.resource, a.namespace))

            class Answer:
                class status:
                    allowed = a.resource not in denied

            return Answer()

    registered: list[str] = []
    monkeypatch.setattr(handlers.client, "AuthorizationV1Api", Authz)
    monkeypatch.setattr(handlers.kopf.on, "event", lambda g, v, plural: lambda fn: registered.append(plural))
    monkeypatch.setattr(handlers.kopf.on, "startup", lambda: lambda fn: fn)
    monkeypatch.setattr(handlers.kopf.on, "cleanup", lambda: lambda fn: fn)
    try:
        handlers.register(lambda: None, ["team-a", "team-b"])
        assert watched.PROVIDERS.enabled is providers and watched.TEMPLATES.enabled is templates
        assert ("clustermetricproviders" in registered) is providers
        assert ("metrictemplates" in registered) is templates
        # MetricTemplates are asked for where they are watched: the watched namespaces.
        assert {ns for _, r, ns in asked if r == "metrictemplates"} <= {"team-a", "team-b"}
        if not denied:
            assert ("watch", "metrictemplates", "team-b") in asked
        assert ("list", "clustermetricproviders", None) in asked
    finally:
        watched.PROVIDERS.enabled = watched.TEMPLATES.enabled = False
