"""Writes only on change, and one scheduler and a watch cache: counted at the real API server (its
audit log), not inferred.

- A rollout held at a manual gate is analysed every interval: at most one status write per
  analysis, none between analyses, and no route write at all (its weights already match); between
  (and at) its analyses the operator sends no GET of the object and no LIST (or GET) of
  EndpointSlices: the tick reads the watch's body and each arm's readiness from the EndpointSlice
  watch. Both are judged on one measured window (the ``gate`` fixture).
- A finished (aborted) rollout costs 0 API requests per minute beyond the operator's watches (and
  its leader-election Lease, which does not depend on the objects).
- After an abort, an edit of the route that gives the rolled-back candidate traffic again is undone
  within seconds: the guard runs on the route's watch event (a timer would take up to 30 s).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.harness import objects
from tests.harness.cluster import ControlPlane
from tests.harness.objects import delete_all, event_reasons, phase, weight
from tests.harness.stack import Stack, httproute

V1, V2, ROUTE, EXP_ROUTE = "writes-v1", "writes-v2", "writes", "writes-exp"
P, EXP = "modelrollouts", "modelexperiments"
USER = "system:serviceaccount:model-rollouts:model-rollouts"
WRITES = {"create", "update", "patch", "delete", "deletecollection"}
INTERVAL = 10
WINDOW = 45.0
FINISHED_WINDOW = 75.0


@pytest.fixture(scope="module")
def stack(real_components: None) -> Iterator[Stack]:
    with Stack(
        variants={V1: {"error_rate": 0.0}, V2: {"error_rate": 0.0}},
        route=ROUTE,
        rps=30,
        max_seconds=900,
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


def _rollout(s: Stack, name: str, interval: int = INTERVAL) -> dict[str, Any]:
    assert s.prom is not None
    return objects.rollout(
        name,
        s.prom.url,
        [{"setWeight": 20}, {"pause": {}}],
        stable=V1,
        candidate={"service": V2},
        route=ROUTE,
        compare=False,
        analysis={"interval": f"{interval}s"},
    )


@dataclass(frozen=True)
class GateWindow:
    """What a rollout held at a manual gate cost in WINDOW seconds: its analyses, the operator's requests
    (from the audit log) and the route's weights at the end."""

    start: datetime
    end: datetime
    analyses: list[datetime]
    reqs: list[dict[str, Any]]
    route: dict[str, int]

    @property
    def in_window(self) -> list[datetime]:
        return [a for a in self.analyses if self.start <= a < self.end]

    @property
    def calls(self) -> list[str]:
        return [_call(e) for e in self.reqs]


@pytest.fixture(scope="module")
def gate(stack: Stack) -> Iterator[GateWindow]:
    """One measured window at a gate, for the write-on-change and the no-GET/no-LIST tests alike."""
    s = stack
    s.apply(httproute(ROUTE, s.namespace, {V1: 100, V2: 0}))
    s.apply(_rollout(s, "gated"))
    try:
        s.wait_for(
            P,
            "gated",
            lambda o: phase(o) == "Paused" and weight(o) == 20 and bool(o["status"].get("lastAnalysisTime")),
            90,
        )
        analyses: list[datetime] = []
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                try:
                    t = (s.get(P, "gated").get("status") or {}).get("lastAnalysisTime")
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
        route = s.route_weights()
        window = GateWindow(start, end, list(analyses), _requests(s, start, end), route)
    finally:
        delete_all(s, P, ignore_errors=True)
    yield window


