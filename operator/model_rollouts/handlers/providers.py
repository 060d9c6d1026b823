"""ClusterMetricProviders, ClusterMetricTemplates and MetricTemplates kept from Kopf's watch, and the
provider Secrets of the operator's own namespace from an informer (metrics/watched.py): a tick
resolves its provider, templates and credentials from memory instead of GETting them."""

from __future__ import annotations

from typing import Any

import kopf

from model_rollouts import policy
from model_rollouts.api.common import GROUP, VERSION
from model_rollouts.api.provider import PROVIDER_PLURAL
from model_rollouts.api.template import CLUSTER_TEMPLATE_PLURAL, TEMPLATE_PLURAL
from model_rollouts.metrics import resolve, watched

_informer: list[watched.SecretInformer] = []


@kopf.on.startup()
def watch_providers(**_: Any) -> None:
    watched.PROVIDERS.enabled = True
    watched.TEMPLATES.enabled = True
    # Kopf watches a kind in every watched namespace (or cluster-wide); Secrets are listed only in
    # the operator's own namespace, by a thread of their own.
    informer = watched.SecretInformer(policy.POLICY.secret_namespace)
    _informer.append(informer)
    informer.start()


@kopf.on.cleanup()
def stop_secrets(**_: Any) -> None:
    while _informer:
        _informer.pop().stop()


@kopf.on.event(GROUP, VERSION, PROVIDER_PLURAL)
def provider_event(type: str | None, body: kopf.Body, **_: Any) -> None:
    watched.PROVIDERS.seen(type, body)
    if type == "DELETED":
        resolve.forget_provider(str(body.get("metadata", {}).get("name") or ""))


@kopf.on.event(GROUP, VERSION, CLUSTER_TEMPLATE_PLURAL)
def cluster_template_event(type: str | None, body: kopf.Body, **_: Any) -> None:
    watched.TEMPLATES.seen(type, body)


@kopf.on.event(GROUP, VERSION, TEMPLATE_PLURAL)
def template_event(type: str | None, body: kopf.Body, **_: Any) -> None:
    watched.TEMPLATES.seen(type, body)
