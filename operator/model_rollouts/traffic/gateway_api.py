"""Gateway API router: weights of backendRefs in one rule of an HTTPRoute.

The patch is a JSON patch that first *tests* each backendRef's name at its index and then sets
only its ``weight``: nothing the user owns in Git is rewritten, and a concurrent reorder of the
backendRefs makes the patch fail (422) instead of weighting the wrong backend.

**Opt-in.** A route's weights are written only when the route names the writing object in its
``mlrollouts.io/managed-by`` annotation (``ModelRollout/<name>``, ``ModelExperiment/<name>``,
comma-separated, or ``*`` for any ModelRollout or ModelExperiment in the route's namespace). Only
someone who may edit the route can set it, so a tenant who may create a ModelRollout but not edit
a route cannot re-weight that route through the operator. RBAC cannot grant ``patch`` by label or
annotation, so this check, made on the route as read and repeated as a JSON-patch ``test`` of the
annotation's value in the same write, is what enforces it.
"""

from __future__ import annotations

from typing import Any, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from model_rollouts.traffic.router import NotOptedIn, RouterError

GROUP, VERSION, PLURAL = "gateway.networking.k8s.io", "v1", "httproutes"
FIELD = "spec.trafficRouting.gatewayAPI.httpRoute"
REQUEST_TIMEOUT = 10
#: The annotation by which a route opts in to having its weights set by named objects.
OPT_IN = "mlrollouts.io/managed-by"
_ANY = "*"
_KINDS = {"modelrollout": "ModelRollout", "modelexperiment": "ModelExperiment"}


def opted_in(annotations: dict[str, str] | None, kind: str, name: str) -> bool:
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


class GatewayAPIRouter:
    """``owner`` is the (kind, name) of the object writing weights; None: read only (writes refused)."""

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

    def _route(self) -> dict[str, Any]:
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
        return route

    def _refs(self, route: dict[str, Any]) -> list[dict[str, Any]]:
        rules = route.get("spec", {}).get("rules") or []
        if self.rule_index >= len(rules):
            raise RouterError(
                "spec.trafficRouting.gatewayAPI.ruleIndex",
                f"HTTPRoute {self.name} has {len(rules)} rule(s); index {self.rule_index} is missing",
            )
        refs: list[dict[str, Any]] = rules[self.rule_index].get("backendRefs") or []
        return refs

    def _check_opt_in(self, route: dict[str, Any]) -> None:
        annotations = (route.get("metadata") or {}).get("annotations") or {}
        if self.owner is None or not opted_in(annotations, *self.owner):
            kind, name = self.owner or ("ModelRollout", "<name>")
            raise NotOptedIn(
                FIELD,
                f"HTTPRoute {self.namespace}/{self.name} does not opt in to {kind} {name}: its "
                f"annotation {OPT_IN} must list {kind}/{name} (or be *), set by someone who may "
                "edit the route; its weights are left alone",
            )

    def check(self, services: list[str]) -> None:
        route = self._route()
        self._check_opt_in(route)
        names = [r.get("name") for r in self._refs(route)]
        missing = [s for s in services if s not in names]
        if missing:
            raise RouterError(
                FIELD,
                f"HTTPRoute {self.name} rule {self.rule_index} has no backendRef for "
                f"service(s) {', '.join(missing)} (has: {', '.join(map(str, names))})",
            )

    def get_weights(self) -> dict[str, int]:
        return self._weights(self._route())

    def _weights(self, route: dict[str, Any]) -> dict[str, int]:
        # A backendRef without weight gets 1 per the Gateway API spec.
        return {str(r.get("name")): int(r.get("weight", 1)) for r in self._refs(route)}

    def set_weights(self, weights: dict[str, int]) -> dict[str, int]:
        route = self._route()
        self._check_opt_in(route)
        refs = self._refs(route)
        ops: list[dict[str, Any]] = []
        base = f"/spec/rules/{self.rule_index}/backendRefs"
        for i, ref in enumerate(refs):
            name = ref.get("name")
            if name in weights and ref.get("weight") != weights[name]:
                ops.append({"op": "test", "path": f"{base}/{i}/name", "value": name})
                ops.append({"op": "add", "path": f"{base}/{i}/weight", "value": int(weights[name])})
        # A Service without a backendRef already gets no traffic: asking for 0 there is satisfied.
        unknown = {k for k, v in weights.items() if v != 0} - {r.get("name") for r in refs}
        if unknown:
            raise RouterError(
                FIELD, f"HTTPRoute {self.name} has no backendRef for {', '.join(sorted(unknown))}"
            )
        if ops:
            # The opt-in as read must still be there when the write lands (else 422, nothing written).
            pointer = "/metadata/annotations/" + OPT_IN.replace("~", "~0").replace("/", "~1")
            value = route["metadata"]["annotations"][OPT_IN]
            ops.insert(0, {"op": "test", "path": pointer, "value": value})
            route = cast(
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
        return self._weights(route)  # what the API server stored (the PATCH response), or already had
