"""The HTTPRoutes of the watched namespaces, kept from a watch (traffic/watched.py): a tick or a
finished object's guard reads its route from here instead of GETting it from the API server."""

from __future__ import annotations

from typing import Any

import kopf

from model_rollouts.traffic import watched


@kopf.on.event("gateway.networking.k8s.io", "v1", "httproutes")
def route_event(type: str | None, body: kopf.Body, **_: Any) -> None:
    watched.ROUTES.seen(type, body)
