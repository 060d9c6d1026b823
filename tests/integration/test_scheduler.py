"""One scheduler and a watch cache, counted at the real API server (its audit log), not inferred.

- A rollout held at a manual gate is analysed every interval, and between (and at) its analyses the
  operator sends no GET of the object and no LIST (or GET) of EndpointSlices: the tick reads the
  watch's body and each arm's readiness from the EndpointSlice watch.
- After an abort, an edit of the route that gives the rolled-back candidate traffic again is undone
  within seconds: the guard runs on the route's watch event (a timer would take up to 30 s).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.harness import objects
from tests.harness.cluster import ControlPlane
from tests.harness.objects import delete_all, event_reasons, phase, weight
from tests.harness.stack import Stack, httproute

V1, V2, ROUTE = "sched-v1", "sched-v2", "sched"
P = "modelrollouts"
USER = "system:serviceaccount:model-rollouts:model-rollouts"
INTERVAL = 10
WINDOW = 45.0


@pytest.fixture(scope="module")
def stack(real_components: None) -> Iterator[Stack]:
    with Stack(
        variants={V1: {"error_rate": 0.0}, V2: {"error_rate": 0.0}},
        route=ROUTE,
        rps=30,
        max_seconds=600,
        cluster=ControlPlane(
            audit=True, audit_rules=[{"level": "Metadata", "users": [USER]}, {"level": "None"}]
        ),
    ) as s:
        s.start_operator()
        yield s


@pytest.fixture()
def fresh(stack: Stack) -> Iterator[Stack]:
    stack.apply(httproute(ROUTE, stack.namespace, {V1: 100, V2: 0}))
    yield stack
    delete_all(stack, P, ignore_errors=True)


def _at(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _requests(s: Stack, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """The operator's requests received in [start, end); a watch counts when its response starts."""
    time.sleep(2)  # the audit backend logs a request after its response
    out = []
    for e in s.cluster.audit_events():
        if (e.get("user") or {}).get("username") != USER:
            continue
        if e.get("stage") != ("ResponseStarted" if e.get("verb") == "watch" else "ResponseComplete"):
            continue
        if start <= _at(e["requestReceivedTimestamp"]) < end:
            out.append(e)
    return out


def _call(e: dict[str, Any]) -> str:
    ref = e.get("objectRef") or {}
    sub = f"/{ref['subresource']}" if ref.get("subresource") else ""
    return f"{e['verb']} {ref.get('resource')}{sub} {ref.get('name') or ''}".strip()


def _rollout(s: Stack, name: str) -> dict[str, Any]:
    assert s.prom is not None
    return objects.rollout(
        name,
        s.prom.url,
        [{"setWeight": 20}, {"pause": {}}],
        stable=V1,
        candidate={"service": V2},
        route=ROUTE,
        compare=False,
        analysis={"interval": f"{INTERVAL}s"},
    )


def test_an_active_rollout_costs_no_object_get_and_no_endpointslice_list_per_tick(fresh: Stack) -> None:
    s = fresh
    s.apply(_rollout(s, "sched"))
    s.wait_for(
        P,
        "sched",
        lambda o: phase(o) == "Paused" and weight(o) == 20 and bool(o["status"].get("lastAnalysisTime")),
        90,
    )
    analyses: list[datetime] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                t = (s.get(P, "sched").get("status") or {}).get("lastAnalysisTime")
            except Exception:
                t = None
            if t and (not analyses or analyses[-1] != _at(t)):
                analyses.append(_at(t))
            time.sleep(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    time.sleep(1)
    start = datetime.now(UTC)
    time.sleep(WINDOW)
    end = datetime.now(UTC)
    stop.set()
    poller.join(5)
    calls = [_call(e) for e in _requests(s, start, end)]
    in_window = [a for a in analyses if start <= a < end]
    # The rollout was analysed all along (each analysis reads the candidate's readiness) ...
    assert len(in_window) >= WINDOW // INTERVAL - 1, (analyses, calls)
    # ... without one GET of itself, nor any read of EndpointSlices but the watch ...
    object_gets = [c for c in calls if c.split()[:2] == ["get", P]]
    slice_reads = [c for c in calls if "endpointslices" in c and not c.startswith("watch")]
    assert object_gets == [], calls
    assert slice_reads == [], calls
    # ... and nothing else per tick but its status writes (at most one per analysis), the analysis'
    # archive (kube/series_store.py: at most one ConfigMap patch per analysis, never a read), Events
    # and the Lease (and the inline address's allowlist check: one LIST of ClusterMetricProviders per
    # 10 s for the whole process, metrics/resolve.py, not per object).
    other = [
        c
        for c in calls
        if c.split()[0] != "watch"
        and c.split()[1] not in ("leases", "events", f"{P}/status")
        and c != "list clustermetricproviders"
        and not c.startswith(("patch configmaps ", "create configmaps "))
    ]
    assert other == [], calls
    assert len([c for c in calls if c.split()[1] == f"{P}/status"]) <= len(in_window), calls
    archive = [c for c in calls if c.split()[1] == "configmaps"]
    assert len(archive) <= len(in_window), calls


def test_a_rolled_back_candidate_given_traffic_by_a_route_edit_is_set_back_at_once(fresh: Stack) -> None:
    s = fresh
    s.apply(_rollout(s, "guarded"))
    s.wait_for(P, "guarded", lambda o: phase(o) == "Paused" and weight(o) == 20, 90)
    s.annotate(P, "guarded", {"mlrollouts.io/abort": "test"})
    s.wait_for(P, "guarded", lambda o: phase(o) == "Aborted", 30, poll=0.1)
    s.wait_route({V1: 100, V2: 0})
    time.sleep(3)
    s.apply(httproute(ROUTE, s.namespace, {V1: 50, V2: 50}))  # someone gives the candidate traffic
    t0 = time.monotonic()
    s.wait_route({V1: 100, V2: 0}, timeout=15)  # a 30 s guard timer: up to 30 s
    took = time.monotonic() - t0
    assert took < 15, took
    deadline = time.monotonic() + 10
    while "RouteRestored" not in event_reasons(s, "guarded") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "RouteRestored" in event_reasons(s, "guarded")
