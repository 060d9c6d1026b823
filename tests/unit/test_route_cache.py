"""The HTTPRoute cache a router reads instead of GETting the route (traffic/watched.py)."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from model_rollouts.traffic import watched
from model_rollouts.traffic.gateway_api import GatewayAPIRouter
from model_rollouts.traffic.router import Arm
from model_rollouts.traffic.watched import OPT_IN, RouteCache, trim
from tests.unit.test_route_opt_in import FakeRoutes


def route(rv: str, weights: dict[str, int], name: str = "r", **annotations: str) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {
            "name": name,
            "namespace": "ml",
            "resourceVersion": rv,
            "annotations": {OPT_IN: "*", "team": "x" * 1000, **annotations},
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
        },
        "spec": {
            "parentRefs": [{"name": "gw"}],
            "hostnames": ["a.example"],
            "rules": [
                {
                    "matches": [{"path": {"value": "/"}}],
                    "backendRefs": [{"name": k, "port": 80, "weight": v} for k, v in weights.items()],
                }
            ],
        },
    }


def test_nothing_is_served_until_the_watch_runs() -> None:
    c = RouteCache()
    c.seen(None, route("1", {"v1": 100}))
    c.store(route("2", {"v1": 100}))  # a router's own write, outside the operator
    assert c.get("ml", "r") is None
    c.enabled = True
    assert c.get("ml", "r") is None
    c.seen(None, route("1", {"v1": 100}))
    got = c.get("ml", "r")
    assert got is not None
    assert got["spec"]["rules"][0]["backendRefs"] == [{"name": "v1", "port": 80, "weight": 100}]


def test_only_what_a_router_reads_is_kept() -> None:
    t = trim(route("7", {"v1": 90, "v2": 10}))
    assert t["metadata"] == {
        "name": "r",
        "namespace": "ml",
        "resourceVersion": "7",
        "annotations": {OPT_IN: "*"},
    }
    assert t["spec"] == {
        "rules": [
            {
                "backendRefs": [
                    {"name": "v1", "port": 80, "weight": 90},
                    {"name": "v2", "port": 80, "weight": 10},
                ]
            }
        ]
    }
    assert OPT_IN not in trim({"metadata": {"name": "r"}})["metadata"]["annotations"]


def test_an_older_copy_never_replaces_a_newer_one() -> None:
    c = RouteCache()
    c.enabled = True
    c.store(route("20", {"v1": 80, "v2": 20}))  # our own PATCH's answer
    c.seen("MODIFIED", route("19", {"v1": 100, "v2": 0}))  # the watch's event before it, late
    assert c.get("ml", "r")["spec"]["rules"][0]["backendRefs"][1]["weight"] == 20  # type: ignore[index]
    c.seen("MODIFIED", route("21", {"v1": 60, "v2": 40}))
    assert c.get("ml", "r")["spec"]["rules"][0]["backendRefs"][1]["weight"] == 40  # type: ignore[index]


def test_a_deleted_route_is_gone_and_a_copy_cannot_be_changed_through_get() -> None:
    c = RouteCache()
    c.enabled = True
    c.seen("ADDED", route("3", {"v1": 100}))
    got = c.get("ml", "r")
    assert got is not None
    got["spec"]["rules"][0]["backendRefs"][0]["weight"] = 0
    assert c.get("ml", "r")["spec"]["rules"][0]["backendRefs"][0]["weight"] == 100  # type: ignore[index]
    c.seen("DELETED", route("4", {"v1": 100}))
    assert c.get("ml", "r") is None
    c.seen("ADDED", route("5", {"v1": 50}))  # created again
    assert c.get("ml", "r") is not None


# -- the Gateway API router reading the cache ---------------------------------------------------------
class Server(FakeRoutes):
    """One HTTPRoute on a fake API server that counts GETs and answers a failed test op with 422."""

    def __init__(self) -> None:
        super().__init__({OPT_IN: "*"})
        self.route["metadata"]["resourceVersion"] = "10"
        self.gets = 0

    def get_namespaced_custom_object(self, *args: Any, **kw: Any) -> dict[str, Any]:
        self.gets += 1
        return super().get_namespaced_custom_object(*args, **kw)

    def patch_namespaced_custom_object(self, *args: Any, **kw: Any) -> dict[str, Any]:
        try:
            new = super().patch_namespaced_custom_object(*args, **kw)
        except AssertionError:
            raise ApiException(status=422, reason="test failed") from None
        rv = str(int(self.route["metadata"]["resourceVersion"]) + 1)
        self.route["metadata"]["resourceVersion"] = new["metadata"]["resourceVersion"] = rv
        return new


@pytest.fixture()
def cache(monkeypatch: pytest.MonkeyPatch) -> RouteCache:
    c = RouteCache()
    c.enabled = True
    monkeypatch.setattr(watched, "ROUTES", c)
    return c


def _router(server: Server) -> GatewayAPIRouter:
    r = GatewayAPIRouter(None, "ml", "fraud", owner=("ModelRollout", "r"))  # type: ignore[arg-type]
    r._co = server  # type: ignore[assignment]
    return r


ARMS = (Arm("stable", "v1"), Arm("candidate", "v2"))


def test_a_router_reads_the_watched_route_and_requests_nothing_when_it_carries_the_weights(
    cache: RouteCache,
) -> None:
    server = Server()
    cache.seen(None, server.route)
    r = _router(server)
    state = r.read()
    r.admit(state, list(ARMS))
    assert r.write(state, {ARMS[0]: 100, ARMS[1]: 0}) is state
    assert (server.gets, server.patches) == (0, [])


def test_after_its_own_write_the_router_reads_what_the_api_server_stored(cache: RouteCache) -> None:
    server = Server()
    cache.seen(None, server.route)
    r = _router(server)
    moved = r.write(r.read(), {ARMS[0]: 80, ARMS[1]: 20})
    assert moved.weights == {"v1": 80, "v2": 20} and len(server.patches) == 1
    cache.seen(
        "MODIFIED", {**server.route, "metadata": {**server.route["metadata"], "resourceVersion": "10"}}
    )
    assert r.read().weights == {"v1": 80, "v2": 20}  # the watch's older event does not undo it
    assert server.gets == 0


def test_a_stale_copy_costs_one_fresh_read_not_a_failed_tick(cache: RouteCache) -> None:
    server = Server()
    cache.seen(None, server.route)
    refs = server.route["spec"]["rules"][0]["backendRefs"]
    refs.reverse()  # someone reordered the backendRefs; the watch has not told us yet
    r = _router(server)
    moved = r.write(r.read(), {ARMS[0]: 70, ARMS[1]: 30})
    assert moved.weights == {"v1": 70, "v2": 30}
    assert server.gets == 1 and len(server.patches) == 2  # the refused patch, then the right one
    assert {b["name"]: b["weight"] for b in server.route["spec"]["rules"][0]["backendRefs"]} == {
        "v1": 70,
        "v2": 30,
    }


def test_without_the_watch_the_router_gets_the_route(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watched, "ROUTES", RouteCache())  # not enabled: not the operator
    server = Server()
    r = _router(server)
    assert r.read().weights == {"v1": 100, "v2": 0} and server.gets == 1
