"""Whether a Service has a ready endpoint, from its EndpointSlices (for both kinds)."""

from __future__ import annotations

from kubernetes import client

from model_rollouts.kube.client import REQUEST_TIMEOUT, api


def service_ready(namespace: str, service: str) -> bool | None:
    """True when one of the Service's EndpointSlices has a ready endpoint (an endpoint without
    conditions counts as ready), False when it has slices and none is ready, None when unknown
    (no slice visible, or the read failed): None changes nothing."""
    try:
        slices = client.DiscoveryV1Api(api()).list_namespaced_endpoint_slice(
            namespace,
            label_selector=f"kubernetes.io/service-name={service}",
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
