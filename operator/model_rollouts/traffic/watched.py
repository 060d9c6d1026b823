"""HTTPRoutes as the operator's watch last saw them: a router reads these instead of GETting a route.

A Kopf ``on.event`` handler on HTTPRoutes (handlers/routes.py) keeps it; a router stores the API
server's answer to its own PATCH too. Only what a router reads is kept (name, resourceVersion, the
opt-in annotation and each rule's backendRefs and filters), so memory follows the number of routes, not their
size. A copy is never older than one the cache already holds (resourceVersions compared as the
integers the API server hands out; anything else is taken as newer). Off, and empty, unless the
operator watches routes (``enabled``, set at its startup): a router anywhere else GETs as before.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping
from typing import Any

OPT_IN = "mlrollouts.io/managed-by"


def _rv(body: Mapping[str, Any]) -> int | None:
    try:
        return int(str((body.get("metadata") or {}).get("resourceVersion")))
    except ValueError:
        return None


def trim(body: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of an HTTPRoute a router reads."""
    meta = body.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    rules = (body.get("spec") or {}).get("rules") or []
    return {
        "metadata": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "resourceVersion": meta.get("resourceVersion"),
            "annotations": {OPT_IN: annotations[OPT_IN]} if OPT_IN in annotations else {},
        },
        "spec": {
            "rules": [
                {
                    "backendRefs": copy.deepcopy(list(r.get("backendRefs") or [])),
                    # A shadow step's mirror is a filter of the rule (gateway_api.mirror_ops).
                    **({"filters": copy.deepcopy(r["filters"])} if "filters" in r else {}),
                }
                for r in rules
                if isinstance(r, Mapping)
            ]
        },
    }


class RouteCache:
    def __init__(self) -> None:
        self._items: dict[tuple[str, str], dict[str, Any]] = {}
        self._lock = threading.Lock()
        #: True once the operator watches HTTPRoutes (main.py); until then get() finds nothing.
        self.enabled = False

    def seen(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """One watch event (``None`` for the initial listing, as Kopf sends it)."""
        if not self.enabled:
            return
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        with self._lock:
            if event_type == "DELETED":
                self._items.pop(key, None)
                return
        self.store(body)

    def store(self, body: Mapping[str, Any]) -> None:
        """Keep this copy of a route unless the cache holds a newer one (nothing outside the operator)."""
        if not self.enabled:
            return
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        new = trim(body)
        with self._lock:
            old = self._items.get(key)
            old_rv, new_rv = (_rv(old) if old else None), _rv(new)
            if old_rv is not None and new_rv is not None and new_rv < old_rv:
                return
            self._items[key] = new

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A copy of the route as last seen, or None (not watched, not seen yet, or gone)."""
        if not self.enabled:
            return None
        with self._lock:
            item = self._items.get((namespace, name))
            return copy.deepcopy(item) if item is not None else None

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


#: The process-wide cache.
ROUTES = RouteCache()
