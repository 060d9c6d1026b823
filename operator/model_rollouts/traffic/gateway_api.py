"""Gateway API router: weights of backendRefs in one rule of an HTTPRoute; an arm's backend is the
backendRef's (Service's) name.

The patch is a JSON patch that first *tests* each backendRef's name at its index and then sets
only its ``weight``: nothing the user owns in Git is rewritten, and a concurrent reorder of the
backendRefs makes the patch fail (422) instead of weighting the wrong backend. The route's opt-in
(``mlrollouts.io/managed-by``, see :mod:`model_rollouts.traffic.optin`) is checked on the route as
read and tested again in the same patch.

A shadow step's mirror is a ``RequestMirror`` filter (with ``percent``) on the same rule, to the
candidate's backendRef (:func:`mirror_ops`): the operator owns a RequestMirror filter of that rule whose
backendRef names the candidate arm it weights, and writes the rule's ``filters`` list only with a test
of the list as read (or of the whole rule, when it has no ``filters``); other filters are kept as
they are, and a list the operator's filter alone made is removed with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from model_rollouts.traffic import optin, watched
from model_rollouts.traffic.optin import OPT_IN, opted_in
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

__all__ = ["FIELD", "OPT_IN", "ROUTER", "GatewayAPIRouter", "opted_in"]

GROUP, VERSION, PLURAL = "gateway.networking.k8s.io", "v1", "httproutes"
NAME = "gatewayAPI"
FIELD = f"spec.trafficRouting.{NAME}.httpRoute"
REQUEST_TIMEOUT = 10


class GatewayAPIRouter:
    """``owner`` is the (kind, name) of the object writing weights; None: read only (writes refused)."""

    field: str = FIELD
    #: An HTTPRoute rule holds at most 16 backendRefs; weights are integers (we write percents).
    capabilities: ClassVar[Capabilities] = Capabilities(
        max_arms=16, granularity=1, mirroring=True, header_match=False
    )

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        httproute: str,
        rule_index: int = 0,
        owner: tuple[str, str] | None = None,
    ) -> None:
        self._co = client.CustomObjectsApi(api)
        self.namespace = namespace
        self.name = httproute
        self.rule_index = rule_index
        self.owner = owner

    @property
    def what(self) -> str:
        return f"HTTPRoute {self.namespace}/{self.name}"

    # -- the interface (one read, at most one write per tick) ---------------------------------------
    def read(self) -> RouteState:
        """The route from the operator's watch (traffic/watched.py) when it has it, else one GET."""
        cached = watched.ROUTES.get(self.namespace, self.name)
        if cached is not None:
            return self._state(cached)
        return self._fetch()

    def _fetch(self) -> RouteState:
        try:
            route = cast(
                dict[str, Any],
                self._co.get_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, self.name, _request_timeout=REQUEST_TIMEOUT
                ),
            )
        except ApiException as e:
            if e.status == 404:
                raise RouterError(FIELD, f"HTTPRoute {self.namespace}/{self.name} not found") from e
            raise
        return self._state(route)

    def admit(self, state: RouteState, arms: list[Arm]) -> None:
        optin.require(state.raw, self.owner, self.what, FIELD)
        names = list(state.weights)
        missing = [a.backend for a in arms if a.role != RETIRED and a.backend not in state.weights]
        if missing:
            raise RouterError(
                FIELD,
                f"HTTPRoute {self.name} rule {self.rule_index} has no backendRef for "
                f"service(s) {', '.join(missing)} (has: {', '.join(map(str, names))})",
            )

    def write(
        self, state: RouteState, weights: Mapping[Arm, int], mirror: Mirror | None = None
    ) -> RouteState:
        return self._write(state, weights, retry=True, mirror=mirror)

    def _write(
        self, state: RouteState, weights: Mapping[Arm, int], retry: bool, mirror: Mirror | None = None
    ) -> RouteState:
        if mirror is not None and not _whole(state.raw) and "filters" not in self._refs_rule(state.raw):
            # The first filter of a rule is written after a test of the whole rule, which the watch's
            # trimmed copy (traffic/watched.py) does not hold: once per shadow step, a fresh read.
            state = self._fetch()
        value = optin.require(state.raw, self.owner, self.what, FIELD)
        self.capabilities.fit(FIELD, weights)
        self.capabilities.fit_mirror(FIELD, mirror)
        want = {a.backend: int(w) for a, w in weights.items()}
        # A Service without a backendRef already gets no traffic: asking for 0 there is satisfied.
        unknown = {k for k, v in want.items() if v != 0} - set(state.weights)
        if unknown:
            raise RouterError(
                FIELD, f"HTTPRoute {self.name} has no backendRef for {', '.join(sorted(unknown))}"
            )
        ops: list[dict[str, Any]] = []
        base = f"/spec/rules/{self.rule_index}/backendRefs"
        for i, ref in enumerate(self._refs(state.raw)):
            name = ref.get("name")
            if name in want and ref.get("weight") != want[name]:
                ops.append({"op": "test", "path": f"{base}/{i}/name", "value": name})
                ops.append({"op": "add", "path": f"{base}/{i}/weight", "value": want[name]})
        ops = mirror_ops(self._refs_rule(state.raw), f"/spec/rules/{self.rule_index}", weights, mirror) + ops
        if not ops:
            return state  # already so: no request
        # The opt-in as read must still be there when the write lands (else 422, nothing written).
        try:
            route = self._co.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                self.name,
                [optin.unchanged_op(value), *ops],
                _content_type="application/json-patch+json",
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as e:
            if e.status != 422 or not retry:
                raise
            # A test op failed: the route changed since it was read (the watch's copy can be a moment
            # behind). Once more from a fresh read, with the opt-in and every name checked again.
            return self._write(self._fetch(), weights, retry=False, mirror=mirror)
        watched.ROUTES.store(cast(dict[str, Any], route))
        return self._state(cast(dict[str, Any], route))  # what the API server stored

    # -- one-shot helpers (a read, then a check or a write) -----------------------------------------
    def get_weights(self) -> dict[str, int]:
        return self.read().weights

    def set_weights(self, weights: dict[str, int]) -> dict[str, int]:
        return self.write(self.read(), {Arm(s, s): w for s, w in weights.items()}).weights

    def check(self, services: list[str]) -> None:
        self.admit(self.read(), [Arm(s, s) for s in services])

    # -- the HTTPRoute ------------------------------------------------------------------------------
    def _refs(self, route: Mapping[str, Any]) -> list[dict[str, Any]]:
        rules = (route.get("spec") or {}).get("rules") or []
        if self.rule_index >= len(rules):
            raise RouterError(
                f"spec.trafficRouting.{NAME}.ruleIndex",
                f"HTTPRoute {self.name} has {len(rules)} rule(s); index {self.rule_index} is missing",
            )
        refs: list[dict[str, Any]] = rules[self.rule_index].get("backendRefs") or []
        return refs

    def _refs_rule(self, route: Mapping[str, Any]) -> Mapping[str, Any]:
        self._refs(route)  # RouterError naming ruleIndex when the rule is missing
        rule: Mapping[str, Any] = route["spec"]["rules"][self.rule_index]
        return rule

    def _state(self, route: dict[str, Any]) -> RouteState:
        # A backendRef without weight gets 1 per the Gateway API spec.
        weights = {str(r.get("name")): int(r.get("weight", 1)) for r in self._refs(route)}
        return RouteState(weights=weights, raw=route, mirrors=rule_mirrors(self._refs_rule(route)))


