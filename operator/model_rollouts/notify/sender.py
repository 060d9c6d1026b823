"""Send notifications from a bounded background queue; ask gates. Never a URL, header or body in a log.

A ClusterNotificationProvider's URL comes from a Secret in the operator's own namespace, or is
inline and must match ``--allowed-notification-address`` (default: none). Redirects are not
followed. The control loop only enqueues (:meth:`Sender.publish` never blocks); a full queue drops
the notice and counts it. Gates are asked synchronously by the handler, bounded by the provider's
timeout, and every failure is an answer ("closed"), never an exception.
"""

from __future__ import annotations

import base64
import logging
import queue
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import requests
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from model_rollouts import kube, policy, telemetry
from model_rollouts.api.common import GROUP, VERSION, parse_duration
from model_rollouts.api.notification import (
    NOTIFICATION_PROVIDER_KIND,
    NOTIFICATION_PROVIDER_PLURAL,
    ClusterNotificationProviderSpec,
    NotificationRef,
)
from model_rollouts.notify import Notice
from model_rollouts.notify.events import Dedupe, key, wants
from model_rollouts.notify.payloads import formats

logger = logging.getLogger("model_rollouts.notify")

#: Inline addresses a ClusterNotificationProvider may use (--allowed-notification-address).
ALLOWED: list[re.Pattern[str]] = []
#: Seconds a resolved provider is reused (an edit of it or its Secret takes effect within this).
CACHE_SECONDS = 10.0
#: Seconds any Kubernetes API call made here may take.
REQUEST_TIMEOUT = 10


def configure(allowed: list[str]) -> None:
    """Compile the allowlist (a bad expression fails start-up, never a provider)."""
    ALLOWED[:] = [re.compile(a) for a in allowed]


class ProviderError(Exception):
    """A provider cannot be used; the text is fixed (names the provider and why), never a server's."""


@dataclass(frozen=True)
class Target:
    name: str
    type: str
    url: str
    timeout: float
    #: Who may use it (allowedNamespaces, namespaceSelector); None admits only the operator's namespace.
    spec: ClusterNotificationProviderSpec | None = field(default=None, compare=False)


#: Seconds a Namespace's labels are reused for namespaceSelector.
NAMESPACE_CACHE_SECONDS = 30.0
_namespace_labels: dict[str, tuple[float, dict[str, str] | None]] = {}
_namespace_lock = threading.Lock()


def namespace_labels(
    namespace: str, api: Callable[[], client.ApiClient] | None = None
) -> dict[str, str] | None:
    """A Namespace's labels (one GET, cached briefly); None if they cannot be read (e.g. a namespaced
    install without access to Namespaces: then only kubernetes.io/metadata.name is known)."""
    with _namespace_lock:
        hit = _namespace_labels.get(namespace)
    if hit is not None and time.monotonic() - hit[0] < NAMESPACE_CACHE_SECONDS:
        return hit[1]
    labels: dict[str, str] | None
    try:
        ns = client.CoreV1Api((api or kube.api)()).read_namespace(namespace, _request_timeout=REQUEST_TIMEOUT)
        labels = dict((ns.metadata.labels if ns.metadata else None) or {})
    except Exception:
        labels = None
    with _namespace_lock:
        if len(_namespace_labels) > 4096:
            _namespace_labels.clear()
        _namespace_labels[namespace] = (time.monotonic(), labels)
    return labels


def refusal(target: Target, namespace: str) -> str | None:
    """None if an object in ``namespace`` may use this provider; else a fixed text saying why not."""
    own = policy.POLICY.secret_namespace
    spec = target.spec
    if namespace == own:
        return None
    if spec is not None:
        if namespace in spec.allowedNamespaces:
            return None
        sel = spec.namespaceSelector
        if sel is not None and (
            not (sel.matchLabels or sel.matchExpressions)  # {}: every namespace, no labels needed
            or spec.admits(namespace, namespace_labels(namespace), own)
        ):
            return None
    return (
        f"{NOTIFICATION_PROVIDER_KIND} {target.name} does not admit namespace {namespace} "
        "(its spec.allowedNamespaces and spec.namespaceSelector; with neither set only the operator's "
        "namespace may use it): ask the platform team to admit this namespace"
    )