def test_at_a_gate_status_is_written_at_most_once_per_analysis_and_the_route_never(gate: GateWindow) -> None:
    reqs, calls, in_window, analyses = gate.reqs, gate.calls, gate.in_window, gate.analyses
    status_writes = [
        e for e in reqs if e["verb"] in WRITES and (e.get("objectRef") or {}).get("resource") == P
    ]
    route_writes = [c for c in calls if c.split()[0] in WRITES and c.split()[1] == "httproutes"]
    # Analyses did happen in the window (every INTERVAL s) ...
    assert len(in_window) >= WINDOW // INTERVAL - 1, (analyses, calls)
    # ... each wrote status at most once, and nothing else wrote the object ...
    assert len(status_writes) <= len(in_window), (in_window, calls)
    assert all((e.get("objectRef") or {}).get("subresource") == "status" for e in status_writes), calls
    # ... no write came between analyses (each lands within 3 s of one) ...
    for e in status_writes:
        at = _at(e["requestReceivedTimestamp"])
        assert any(0 <= (at - a).total_seconds() <= 3 for a in analyses), (at, analyses)
    # ... and the route, already at 20, was never written.
    assert route_writes == [], calls
    assert gate.route == {V1: 80, V2: 20}


def test_an_active_rollout_costs_no_object_get_and_no_endpointslice_list_per_tick(gate: GateWindow) -> None:
    calls, in_window, analyses = gate.calls, gate.in_window, gate.analyses
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


def test_finished_objects_cost_no_api_request_beyond_the_watches(fresh: Stack) -> None:
    """An aborted rollout and an aborted experiment: no request at all but the watches and the Lease."""
    s = fresh
    assert s.prom is not None
    s.apply(httproute(EXP_ROUTE, s.namespace, {V1: 100, V2: 0}))
    variants = [{"name": "control", "service": V1, "control": True}, {"name": "b", "service": V2}]
    s.apply(objects.experiment("exp-done", s.prom.url, variants, EXP_ROUTE))
    s.apply(_rollout(s, "done"))
    s.wait_for(P, "done", lambda o: phase(o) == "Paused" and weight(o) == 20, 90)
    s.wait_for(EXP, "exp-done", lambda o: phase(o) not in (None, "Pending"), 60)
    s.annotate(P, "done", {"mlrollouts.io/abort": "test"})
    s.annotate(EXP, "exp-done", {"mlrollouts.io/abort": "test"})
    s.wait_for(P, "done", lambda o: phase(o) == "Aborted", 30, poll=0.1)
    s.wait_for(EXP, "exp-done", lambda o: phase(o) == "Aborted", 30, poll=0.1)
    s.wait_route({V2: 0})
    time.sleep(2)  # the aborts' own Events
    # From just after the abort, and longer than Kopf's 60 s re-check of a timer that did not stop
    # at once (which used to end in a status patch of its own, a write without a change).
    start = datetime.now(UTC)
    time.sleep(FINISHED_WINDOW)
    end = datetime.now(UTC)
    reqs = _requests(s, start, end)
    beyond = [
        _call(e)
        for e in reqs
        if e["verb"] != "watch" and (e.get("objectRef") or {}).get("resource") != "leases"
    ]
    assert beyond == [], beyond
    delete_all(s, EXP, ignore_errors=True)


def test_a_route_that_already_carries_the_first_weight_is_never_written(fresh: Stack) -> None:
    """The route is at 80/20 before the rollout exists: reaching its first step (20) writes nothing."""
    s = fresh
    s.apply(httproute(ROUTE, s.namespace, {V1: 80, V2: 20}))
    start = datetime.now(UTC)
    s.apply(_rollout(s, "matched", interval=5))  # the shortest interval: what counts is the analyses
    s.wait_for(
        P,
        "matched",
        lambda o: phase(o) == "Paused" and weight(o) == 20 and bool(o["status"].get("lastAnalysisTime")),
        90,
    )
    time.sleep(2 * 5)  # two more analyses at the gate
    reqs = _requests(s, start, datetime.now(UTC))
    route_writes = [
        _call(e)
        for e in reqs
        if e["verb"] in WRITES and (e.get("objectRef") or {}).get("resource") == "httproutes"
    ]
    assert route_writes == [], route_writes
    assert s.route_weights() == {V1: 80, V2: 20}


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
