"""The route opt-in, shared by every router: a route's weights are written only for objects it names.

A route (an HTTPRoute, a VirtualService, an InferenceService...) opts in by its
``mlrollouts.io/managed-by`` annotation: ``ModelRollout/<name>``, ``ModelExperiment/<name>``,
comma-separated, or ``*`` for any ModelRollout or ModelExperiment in the route's namespace. Only
someone who may edit the route can set it, so a tenant who may create a ModelRollout but not edit a
route cannot re-weight that route through the operator. RBAC cannot grant ``patch`` by label or
annotation, so this check, made on the route as read and repeated in the same write (a JSON-patch
``test`` of the annotation's value), is what enforces it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from model_rollouts.traffic.router import NotOptedIn

#: The annotation by which a route opts in to having its weights set by named objects.
OPT_IN = "mlrollouts.io/managed-by"
_ANY = "*"
_KINDS = {"modelrollout": "ModelRollout", "modelexperiment": "ModelExperiment"}


def opted_in(annotations: Mapping[str, str] | None, kind: str, name: str) -> bool:
    """Whether a route with these annotations lets ``kind``/``name`` (in its namespace) set weights.

    The value is a comma-separated list of ``Kind/name`` entries (kind case-insensitive) or ``*``.
    Anything else (a missing annotation, an empty or malformed value) is no.
    """
    value = (annotations or {}).get(OPT_IN)
    if not value:
        return False
    for entry in value.split(","):
        entry = entry.strip()
        if entry == _ANY:
            return True
        k, sep, n = entry.partition("/")
        if sep and _KINDS.get(k.strip().lower()) == kind and n.strip() == name:
            return True
    return False


def require(obj: Mapping[str, Any], owner: tuple[str, str] | None, what: str, field: str) -> str:
    """The opt-in value of ``obj`` (a route as read) if it admits ``owner`` (kind, name); else
    NotOptedIn naming ``field``. ``owner`` None (a read-only router) is never admitted."""
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    if owner is None or not opted_in(annotations, *owner):
        kind, name = owner or ("ModelRollout", "<name>")
        raise NotOptedIn(
            field,
            f"{what} does not opt in to {kind} {name}: its annotation {OPT_IN} must list "
            f"{kind}/{name} (or be *), set by someone who may edit the route; its weights are left alone",
        )
    return str(annotations[OPT_IN])


def unchanged_op(value: str) -> dict[str, Any]:
    """The JSON-patch op that fails a write (422, nothing written) if the opt-in changed since read."""
    pointer = "/metadata/annotations/" + OPT_IN.replace("~", "~0").replace("/", "~1")
    return {"op": "test", "path": pointer, "value": value}
