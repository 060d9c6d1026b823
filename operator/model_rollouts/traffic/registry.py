"""The routers, by their field under ``spec.trafficRouting``, and what every router shares: which
router a spec selects, the answer for a router the CRD offers but this version lacks, and the
one-owner key (one route rule, one managing object) read from the operator's watch.

A new router is one file in this package defining ``ROUTER`` (a
:class:`~model_rollouts.traffic.router.RouterType`), its spec model under ``TrafficRouting``, and
one RBAC rule in the chart (``charts/model-rollouts/templates/_helpers.tpl``): the registry finds
the file by itself.
"""

from __future__ import annotations

import importlib
import pkgutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from model_rollouts import traffic
from model_rollouts.api.common import TrafficRouting
from model_rollouts.traffic.router import RouterError, RouterType, TrafficRouter

_NOT_ROUTERS = ("optin", "registry", "router")


def _discover() -> dict[str, RouterType]:
    found: dict[str, RouterType] = {}
    for m in sorted(pkgutil.iter_modules(traffic.__path__), key=lambda m: m.name):
        if m.name in _NOT_ROUTERS:
            continue
        r = getattr(importlib.import_module(f"{traffic.__name__}.{m.name}"), "ROUTER", None)
        if isinstance(r, RouterType):
            found[r.name] = r
    return found


#: Implemented routers by their field under ``spec.trafficRouting``.
ROUTERS: dict[str, RouterType] = _discover()
#: Every router field the CRD offers, in its order; those not in ROUTERS answer "not implemented".
OFFERED: tuple[str, ...] = tuple(f for f in TrafficRouting.model_fields if f not in ("match", "affinity"))


def selected(routing: TrafficRouting) -> tuple[RouterType, Any]:
    """The router a spec selects and its config; RouterError naming the field if there is none."""
    chosen = [(f, getattr(routing, f)) for f in OFFERED if getattr(routing, f) is not None]
    for f, config in chosen:
        if f in ROUTERS:
            return ROUTERS[f], config
    if chosen:
        raise RouterError(
            f"spec.trafficRouting.{chosen[0][0]}",
            f"this router is not implemented in this version; use {' or '.join(ROUTERS)}",
        )
    raise RouterError("spec.trafficRouting", "set exactly one router")


def make_router(
    api: Any, routing: TrafficRouting, namespace: str, owner: tuple[str, str] | None = None
) -> TrafficRouter:
    """The router of a spec. ``owner`` (kind, name) writes the weights (the route must opt in to
    it); None: read only. Makes no API call: an unknown router is refused before any."""
    router, config = selected(routing)
    return router.make(api, namespace, config, owner)


# -- one route, one owner ---------------------------------------------------------------------------
#: Phases in which an object no longer claims its route (the one-owner check skips it).
FINISHED_PHASES = ("Promoted", "RolledBack", "Aborted", "Concluded", "Idle", "Invalid")


@dataclass(frozen=True)
class RouteClaim:
    """One object's claim on one route rule, as the operator's watch last saw it (a Kopf index value)."""

    created: str
    kind: str
    name: str
    uid: str
    phase: str | None
    deleting: bool


#: (namespace, route target, index) -> the claims on it, read from the operator's indices.
RouteOwners = Callable[[tuple[str, str, int]], list[RouteClaim]]


def route_key(namespace: str, routing: Mapping[str, Any]) -> tuple[tuple[str, str, int], RouterType] | None:
    """The one-owner key of a ``spec.trafficRouting`` as stored (raw), and its router; None if none."""
    for name, router in ROUTERS.items():
        config = routing.get(name)
        if isinstance(config, Mapping):
            target = router.claim(config)
            if target is not None:
                return (namespace, *target), router
    return None


def route_claim(kind: str, body: Mapping[str, Any]) -> dict[tuple[str, str, int], RouteClaim] | None:
    """The index entry of one ModelRollout or ModelExperiment: its route rule and who it is."""
    spec = body.get("spec") or {}
    routing = spec.get("trafficRouting") if isinstance(spec, Mapping) else None
    meta = body.get("metadata") or {}
    found = route_key(str(meta.get("namespace") or ""), routing) if isinstance(routing, Mapping) else None
    if found is None:
        return None
    status = body.get("status") or {}
    claim = RouteClaim(
        created=str(meta.get("creationTimestamp") or ""),
        kind=kind,
        name=str(meta.get("name") or ""),
        uid=str(meta.get("uid") or ""),
        phase=status.get("phase") if isinstance(status, Mapping) else None,
        deleting=bool(meta.get("deletionTimestamp")),
    )
    return {found[0]: claim}


def route_owners(*indices: Mapping[tuple[str, str, int], Iterable[RouteClaim]]) -> RouteOwners:
    """A reader of Kopf's route indices for a handler thread (they are updated on the event loop)."""

    def owners(key: tuple[str, str, int]) -> list[RouteClaim]:
        for attempt in range(5):
            try:
                return [c for index in indices for c in (index.get(key) or ())]
            except RuntimeError:  # changed while read: read again
                if attempt == 4:
                    raise
                time.sleep(0.01)
        return []

    return owners


def check_owner(
    kind: str, namespace: str, meta: Mapping[str, Any], routing: TrafficRouting, owners: RouteOwners
) -> None:
    """One route, one owner: RouterError if another active object manages the same route rule and is
    older (creation time, then kind and name). Reads the operator's watch, never a LIST."""
    found = route_key(namespace, routing.model_dump(mode="json", exclude_none=True))
    if found is None:
        return
    key, router = found
    name = str(meta.get("name") or "")
    mine = (str(meta.get("creationTimestamp") or ""), kind, name)
    for other in owners(key):
        if other.uid == meta.get("uid") or other.deleting or other.phase in FINISHED_PHASES:
            continue
        if (other.created, other.kind, other.name) < mine:
            raise RouterError(
                router.field,
                f"{router.describe(key[1], key[2])} is already managed by {other.kind} "
                f"{namespace}/{other.name}; one route has one owner",
            )
