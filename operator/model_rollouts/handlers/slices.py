"""The EndpointSlices of the watched namespaces, kept from a watch (kube/readiness.py): a measurement
reads each arm's readiness from here instead of LISTing its Service's slices."""

from __future__ import annotations

from typing import Any

import kopf

from model_rollouts.kube.readiness import SERVICE_LABEL, SLICES


@kopf.on.startup()
def watch_slices(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Only the slices of a Service (the label the EndpointSlice controller sets), selected by the API server.
    settings.watching.label_selectors["discovery.k8s.io", "endpointslices"] = SERVICE_LABEL
    SLICES.enabled = True


@kopf.on.event("discovery.k8s.io", "v1", "endpointslices")
def slice_event(type: str | None, body: kopf.Body, **_: Any) -> None:
    SLICES.seen(type, body)
