"""ClusterMetricProviders, ClusterMetricTemplates and MetricTemplates kept from Kopf's watch, and the
provider Secrets of the operator's own namespace from an informer (metrics/watched.py): a tick
resolves its provider, templates and credentials from memory instead of GETting them.

``register`` (called by main before Kopf runs) watches a kind only where RBAC lets the operator list
and watch it: an install without the Cluster* metric kinds' ClusterRole (``rbac.clusterMetricKinds:
false``, ``manifests/namespace-install.yaml``) gets no failing watch, and its look-ups GET as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import kopf
from kubernetes import client

from model_rollouts import policy
from model_rollouts.api.common import GROUP, VERSION
from model_rollouts.api.provider import PROVIDER_PLURAL
from model_rollouts.api.template import CLUSTER_TEMPLATE_PLURAL, TEMPLATE_PLURAL
from model_rollouts.kube.client import REQUEST_TIMEOUT
from model_rollouts.metrics import resolve, watched

log = logging.getLogger(__name__)
_informer: list[watched.SecretInformer] = []


def provider_event(type: str | None, body: kopf.Body, **_: Any) -> None:
    watched.PROVIDERS.seen(type, body)
    if type == "DELETED":
        resolve.forget_provider(str(body.get("metadata", {}).get("name") or ""))


def template_event(type: str | None, body: kopf.Body, **_: Any) -> None:
    watched.TEMPLATES.seen(type, body)


def start_secrets(**_: Any) -> None:
    # Kopf watches a kind in every watched namespace (or cluster-wide); Secrets are listed only in
    # the operator's own namespace, by a thread of their own.
    informer = watched.SecretInformer(policy.POLICY.secret_namespace)
    _informer.append(informer)
    informer.start()


def stop_secrets(**_: Any) -> None:
    while _informer:
        _informer.pop().stop()


def may_watch(api: Callable[[], Any], plural: str, namespaces: list[str | None]) -> bool:
    """Whether the operator may list and watch ``plural`` in each of ``namespaces`` (None: cluster-wide);
    True when that cannot be asked (the watch then reports its own errors)."""
    try:
        authz = client.AuthorizationV1Api(api())
        for ns in namespaces:
            for verb in ("list", "watch"):
                review = client.V1SelfSubjectAccessReview(
                    spec=client.V1SelfSubjectAccessReviewSpec(
                        resource_attributes=client.V1ResourceAttributes(
                            group=GROUP, resource=plural, verb=verb, namespace=ns
                        )
                    )
                )
                answer: Any = authz.create_self_subject_access_review(
                    review, _request_timeout=REQUEST_TIMEOUT
                )
                if not answer.status.allowed:
                    return False
    except Exception as e:
        log.debug("cannot ask whether %s may be watched: %s", plural, type(e).__name__)
    return True


def register(api: Callable[[], Any], namespaces: list[str]) -> None:
    """Watch ClusterMetricProviders and the two template kinds where RBAC allows it (templates only
    if both kinds may be watched: one cache serves both), and the provider Secrets."""
    scopes: list[str | None] = list(namespaces) or [None]
    if may_watch(api, PROVIDER_PLURAL, [None]):
        kopf.on.event(GROUP, VERSION, PROVIDER_PLURAL)(provider_event)
        watched.PROVIDERS.enabled = True
    if may_watch(api, CLUSTER_TEMPLATE_PLURAL, [None]) and may_watch(api, TEMPLATE_PLURAL, scopes):
        kopf.on.event(GROUP, VERSION, CLUSTER_TEMPLATE_PLURAL)(template_event)
        kopf.on.event(GROUP, VERSION, TEMPLATE_PLURAL)(template_event)
        watched.TEMPLATES.enabled = True
    kopf.on.startup()(start_secrets)
    kopf.on.cleanup()(stop_secrets)
    log.info(
        "provider look-ups from watches: ClusterMetricProviders %s, metric templates %s, Secrets of %s",
        "yes" if watched.PROVIDERS.enabled else "no (not allowed to list and watch them)",
        "yes" if watched.TEMPLATES.enabled else "no (not allowed to list and watch them)",
        policy.POLICY.secret_namespace,
    )
