"""ClusterMetricProviders, metric templates and provider Secrets as the operator's watches last saw them.

``metrics/resolve.py`` reads these instead of GETting them on every tick: a hit costs no request, a
miss GETs as before (a look-up before the watch's first listing, or of an object that does not
exist, behaves as without the cache) and keeps what it read. The providers and templates are kept by
Kopf ``on.event`` handlers (``handlers/providers.py``); the Secrets of the operator's own namespace by
a small informer thread (:class:`SecretInformer`: Kopf watches a kind in every watched namespace or
cluster-wide, and Secrets may be listed only in the operator's namespace).

Every entry carries the resourceVersion it came from. A copy older than the one held, or than a
deletion the watch reported, is dropped (resourceVersions compared as the integers the API server
hands out; anything else is taken as newer), so a slow GET never brings back a deleted or replaced
object; a provider or template no event or read has confirmed for CONFIRM_SECONDS is read again.
Only what resolution reads is kept: a provider's or template's parsed spec (``None`` when the spec
is invalid), a Secret's ``data``, and only for the Secrets a look-up has asked for (never, say, the
Helm release Secrets of the namespace). Off, and empty, unless the operator runs the watches
(``enabled``, set at its startup): anywhere else every look-up GETs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from model_rollouts.api.provider import ClusterMetricProviderSpec
from model_rollouts.api.template import TEMPLATE_KIND, MetricTemplateSpec
from model_rollouts.kube.client import REQUEST_TIMEOUT, api

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: Deletions remembered (to refuse an older copy read before them); the oldest are forgotten first.
MAX_GONE = 4096


def _rv(value: Any) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None


@dataclass(frozen=True)
class Entry(Generic[V]):
    rv: int | None
    value: V
    #: time.monotonic() when a watch event or a read last brought this copy.
    at: float = field(default_factory=time.monotonic)


class Versioned(Generic[K, V]):
    """Entries by key, each from the newest copy seen (by resourceVersion), deletions remembered."""

    def __init__(self) -> None:
        self._items: dict[K, Entry[V]] = {}
        self._gone: OrderedDict[K, int] = OrderedDict()
        self._lock = threading.Lock()
        #: True once the operator keeps this kind from a watch; until then get() finds nothing.
        self.enabled = False

    def put(self, key: K, rv: Any, value: V) -> bool:
        """Keep this copy unless a newer one, or a newer deletion, was seen. True if kept."""
        if not self.enabled:
            return False
        new = _rv(rv)
        with self._lock:
            gone, old = self._gone.get(key), self._items.get(key)
            if new is not None and gone is not None and new <= gone:
                return False
            if new is not None and old is not None and old.rv is not None and new < old.rv:
                return False
            self._items[key] = Entry(new, value)
            self._gone.pop(key, None)
            return True

    def delete(self, key: K, rv: Any) -> None:
        """The object is gone (as of ``rv``): forget it, and refuse any copy not newer than that."""
        gone = _rv(rv)
        with self._lock:
            self._items.pop(key, None)
            if gone is not None:
                self._gone[key] = gone
                self._gone.move_to_end(key)
                while len(self._gone) > MAX_GONE:
                    self._gone.popitem(last=False)

    def get(self, key: K) -> Entry[V] | None:
        """The entry as last seen, or None (not watched, not seen yet, or gone)."""
        if not self.enabled:
            return None
        with self._lock:
            return self._items.get(key)

    def items(self) -> list[tuple[K, Entry[V]]]:
        with self._lock:
            return list(self._items.items())

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._gone.clear()


def _spec(model: Callable[[Any], V], body: Mapping[str, Any]) -> V | None:
    try:
        return model(body.get("spec") or {})
    except ValidationError:
        return None


#: Seconds an entry of a Kopf-watched kind is used without a new event or read. Kopf lists again
#: after a watch that cannot resume (HTTP 410) without reporting what was deleted meanwhile; such an
#: entry is read again (one GET) after this long instead of being served for ever.
CONFIRM_SECONDS = 600.0


class ObjectCache(Versioned[K, V | None]):
    """A kind kept from Kopf's watch: ``seen`` takes one event (``None`` for the initial listing)."""

    def __init__(self, model: Callable[[Any], V], key: Callable[[Mapping[str, Any]], K]) -> None:
        super().__init__()
        self.model, self.key = model, key
        #: time.monotonic() of the last full listing merged in (see resolve._cluster_providers), or
        #: None: until CONFIRM_SECONDS after it, the whole kind can be read from here.
        self.listed_at: float | None = None

    @property
    def listed(self) -> bool:
        return self.listed_at is not None and time.monotonic() - self.listed_at < CONFIRM_SECONDS

    def get(self, key: K) -> Entry[V | None] | None:
        entry = super().get(key)
        if entry is not None and time.monotonic() - entry.at >= CONFIRM_SECONDS:
            return None
        return entry

    def relisted(self, bodies: list[Mapping[str, Any]], list_rv: Any) -> None:
        """A full listing: each copy kept, and what it lacks (and no newer event brought) gone."""
        present = set()
        for body in bodies:
            self.store(body)
            present.add(self.key(body))
        gone = _rv(list_rv)
        for key, entry in self.items():
            if key not in present and (gone is None or entry.rv is None or entry.rv < gone):
                self.delete(key, list_rv)
        self.listed_at = time.monotonic()

    def seen(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        meta = body.get("metadata") or {}
        if event_type == "DELETED":
            self.delete(self.key(body), meta.get("resourceVersion"))
        else:
            self.store(body)

    def store(self, body: Mapping[str, Any]) -> V | None:
        """Keep this copy (a watch event's or a GET's); its parsed spec, None when invalid."""
        spec = _spec(self.model, body)
        self.put(self.key(body), (body.get("metadata") or {}).get("resourceVersion"), spec)
        return spec

    def clear(self) -> None:
        super().clear()
        self.listed_at = None


def _name(body: Mapping[str, Any]) -> str:
    return str((body.get("metadata") or {}).get("name") or "")


def template_key(body: Mapping[str, Any]) -> tuple[str, str, str]:
    """(kind, namespace, name) of a MetricTemplate, (kind, "", name) of a ClusterMetricTemplate."""
    meta = body.get("metadata") or {}
    kind = str(body.get("kind") or "")
    namespace = str(meta.get("namespace") or "") if kind == TEMPLATE_KIND else ""
    return kind, namespace, str(meta.get("name") or "")


#: ClusterMetricProviders by name.
PROVIDERS: ObjectCache[str, ClusterMetricProviderSpec] = ObjectCache(
    ClusterMetricProviderSpec.model_validate, _name
)
#: MetricTemplates and ClusterMetricTemplates in one cache, by :func:`template_key`.
TEMPLATES: ObjectCache[tuple[str, str, str], MetricTemplateSpec] = ObjectCache(
    MetricTemplateSpec.model_validate, template_key
)


class SecretCache(Versioned[str, dict[str, str]]):
    """The ``data`` of the operator's own Secrets that a look-up asked for (``wanted``)."""

    def __init__(self) -> None:
        super().__init__()
        self.wanted: set[str] = set()

    def want(self, name: str) -> Entry[dict[str, str]] | None:
        """The Secret's entry; from now on its events are kept (before a GET, so none is missed)."""
        if not self.enabled:
            return None
        with self._lock:
            self.wanted.add(name)
        return self.get(name)

    def seen(self, event_type: str, name: str, rv: Any, data: Mapping[str, str] | None) -> None:
        with self._lock:
            if name not in self.wanted:
                return
        if event_type == "DELETED":
            self.delete(name, rv)
        else:
            self.put(name, rv, dict(data or {}))

    def relisted(self, items: Mapping[str, tuple[Any, Mapping[str, str] | None]], list_rv: Any) -> None:
        """A full listing (after a start or a broken watch): every wanted Secret as it lists, the
        missing ones gone as of the listing."""
        with self._lock:
            wanted = set(self.wanted)
        for name in wanted:
            if name in items:
                rv, data = items[name]
                self.put(name, rv, dict(data or {}))
            else:
                self.delete(name, list_rv)

    def clear(self) -> None:
        super().clear()
        with self._lock:
            self.wanted.clear()


SECRETS = SecretCache()

#: Seconds a watch of Secrets runs before it is renewed (from where it was), and the wait after a failure.
SECRET_WATCH_SECONDS = 60
SECRET_RETRY_SECONDS = 5.0


class SecretInformer:
    """Lists, then watches, the Secrets of one namespace into :data:`SECRETS`, from a thread.

    ``SECRETS`` is enabled once the first listing succeeds. If Secrets may not be listed there
    (RBAC narrowed to named Secrets, ``rbac.secretNames``), it stays off and look-ups GET as before.
    """

    def __init__(self, namespace: str, cache: SecretCache = SECRETS) -> None:
        self.namespace, self.cache = namespace, cache
        self._stop = threading.Event()
        self._watch: watch.Watch | None = None
        self._thread = threading.Thread(target=self._run, name="secret-informer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        w = self._watch
        if w is not None:
            w.stop()

    def _run(self) -> None:
        core = client.CoreV1Api(api())
        warned = False
        while not self._stop.is_set():
            try:
                listing: Any = core.list_namespaced_secret(self.namespace, _request_timeout=REQUEST_TIMEOUT)
            except Exception as e:
                status = e.status if isinstance(e, ApiException) else None
                forbidden = status in (401, 403)
                if forbidden:
                    self.cache.enabled = False
                    self.cache.clear()
                    if not warned:
                        log.warning(
                            "Secrets of %s cannot be listed (HTTP %s): provider Secrets are read per "
                            "look-up (GET) instead of from a watch",
                            self.namespace,
                            status,
                        )
                        warned = True
                self._stop.wait(60.0 if forbidden else SECRET_RETRY_SECONDS)
                continue
            rv = str(listing.metadata.resource_version)
            self.cache.enabled = True
            self.cache.relisted(
                {s.metadata.name: (s.metadata.resource_version, s.data) for s in listing.items}, rv
            )
            self._follow(core, rv)
            self._stop.wait(SECRET_RETRY_SECONDS)

    def _follow(self, core: client.CoreV1Api, rv: str) -> None:
        """Watch from ``rv`` until the watch fails (then the caller lists again) or the informer stops."""
        while not self._stop.is_set():
            self._watch = w = watch.Watch()
            try:
                for event in w.stream(
                    core.list_namespaced_secret,
                    self.namespace,
                    resource_version=rv,
                    timeout_seconds=SECRET_WATCH_SECONDS,
                    allow_watch_bookmarks=True,
                    _request_timeout=SECRET_WATCH_SECONDS + REQUEST_TIMEOUT,
                ):
                    kind, obj = event.get("type"), cast(Any, event.get("object"))
                    if kind == "ERROR" or obj is None:
                        return
                    rv = obj.metadata.resource_version or rv
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        self.cache.seen(kind, obj.metadata.name, obj.metadata.resource_version, obj.data)
            except Exception as e:
                if not self._stop.is_set():
                    log.debug("the watch of Secrets in %s ended: %s", self.namespace, type(e).__name__)
                return
            finally:
                w.stop()
