"""Istio router: weights of the destinations in one named ``http`` route of a VirtualService.

The same guarantees as the Gateway API router (:mod:`model_rollouts.traffic.gateway_api`):

- **Opt-in.** The VirtualService's weights are written only when its ``mlrollouts.io/managed-by``
  annotation names the writing object (see :mod:`model_rollouts.traffic.optin`), checked on the
  object as read and tested again in the same patch.
- **Test before set.** The write is one JSON patch that tests the route's name at its index and
  each destination's ``host`` (and ``subset``) at its index before it sets that destination's
  ``weight``: a concurrent reorder or rename makes the API server refuse the whole patch (422)
  instead of weighting the wrong destination.
- **Only weights.** Nothing else of the VirtualService is written: not its other routes, its
  matches, its mirror, its headers, nor the other fields of a destination.
- **Read back.** The state returned is the one in the API server's answer to the patch.
- **One owner per route**: the registry's key is (VirtualService, route name).

An arm's backend is a destination: one with a ``subset`` is named by its subset; one without by
its ``host`` in short form (``model-v2``, ``model-v2.<namespace>``, ``model-v2.<namespace>.svc`` and
``model-v2.<namespace>.svc.cluster.local`` are all ``model-v2``). A destination without ``weight``
carries 100 when it is the route's only destination and 0 otherwise (Istio's reading).

Which route: ``routeName`` names an entry of ``spec.http``; without it the VirtualService must have
exactly one ``http`` route.

A shadow step's mirror is the route's ``mirror`` (a copy of the candidate's destination) with
``mirrorPercentage`` (:func:`mirror_ops`). The operator owns the route's ``mirror`` when it names the
candidate arm it weights; it writes one only where the route has no ``mirror`` (a test of the whole route as
read) or has its own (a test of that ``mirror``), and removes both fields at the end. A route that
mirrors to anything else is refused (``mirror`` is one destination per route).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from model_rollouts.traffic import optin
from model_rollouts.traffic.router import (
    RETIRED,
    Arm,
    Capabilities,
    Mirror,
    RouterError,
    RouterType,
    RouteState,
    mirror_owned,
)

GROUP, VERSION, PLURAL = "networking.istio.io", "v1", "virtualservices"
NAME = "istio"
FIELD = f"spec.trafficRouting.{NAME}.virtualService"
ROUTE_FIELD = f"spec.trafficRouting.{NAME}.routeName"
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


def _weight(d: Mapping[str, Any], alone: bool) -> int:
    return int(d.get("weight", 100 if alone else 0) or 0)


def route_weights(route: Mapping[str, Any], namespace: str) -> dict[str, int]:
    """``{destination name: weight}`` of one ``spec.http[]`` entry (names that repeat add up)."""
    dests = route.get("route") or []
    out: dict[str, int] = {}
    for d in dests:
        name = destination_name(d.get("destination") or {}, namespace)
        out[name] = out.get(name, 0) + _weight(d, len(dests) == 1)
    return out


class IstioRouter:
    """``owner`` is the (kind, name) of the object writing weights; None: read only (writes refused)."""

    field: str = FIELD
    #: Any number of destinations; integer weights (we write percents).
    capabilities: ClassVar[Capabilities] = Capabilities(
        max_arms=None, granularity=1, mirroring=True, header_match=False
    )

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

    @property
    def what(self) -> str:
        return f"VirtualService {self.namespace}/{self.name}"

    # -- the interface (one read, at most one write per tick) ---------------------------------------
    def read(self) -> RouteState:
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
        return self._state(vs)

    def admit(self, state: RouteState, arms: list[Arm]) -> None:
        optin.require(state.raw, self.owner, self.what, FIELD)
        missing = [a.backend for a in arms if a.role != RETIRED and a.backend not in state.weights]
        if missing:
            raise RouterError(
                FIELD,
                f"VirtualService {self.name} route {self.route_name or 0} has no destination for "
                f"service(s) {', '.join(missing)} (has: {', '.join(state.weights)})",
            )

    def write(
        self, state: RouteState, weights: Mapping[Arm, int], mirror: Mirror | None = None
    ) -> RouteState:
        value = optin.require(state.raw, self.owner, self.what, FIELD)
        self.capabilities.fit(FIELD, weights)
        self.capabilities.fit_mirror(FIELD, mirror)
        want = {a.backend: int(w) for a, w in weights.items()}
        # A Service without a destination already gets no traffic: asking for 0 there is satisfied.
        unknown = {k for k, v in want.items() if v != 0} - set(state.weights)
        if unknown:
            raise RouterError(
                FIELD, f"VirtualService {self.name} has no destination for {', '.join(sorted(unknown))}"
            )
        index, route = self._http(state.raw)
        ops = mirror_ops(route, index, weights, mirror, self.namespace) + self._ops(index, route, want)
        if not ops:
            return state  # already so: no request
        # The opt-in as read must still be there when the write lands (else 422, nothing written).
        vs = self._co.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            self.name,
            [optin.unchanged_op(value), *ops],
            _content_type="application/json-patch+json",
            _request_timeout=REQUEST_TIMEOUT,
        )
        return self._state(cast(dict[str, Any], vs))  # what the API server stored

    # -- one-shot helpers (a read, then a check or a write) -----------------------------------------
    def get_weights(self) -> dict[str, int]:
        return self.read().weights

    def set_weights(self, weights: dict[str, int]) -> dict[str, int]:
        return self.write(self.read(), {Arm(s, s): w for s, w in weights.items()}).weights

    def check(self, services: list[str]) -> None:
        self.admit(self.read(), [Arm(s, s) for s in services])

    # -- the VirtualService -------------------------------------------------------------------------
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

    def _state(self, vs: dict[str, Any]) -> RouteState:
        _, route = self._http(vs)
        return RouteState(
            weights=route_weights(route, self.namespace), raw=vs, mirrors=route_mirrors(route, self.namespace)
        )

    def _ops(self, index: int, route: Mapping[str, Any], want: Mapping[str, int]) -> list[dict[str, Any]]:
        """Test-then-set operations for every destination whose weight must change."""
        ops: list[dict[str, Any]] = []
        dests = route.get("route") or []
        for j, d in enumerate(dests):
            dest = d.get("destination") or {}
            name = destination_name(dest, self.namespace)
            if name not in want or _weight(d, len(dests) == 1) == want[name]:
                continue
            at = ("spec", "http", index, "route", j)
            for key in ("host", "subset"):
                if key in dest:
                    ops.append({"op": "test", "path": _pointer(*at, "destination", key), "value": dest[key]})
            ops.append({"op": "add", "path": _pointer(*at, "weight"), "value": int(want[name])})
        if ops and "name" in route:
            ops.insert(
                0, {"op": "test", "path": _pointer("spec", "http", index, "name"), "value": route["name"]}
            )
        return ops


# -- the shadow step's mirror (the route's mirror and mirrorPercentage) ------------------------------
def route_mirrors(route: Mapping[str, Any], namespace: str) -> dict[str, int]:
    """Destination name -> percent of the route's ``mirror`` (the one the operator may own; the newer
    ``mirrors`` list is the user's and never read or written)."""
    if not isinstance(route.get("mirror"), Mapping):
        return {}
    pct = (route.get("mirrorPercentage") or {}).get("value", 100)
    return {destination_name(route["mirror"], namespace): round(float(pct))}