def _secret(name: str, key_: str, provider: str, api: client.ApiClient) -> str:
    namespace = policy.POLICY.secret_namespace
    what = f"{NOTIFICATION_PROVIDER_KIND} {provider}: spec.secretRef"
    try:
        secret = client.CoreV1Api(api).read_namespaced_secret(
            name, namespace, _request_timeout=REQUEST_TIMEOUT
        )
    except ApiException as e:
        raise ProviderError(f"{what}: its Secret cannot be read (HTTP {e.status})") from None
    except Exception as e:
        raise ProviderError(f"{what}: its Secret cannot be read ({type(e).__name__})") from None
    data = (secret.data or {}).get(key_)
    if data is None:
        raise ProviderError(f"{what}: its Secret has no key {key_!r}")
    try:
        url = base64.b64decode(data).decode().strip()
    except ValueError:
        raise ProviderError(f"{what}: its Secret's key {key_!r} is not UTF-8 text") from None
    if not re.fullmatch(r"https?://[^\s]+", url):
        raise ProviderError(f"{what}: its Secret's key {key_!r} is not one http(s) URL")
    return url


class Resolver:
    """ClusterNotificationProviders by name, read through the API (cached briefly)."""

    def __init__(self, api: Callable[[], client.ApiClient]) -> None:
        self.api = api
        self._cache: dict[str, tuple[float, Target | ProviderError]] = {}
        self._lock = threading.Lock()

    def __call__(self, name: str) -> Target:
        with self._lock:
            hit = self._cache.get(name)
        if hit is None or time.monotonic() - hit[0] >= CACHE_SECONDS:
            try:
                value: Target | ProviderError = self._read(name)
            except ProviderError as e:
                value = e
            with self._lock:
                if len(self._cache) > 512:
                    self._cache.clear()
                self._cache[name] = (time.monotonic(), value)
            hit = (time.monotonic(), value)
        if isinstance(hit[1], ProviderError):
            raise hit[1]
        return hit[1]

    def _read(self, name: str) -> Target:
        what = f"{NOTIFICATION_PROVIDER_KIND} {name}"
        api = self.api()
        try:
            raw = client.CustomObjectsApi(api).get_cluster_custom_object(
                GROUP, VERSION, NOTIFICATION_PROVIDER_PLURAL, name, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as e:
            if e.status == 404:
                raise ProviderError(f"{what} not found") from None
            raise ProviderError(f"{what} cannot be read (HTTP {e.status})") from None
        except Exception as e:
            raise ProviderError(f"{what} cannot be read ({type(e).__name__})") from None
        try:
            spec = ClusterNotificationProviderSpec.model_validate(cast(dict[str, Any], raw).get("spec") or {})
        except ValidationError:
            raise ProviderError(f"{what} has an invalid spec") from None
        if spec.secretRef is not None:
            url = _secret(spec.secretRef.name, spec.secretRef.key, name, api)
        elif spec.address is not None:
            if not any(p.fullmatch(spec.address) for p in ALLOWED):
                raise ProviderError(
                    f"{what}: spec.address is not allowed by the operator (--allowed-notification-address); "
                    "put the URL in a Secret of the operator's namespace (spec.secretRef)"
                )
            url = spec.address
        else:
            raise ProviderError(f"{what}: set address or secretRef")
        return Target(name, spec.type, url, parse_duration(spec.timeout), spec)


def post(target: Target, body: dict[str, Any], session: requests.Session) -> str | None:
    """POST JSON; None on a 2xx, else a fixed description (HTTP status or error class, never the body)."""
    try:
        r = session.post(target.url, json=body, timeout=target.timeout, allow_redirects=False)
    except requests.Timeout:
        return f"no answer within {target.timeout:g}s"
    except Exception as e:
        return f"request failed ({type(e).__name__})"
    try:
        if 200 <= r.status_code < 300:
            return None
        return f"answered HTTP {r.status_code}"
    finally:
        r.close()


class Sender:
    """Bounded queues, each with one daemon worker that POSTs notices to their providers.

    An object's notices to one provider always go through the same queue, so they arrive in the
    order they happened; a slow provider delays only the notices sharing its queue.
    """

    def __init__(self, resolve: Callable[[str], Target], workers: int = 2, maxsize: int = 512) -> None:
        self.resolve = resolve
        self.workers = max(1, workers)
        self.queues: list[queue.Queue[tuple[NotificationRef, Notice]]] = [
            queue.Queue(maxsize=max(1, maxsize // self.workers)) for _ in range(self.workers)
        ]
        self.dedupe = Dedupe()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _start(self) -> None:
        with self._lock:
            if self._threads:
                return
            for i in range(self.workers):
                t = threading.Thread(
                    target=self._run, args=(self.queues[i],), name=f"notify-{i}", daemon=True
                )
                t.start()
                self._threads.append(t)

    def publish(self, uid: str, refs: Iterable[NotificationRef], notices: Iterable[Notice]) -> int:
        """Enqueue each notice for each subscribed provider, once per transition; never blocks."""
        queued = 0
        for n in notices:
            for ref in refs:
                if not wants(ref, n.event) or not self.dedupe.first(key(uid, ref.provider, n)):
                    continue
                shard = zlib.crc32(f"{uid}/{ref.provider}".encode()) % self.workers
                try:
                    self.queues[shard].put_nowait((ref, n))
                except queue.Full:
                    telemetry.NOTIFICATIONS.labels("dropped").inc()
                    logger.warning(
                        "%s/%s: notification %s to %s dropped: the queue is full",
                        n.namespace, n.name, n.event, ref.provider,
                    )  # fmt: skip
                    continue
                queued += 1
        if queued:
            self._start()
        return queued

    def _run(self, q: queue.Queue[tuple[NotificationRef, Notice]]) -> None:
        session = requests.Session()
        session.max_redirects = 0
        while True:
            ref, n = q.get()
            try:
                self.send(ref, n, session)
            except Exception as e:  # a worker never dies
                telemetry.NOTIFICATIONS.labels("failed").inc()
                logger.warning("notification worker: %s", type(e).__name__)
            finally:
                q.task_done()

    def send(self, ref: NotificationRef, n: Notice, session: requests.Session) -> bool:
        where = (
            f"{n.namespace}/{n.name}: notification {n.event} to {NOTIFICATION_PROVIDER_KIND} {ref.provider}"
        )
        try:
            target = self.resolve(ref.provider)
        except ProviderError as e:
            telemetry.NOTIFICATIONS.labels("failed").inc()
            logger.warning("%s not sent: %s", where, e)
            return False
        refused = refusal(target, n.namespace)
        if refused is not None:
            telemetry.NOTIFICATIONS.labels("refused").inc()
            logger.warning("%s not sent: %s", where, refused)
            return False
        problem = post(target, formats()[target.type](n), session)
        if problem is not None:
            telemetry.NOTIFICATIONS.labels("failed").inc()
            logger.warning("%s failed: %s", where, problem)
            return False
        telemetry.NOTIFICATIONS.labels("sent").inc()
        logger.debug("%s sent", where)
        return True


_sender: Sender | None = None
_resolver: Resolver | None = None
_gate_session: requests.Session | None = None
_in_flight: dict[str, threading.Lock] = {}
_singleton_lock = threading.RLock()  # sender() builds the resolver under it


def resolver() -> Resolver:
    global _resolver
    with _singleton_lock:
        if _resolver is None:
            _resolver = Resolver(kube.api)
        return _resolver


def sender() -> Sender:
    global _sender
    with _singleton_lock:
        if _sender is None:
            _sender = Sender(resolver())
        return _sender


@dataclass(frozen=True)
class GateReply:
    """A gate's answer: open (a 2xx), or not with a fixed text; ``busy``: not asked at all, because an
    earlier request to the same gate (for another object) is still waiting for its answer."""

    open: bool
    message: str
    busy: bool = False


def check(provider: str, namespace: str) -> str | None:
    """Why an object in ``namespace`` may not name this provider (a fixed text), or None.

    A provider that cannot be read or found is not refused here: a notification to it is not sent
    and a gate on it stays closed, each saying why.
    """
    try:
        target = resolver()(provider)
    except ProviderError:
        return None
    return refusal(target, namespace)


def ask(provider: str, body: dict[str, Any], namespace: str) -> GateReply:
    """Ask a gate for an object in ``namespace``. Open only on a 2xx from a webhook-type provider that
    admits the namespace; nothing is sent to a provider that does not."""
    global _gate_session
    try:
        target = resolver()(provider)
    except ProviderError as e:
        return GateReply(False, str(e))
    refused = refusal(target, namespace)
    if refused is not None:
        return GateReply(False, refused)
    if target.type != "webhook":
        return GateReply(
            False, f"{NOTIFICATION_PROVIDER_KIND} {provider} is of type {target.type}; a gate needs webhook"
        )
    with _singleton_lock:
        if _gate_session is None:
            _gate_session = requests.Session()
            _gate_session.max_redirects = 0
        session = _gate_session
        busy = _in_flight.setdefault(target.url, threading.Lock())
    # One request per gate URL at a time: a gate that does not answer holds at most one handler
    # thread (for its timeout); every other object asking it meanwhile is held at once.
    if not busy.acquire(blocking=False):
        return GateReply(False, "busy: an earlier request to this gate has not been answered yet", busy=True)
    try:
        problem = post(target, body, session)
    finally:
        busy.release()
    return GateReply(True, "answered 2xx") if problem is None else GateReply(False, problem)
