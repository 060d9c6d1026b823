"""Gateway API router: weights of backendRefs in one rule of an HTTPRoute.

The patch is a JSON patch that first *tests* each backendRef's name at its index and then sets
only its ``weight``: nothing the user owns in Git is rewritten, and a concurrent reorder of the
backendRefs makes the patch fail (422) instead of weighting the wrong backend.
"""

from __future__ import annotations

from typing import Any, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from model_rollouts.traffic.router import RouterError

GROUP, VERSION, PLURAL = "gateway.networking.k8s.io", "v1", "httproutes"
FIELD = "spec.trafficRouting.gatewayAPI.httpRoute"
REQUEST_TIMEOUT = 10


class GatewayAPIRouter:
    def __init__(self, api: client.ApiClient, namespace: str, httproute: str, rule_index: int = 0) -> None:
        self._co = client.CustomObjectsApi(api)
        self.namespace = namespace
        self.name = httproute
        self.rule_index = rule_index

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

    def check(self, services: list[str]) -> None:
        names = [r.get("name") for r in self._refs(self._route())]
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