# -- the shadow step's mirror (a RequestMirror filter on the managed rule) --------------------------
def _whole(route: Mapping[str, Any]) -> bool:
    """A route as the API server sent it, not the watch's trimmed copy (which has no ``kind``)."""
    return "kind" in route


def _mirror_target(f: Any) -> tuple[str, int] | None:
    """(backendRef name, percent) of a RequestMirror filter; None for any other filter."""
    if not isinstance(f, Mapping) or f.get("type") != "RequestMirror":
        return None
    m = f.get("requestMirror") or {}
    name = str((m.get("backendRef") or {}).get("name") or "")
    if "percent" in m:
        return name, int(m["percent"])
    frac = m.get("fraction")
    if isinstance(frac, Mapping):
        return name, round(100 * int(frac.get("numerator", 0)) / int(frac.get("denominator") or 100))
    return name, 100


def rule_mirrors(rule: Mapping[str, Any]) -> dict[str, int]:
    """Backend -> percent of every RequestMirror filter on a rule."""
    return {t[0]: t[1] for f in rule.get("filters") or [] if (t := _mirror_target(f)) is not None}


def mirror_ops(
    rule: Mapping[str, Any], at: str, weights: Mapping[Arm, int], mirror: Mirror | None
) -> list[dict[str, Any]]:
    """JSON-patch operations that make the rule's operator-owned mirror ``mirror`` (or none).

    Owned: a RequestMirror filter whose backendRef names the candidate arm of ``weights`` (or the
    mirror's; :func:`~model_rollouts.traffic.router.mirror_owned`). The
    new ``filters`` list keeps every other filter as it is, in its place, with ours last; it is
    written after a test of the list as read (of the whole rule when it has none)."""
    owned = mirror_owned(weights, mirror)
    old: list[Any] = list(rule.get("filters") or [])
    keep = [f for f in old if (t := _mirror_target(f)) is None or t[0] not in owned]
    new = list(keep)
    if mirror is not None:
        ref = next((r for r in rule.get("backendRefs") or [] if r.get("name") == mirror.arm.backend), None)
        if ref is None:
            raise RouterError(FIELD, f"the rule has no backendRef for {mirror.arm.backend} to mirror to")
        target = {k: ref[k] for k in ("group", "kind", "name", "namespace", "port") if k in ref}
        new.append(
            {"type": "RequestMirror", "requestMirror": {"backendRef": target, "percent": int(mirror.percent)}}
        )
    ours = [t for f in old if (t := _mirror_target(f)) is not None and t[0] in owned]
    if ours == ([(mirror.arm.backend, int(mirror.percent))] if mirror else []):
        return []  # already so (wherever the filter stands in the list)
    if "filters" not in rule:
        return [
            {"op": "test", "path": at, "value": rule},
            {"op": "add", "path": f"{at}/filters", "value": new},
        ]
    test = {"op": "test", "path": f"{at}/filters", "value": rule["filters"]}
    if not new:  # the operator's filter alone made the list: leave none
        return [test, {"op": "remove", "path": f"{at}/filters"}]
    return [test, {"op": "replace", "path": f"{at}/filters", "value": new}]


def claim(config: Mapping[str, Any]) -> tuple[str, int] | None:
    """The rule this config manages (HTTPRoute name, rule index), from the spec as stored (raw)."""
    route = config.get("httpRoute")
    if not isinstance(route, str) or not route:
        return None
    try:
        return route, int(config.get("ruleIndex") or 0)
    except (TypeError, ValueError):
        return None


def make(
    api: client.ApiClient, namespace: str, config: Any, owner: tuple[str, str] | None
) -> GatewayAPIRouter:
    return GatewayAPIRouter(api, namespace, config.httpRoute, config.ruleIndex, owner=owner)


def _describe(target: str, index: int) -> str:
    return f"HTTPRoute {target} rule {index}"


#: This router's entry in the registry (found there by this name: see traffic/registry.py).
ROUTER = RouterType(NAME, GatewayAPIRouter.capabilities, make, claim, _describe, FIELD)