def mirror_ops(
    route: Mapping[str, Any], index: int, weights: Mapping[Arm, int], mirror: Mirror | None, namespace: str
) -> list[dict[str, Any]]:
    """JSON-patch operations that make the route's operator-owned ``mirror`` be ``mirror`` (or none)."""
    owned = mirror_owned(weights, mirror)
    cur = route.get("mirror") if isinstance(route.get("mirror"), Mapping) else None
    name = destination_name(cur, namespace) if cur is not None else None
    pct = round(float((route.get("mirrorPercentage") or {}).get("value", 100))) if cur is not None else None
    at = ("spec", "http", index)
    if mirror is None:
        if name is None or name not in owned:
            return []
        ops = [{"op": "test", "path": _pointer(*at, "mirror"), "value": cur}]
        ops.append({"op": "remove", "path": _pointer(*at, "mirror")})
        if "mirrorPercentage" in route:
            ops.append({"op": "remove", "path": _pointer(*at, "mirrorPercentage")})
        return ops
    if name is not None and name not in owned:
        raise RouterError(
            FIELD, f"the route already mirrors to {name}, not the operator's: it cannot also mirror to "
            f"{mirror.arm.backend}",
        )  # fmt: skip
    if (name, pct) == (mirror.arm.backend, int(mirror.percent)):
        return []
    dest = next(
        (
            d.get("destination") or {}
            for d in route.get("route") or []
            if destination_name(d.get("destination") or {}, namespace) == mirror.arm.backend
        ),
        None,
    )
    if dest is None:
        raise RouterError(FIELD, f"the route has no destination for {mirror.arm.backend} to mirror to")
    test = (
        {"op": "test", "path": _pointer(*at, "mirror"), "value": cur}
        if cur is not None
        else {"op": "test", "path": _pointer(*at), "value": route}
    )
    return [
        test,
        {"op": "add", "path": _pointer(*at, "mirror"), "value": dict(dest)},
        {"op": "add", "path": _pointer(*at, "mirrorPercentage"), "value": {"value": float(mirror.percent)}},
    ]


def claim(config: Mapping[str, Any]) -> tuple[str, int] | None:
    """The route this config manages, from the spec as stored (raw): ("<virtualService>[/<routeName>]", 0)."""
    vs = config.get("virtualService")
    if not isinstance(vs, str) or not vs:
        return None
    route = config.get("routeName")
    return (f"{vs}/{route}" if isinstance(route, str) and route else vs), 0


def make(api: client.ApiClient, namespace: str, config: Any, owner: tuple[str, str] | None) -> IstioRouter:
    return IstioRouter(api, namespace, config.virtualService, config.routeName, owner=owner)


def _describe(target: str, index: int) -> str:
    vs, _, route = target.partition("/")
    return f"VirtualService {vs}" + (f" route {route}" if route else "")


#: This router's entry in the registry (found there by this name: see traffic/registry.py).
ROUTER = RouterType(NAME, IstioRouter.capabilities, make, claim, _describe, FIELD)
