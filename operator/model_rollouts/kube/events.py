"""Kubernetes Events about an object (best effort: its status holds the record)."""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from typing import Any

from kubernetes import client

from model_rollouts.api.common import MAX_MESSAGE, truncate
from model_rollouts.kube.client import REQUEST_TIMEOUT, api, sent


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
        sent(
            client.CoreV1Api(api()).create_namespaced_event(
                meta["namespace"], ev, _request_timeout=REQUEST_TIMEOUT, _preload_content=False
            )
        )
