"""Whether a Service has a ready endpoint, from its EndpointSlices (for both kinds).

The operator keeps the EndpointSlices of the watched namespaces from a watch (``SLICES``, fed by
``handlers/slices.py``): a measurement reads readiness from memory, never a LIST per analysis. Only
what readiness needs is kept (per slice: whether it has endpoints and whether one is ready), so memory
follows the number of slices, not their size. Off, and empty, unless the operator watches
EndpointSlices (``enabled``, set at its startup): anywhere else readiness is LISTed as before.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any

from kubernetes import client

from model_rollouts.kube.client import REQUEST_TIMEOUT, api

#: The label the EndpointSlice controller puts on a Service's slices.
SERVICE_LABEL = "kubernetes.io/service-name"


def _ready(endpoints: Iterable[Any]) -> bool:
    """Whether one endpoint is ready (one without conditions, or without ``ready``, counts as ready)."""
    for ep in endpoints:
        conditions = ep.get("conditions") if isinstance(ep, Mapping) else None
        if not isinstance(conditions, Mapping) or conditions.get("ready") is not False:
            return True
    return False


class SliceCache:
    """Per (namespace, Service): {slice name: whether one of its endpoints is ready}."""

    def __init__(self) -> None:
        self._items: dict[tuple[str, str], dict[str, bool]] = {}
        self._lock = threading.Lock()
        #: True once the operator watches EndpointSlices; until then ``ready`` knows nothing.
        self.enabled = False

    def seen(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """One watch event of an EndpointSlice (``None`` for the initial listing, as Kopf sends it)."""
        if not self.enabled:
            return
        meta = body.get("metadata") or {}
        service = (meta.get("labels") or {}).get(SERVICE_LABEL)
        if not service:
            return
        key, name = (str(meta.get("namespace") or ""), str(service)), str(meta.get("name") or "")
        with self._lock:
            slices = self._items.setdefault(key, {})
            if event_type == "DELETED":
                slices.pop(name, None)
                if not slices:
                    del self._items[key]
                return
            slices[name] = _ready(body.get("endpoints") or [])

    def ready(self, namespace: str, service: str) -> bool | None:
        """True: a ready endpoint; False: slices and none ready; None: no slice seen."""
        with self._lock:
            slices = self._items.get((namespace, service))
            return None if not slices else any(slices.values())

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


#: The process-wide cache.
SLICES = SliceCache()


def service_ready(namespace: str, service: str) -> bool | None:
    """True when one of the Service's EndpointSlices has a ready endpoint (an endpoint without
    conditions counts as ready), False when it has slices and none is ready, None when unknown
    (no slice visible, or the read failed): None changes nothing.

    From the operator's watch when it keeps one (no request at all); else one LIST."""
    if SLICES.enabled:
        return SLICES.ready(namespace, service)
    try:
        slices = client.DiscoveryV1Api(api()).list_namespaced_endpoint_slice(
            namespace,
            label_selector=f"{SERVICE_LABEL}={service}",
            _request_timeout=REQUEST_TIMEOUT,
        )
    except Exception:
        return None
    if not slices.items:
        return None
    return any(
        (ep.conditions is None or ep.conditions.ready is not False)
        for sl in slices.items
        for ep in (sl.endpoints or [])
    )
