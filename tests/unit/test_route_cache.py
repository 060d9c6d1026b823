"""The HTTPRoute cache a router reads instead of GETting the route (traffic/watched.py)."""

from __future__ import annotations

from typing import Any

from model_rollouts.traffic.watched import OPT_IN, RouteCache, trim


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
