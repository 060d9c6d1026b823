"""Istio router: weights of the destinations in one named ``http`` route of a VirtualService.

The same guarantees as the Gateway API router (:mod:`model_rollouts.traffic.gateway_api`):

- **Opt-in.** The VirtualService's weights are written only when its ``mlrollouts.io/managed-by``
  annotation names the writing object (``ModelRollout/<name>``, ``ModelExperiment/<name>``, or
  ``*``), checked on the object as read and repeated as a JSON-patch ``test`` in the write itself.
- **Test before set.** The write is one JSON patch that tests the route's name at its index and
  each destination's ``host`` (and ``subset``) at its index before it sets that destination's
  ``weight``: a concurrent reorder or rename makes the API server refuse the whole patch (422)
  instead of weighting the wrong destination.
- **Only weights.** Nothing else of the VirtualService is written: not its other routes, its
  matches, its mirror, its headers, nor the other fields of a destination.
- **Read back.** The weights returned are the ones in the API server's answer to the patch.

Which destination is which Service: a destination with a ``subset`` is named by its subset; one
without is named by its ``host``, in short form (``model-v2``, ``model-v2.<namespace>``,
``model-v2.<namespace>.svc`` and ``model-v2.<namespace>.svc.cluster.local`` are all ``model-v2``).
A destination without ``weight`` carries 100 when it is the route's only destination and 0
otherwise (Istio's reading).

Which route: ``routeName`` names an entry of ``spec.http``; without it the VirtualService must have
exactly one ``http`` route.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from model_rollouts.traffic.gateway_api import OPT_IN, opted_in
from model_rollouts.traffic.router import NotOptedIn, RouterError

GROUP, VERSION, PLURAL = "networking.istio.io", "v1", "virtualservices"
FIELD = "spec.trafficRouting.istio.virtualService"
ROUTE_FIELD = "spec.trafficRouting.istio.routeName"
REQUEST_TIMEOUT = 10


def _pointer(*parts: str | int) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def destination_name(destination: Mapping[str, Any], namespace: str) -> str:
    """The Service name a route destination stands for: its subset, else its host in short form."""
    subset = destination.get("subset")
    if subset:
        return str(subset)
    host = str(destination.get("host") or "")
    for suffix in (f".{namespace}.svc.cluster.local", f".{namespace}.svc", f".{namespace}"):
        if host.endswith(suffix):
            return host[: -len(suffix)]
    return host


def route_weights(route: Mapping[str, Any], namespace: str) -> dict[str, int]:
    """``{destination name: weight}`` of one ``spec.http[]`` entry (names that repeat add up)."""
    dests = route.get("route") or []
    out: dict[str, int] = {}
    for d in dests:
        name = destination_name(d.get("destination") or {}, namespace)
        default = 100 if len(dests) == 1 else 0
        out[name] = out.get(name, 0) + int(d.get("weight", default) or 0)
    return out


class IstioRouter:
    """``owner`` is the (kind, name) of the object writing weights; None: read only (writes refused)."""

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        virtualservice: str,
        route_name: str | None = None,
        owner: tuple[str, str] | None = None,
    ) -> None:
        self._co = client.CustomObjectsApi(api)
        self.namespace = namespace
        self.name = virtualservice
        self.route_name = route_name
        self.owner = owner

    def _vs(self) -> dict[str, Any]:
        try:
            vs = cast(
                dict[str, Any],
                self._co.get_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, self.name, _request_timeout=REQUEST_TIMEOUT
                ),
            )
        except ApiException as e:
            if e.status == 404:
                raise RouterError(FIELD, f"VirtualService {self.namespace}/{self.name} not found") from e
            raise
        return vs

    def _http(self, vs: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        """(index, entry) of the managed ``spec.http`` route."""
        routes = (vs.get("spec") or {}).get("http") or []
        if self.route_name is None:
            if len(routes) != 1:
                raise RouterError(
                    ROUTE_FIELD,
                    f"VirtualService {self.name} has {len(routes)} http route(s); name the one to weight",
                )
            return 0, routes[0]
        for i, r in enumerate(routes):
            if r.get("name") == self.route_name:
                return i, r
        names = ", ".join(str(r.get("name")) for r in routes if r.get("name")) or "none named"
        raise RouterError(
            ROUTE_FIELD,
            f"VirtualService {self.name} has no http route named {self.route_name} (has: {names})",
        )

    def _check_opt_in(self, vs: Mapping[str, Any]) -> None:
        annotations = (vs.get("metadata") or {}).get("annotations") or {}
        if self.owner is None or not opted_in(annotations, *self.owner):
            kind, name = self.owner or ("ModelRollout", "<name>")
            raise NotOptedIn(
                FIELD,
                f"VirtualService {self.namespace}/{self.name} does not opt in to {kind} {name}: its "
                f"annotation {OPT_IN} must list {kind}/{name} (or be *), set by someone who may "
                "edit the VirtualService; its weights are left alone",
            )

    def check(self, services: list[str]) -> None:
        vs = self._vs()
        self._check_opt_in(vs)
        _, route = self._http(vs)
        names = list(route_weights(route, self.namespace))
        missing = [s for s in services if s not in names]
        if missing:
            raise RouterError(
                FIELD,
                f"VirtualService {self.name} route {self.route_name or 0} has no destination for "
                f"service(s) {', '.join(missing)} (has: {', '.join(names)})",
            )

    def get_weights(self) -> dict[str, int]:
        _, route = self._http(self._vs())
        return route_weights(route, self.namespace)

    def _ops(self, index: int, route: Mapping[str, Any], weights: Mapping[str, int]) -> list[dict[str, Any]]:
        """Test-then-set operations for every destination whose weight must change."""
        ops: list[dict[str, Any]] = []
        dests = route.get("route") or []
        for j, d in enumerate(dests):
            dest = d.get("destination") or {}
            name = destination_name(dest, self.namespace)
            current = int(d.get("weight", 100 if len(dests) == 1 else 0) or 0)
            if name not in weights or current == weights[name]:
                continue
            for key in ("host", "subset"):
                if key in dest:
                    ops.append(
                        {
                            "op": "test",
                            "path": _pointer("spec", "http", index, "route", j, "destination", key),
                            "value": dest[key],
                        }
                    )
            ops.append(
                {
                    "op": "add",
                    "path": _pointer("spec", "http", index, "route", j, "weight"),
                    "value": int(weights[name]),
                }
            )
        if ops and "name" in route:
            ops.insert(
                0, {"op": "test", "path": _pointer("spec", "http", index, "name"), "value": route["name"]}
            )
        return ops

    def set_weights(self, weights: dict[str, int]) -> dict[str, int]:
        vs = self._vs()
        self._check_opt_in(vs)
        index, route = self._http(vs)
        # A Service without a destination already gets no traffic: asking for 0 there is satisfied.
        unknown = {k for k, v in weights.items() if v != 0} - set(route_weights(route, self.namespace))
        if unknown:
            raise RouterError(
                FIELD, f"VirtualService {self.name} has no destination for {', '.join(sorted(unknown))}"
            )
        ops = self._ops(index, route, weights)
        if ops:
            # The opt-in as read must still be there when the write lands (else 422, nothing written).
            value = vs["metadata"]["annotations"][OPT_IN]
            ops.insert(0, {"op": "test", "path": _pointer("metadata", "annotations", OPT_IN), "value": value})
            vs = cast(
                dict[str, Any],
                self._co.patch_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    self.namespace,
                    PLURAL,
                    self.name,
                    ops,
                    _content_type="application/json-patch+json",
                    _request_timeout=REQUEST_TIMEOUT,
                ),
            )
            index, route = self._http(vs)
        return route_weights(route, self.namespace)  # what the API server stored, or already had
