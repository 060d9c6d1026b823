"""The one scheduler (handlers/scheduler.py): due-time order, one run per object at a time, wake-ups
from watch events, finished objects woken only by their route, leadership."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from model_rollouts import leader
from model_rollouts.handlers.scheduler import GUARD_INTERVAL, Kind, Scheduler


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeController:
    def __init__(self, answer: float | None) -> None:
        self.answer = answer
        self.woken: list[Mapping[str, Any]] = []
        self.guarded: list[Mapping[str, Any]] = []
        self.ready: Any = None

    def wake(self, seen: Mapping[str, Any], owners: Any = None) -> float | None:
        self.woken.append(seen)
        return self.answer

    def guard(self, obj: Mapping[str, Any]) -> None:
        self.guarded.append(obj)


def body(uid: str, phase: str = "Progressing", rv: int = 1, routing: str = "gatewayAPI") -> dict[str, Any]:
    route = (
        {"gatewayAPI": {"httpRoute": f"route-{uid}"}}
        if routing == "gatewayAPI"
        else {"istio": {"virtualService": f"route-{uid}"}}
    )
    return {
        "metadata": {"name": uid, "namespace": "ml", "uid": uid, "resourceVersion": str(rv)},
        "spec": {"trafficRouting": route},
        "status": {"phase": phase},
    }


@pytest.fixture()
def setup() -> Iterator[tuple[Scheduler, Clock, dict[str, FakeController]]]:
    clock = Clock()
    s = Scheduler(clock=clock)
    controllers: dict[str, FakeController] = {}

    def make(namespace: str, name: str, uid: str) -> FakeController:
        return controllers.setdefault(uid, FakeController(30.0))

    def active(spec: Mapping[str, Any], status: Mapping[str, Any], annotations: Mapping[str, str]) -> bool:
        return status.get("phase") not in ("RolledBack", "Aborted", "Promoted")

    s.register(Kind("modelrollouts", make, active, lambda uid: controllers.pop(uid, None)))
    saved = leader.ELECTOR
    leader.ELECTOR = leader.Elector(None, "", "")  # election off: always the leader
    yield s, clock, controllers
    leader.ELECTOR = saved


def test_objects_are_woken_in_due_time_order_and_only_when_due(setup: Any) -> None:
    s, clock, controllers = setup
    for uid in ("a", "b", "c"):
        s.seen("modelrollouts", "ADDED", body(uid))
    assert s.due() == [("modelrollouts", u) for u in ("a", "b", "c")]  # new objects: at once
    for key, answer in (
        (("modelrollouts", "a"), 30.0),
        (("modelrollouts", "b"), 5.0),
        (("modelrollouts", "c"), 12.0),
    ):
        controllers[key[1]] = controllers.get(key[1]) or FakeController(answer)
        controllers[key[1]].answer = answer
        s.run_one(key)
    assert s.due() == []  # nothing is due before its time
    clock.t += 12.0
    assert s.due() == [("modelrollouts", "b"), ("modelrollouts", "c")]  # earliest first
    assert s.next_at() == 1030.0  # a, 30 s after its run
    clock.t += 18.0
    assert s.due() == [("modelrollouts", "a")]


def test_an_event_wakes_an_object_before_its_due_time_and_an_earlier_due_time_wins(setup: Any) -> None:
    s, _clock, controllers = setup
    s.seen("modelrollouts", "ADDED", body("a"))
    (key,) = s.due()
    s.run_one(key)
    assert s.pending() == {key: 1030.0}
    s.seen("modelrollouts", "MODIFIED", body("a", rv=2))  # an annotation, a spec edit: at once
    assert s.pending() == {key: 1000.0}
    s.wake(key, 10.0)  # a later wake-up does not postpone an earlier one
    assert s.pending() == {key: 1000.0}
    assert s.due() == [key]
    s.run_one(key)
    assert controllers["a"].woken[-1]["metadata"]["resourceVersion"] == "2"  # the watch's latest body


def test_an_older_body_never_replaces_a_newer_one(setup: Any) -> None:
    s, _, controllers = setup
    s.seen("modelrollouts", "ADDED", body("a", rv=7))
    s.seen("modelrollouts", "MODIFIED", body("a", rv=6))
    s.run_one(s.due()[0])
    assert controllers["a"].woken[-1]["metadata"]["resourceVersion"] == "7"


def test_an_object_is_never_run_twice_at_once_and_an_event_during_a_run_runs_it_again(setup: Any) -> None:
    s, _, _ = setup
    s.seen("modelrollouts", "ADDED", body("a"))
    (key,) = s.due()  # now running
    s.seen("modelrollouts", "MODIFIED", body("a", rv=2))
    assert s.due() == []  # not a second run while the first one runs
    s.run_one(key)  # ends: the event during it wakes it again at once
    assert s.due() == [key]


def test_a_finished_object_costs_nothing_until_its_route_changes(setup: Any) -> None:
    s, clock, controllers = setup
    s.seen("modelrollouts", "ADDED", body("done", phase="Aborted"))
    s.seen("modelrollouts", "ADDED", body("promoted", phase="Promoted"))
    for key in s.due():
        s.run_one(key)
    assert len(controllers["done"].guarded) == 1 and controllers["done"].woken == []
    assert controllers["promoted"].guarded == [] and controllers["promoted"].woken == []
    clock.t += 3600
    assert s.due() == []  # no timer at all
    s.route_event("ml", "route-other")
    assert s.due() == []
    s.route_event("ml", "route-done")  # its HTTPRoute changed: the guard looks again
    (key,) = s.due()
    s.run_one(key)
    assert len(controllers["done"].guarded) == 2


def test_a_finished_object_on_a_route_no_watch_keeps_is_guarded_slowly(setup: Any) -> None:
    s, clock, _controllers = setup
    s.seen("modelrollouts", "ADDED", body("vs", phase="RolledBack", routing="istio"))
    s.run_one(s.due()[0])
    assert s.pending() == {("modelrollouts", "vs"): clock.t + GUARD_INTERVAL}


def test_a_deleted_or_relabelled_object_is_dropped(setup: Any) -> None:
    s, _, _controllers = setup
    s.seen("modelrollouts", "ADDED", body("a"))
    s.seen("modelrollouts", "DELETED", body("a"))
    assert s.due() == [] and s.pending() == {}
    s.wake(("modelrollouts", "a"))  # a late measurement's end: nothing to wake
    assert s.pending() == {}


def test_a_standby_wakes_nothing_and_a_new_leader_wakes_every_object() -> None:
    controllers: dict[str, FakeController] = {}
    s = Scheduler(workers=2)
    s.register(
        Kind(
            "modelrollouts",
            lambda ns, name, uid: controllers.setdefault(uid, FakeController(None)),
            lambda spec, status, annotations: True,
            lambda uid: None,
        )
    )

    class Lease:
        leading = False

        def is_leader(self) -> bool:
            return self.leading

    saved, lease = leader.ELECTOR, Lease()
    leader.ELECTOR = lease  # type: ignore[assignment]
    try:
        s.start()
        for uid in ("a", "b"):
            s.seen("modelrollouts", "ADDED", body(uid))
        time.sleep(1.2)
        assert controllers == {}  # a standby keeps the bodies but wakes nothing
        lease.leading = True
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(controllers) < 2:
            time.sleep(0.05)
        assert sorted(controllers) == ["a", "b"]
        assert all(len(c.woken) >= 1 for c in controllers.values())
    finally:
        s.stop()
        leader.ELECTOR = saved


def test_a_slow_wake_up_does_not_delay_another_object() -> None:
    """Workers run wake-ups side by side: one object's slow tick (a gate's webhook up to its
    timeout) does not hold another object's."""
    release = threading.Event()
    woken: dict[str, float] = {}

    class Slow(FakeController):
        def wake(self, seen: Mapping[str, Any], owners: Any = None) -> float | None:
            if seen["metadata"]["uid"] == "slow":
                release.wait(10)
            woken[seen["metadata"]["uid"]] = time.monotonic()
            return None

    s = Scheduler(workers=2)
    s.register(Kind("modelrollouts", lambda ns, n, uid: Slow(None), lambda *a: True, lambda uid: None))
    saved = leader.ELECTOR
    leader.ELECTOR = leader.Elector(None, "", "")
    try:
        s.start()
        t0 = time.monotonic()
        s.seen("modelrollouts", "ADDED", body("slow"))
        s.seen("modelrollouts", "ADDED", body("fast"))
        deadline = time.monotonic() + 5
        while "fast" not in woken and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "fast" in woken and woken["fast"] - t0 < 2.0 and "slow" not in woken
    finally:
        release.set()
        s.stop()
        leader.ELECTOR = saved


def test_readiness_from_the_endpointslice_watch_without_a_request(monkeypatch: pytest.MonkeyPatch) -> None:
    from model_rollouts.kube import readiness

    def no_request() -> Any:
        raise AssertionError("readiness must come from the watch")

    monkeypatch.setattr(readiness, "api", no_request)
    cache = readiness.SliceCache()
    cache.enabled = True
    monkeypatch.setattr(readiness, "SLICES", cache)

    def sl(name: str, service: str, *ready: bool | None) -> dict[str, Any]:
        eps = [{"conditions": {} if r is None else {"ready": r}} for r in ready]
        labels = {readiness.SERVICE_LABEL: service}
        return {"metadata": {"name": name, "namespace": "ml", "labels": labels}, "endpoints": eps}

    assert readiness.service_ready("ml", "v2") is None  # no slice seen: unknown
    cache.seen(None, sl("v2-a", "v2", False))
    assert readiness.service_ready("ml", "v2") is False  # slices, none ready
    cache.seen("ADDED", sl("v2-b", "v2", False, None))  # no ready condition counts as ready
    assert readiness.service_ready("ml", "v2") is True
    cache.seen("MODIFIED", sl("v2-b", "v2", False))
    assert readiness.service_ready("ml", "v2") is False
    cache.seen("MODIFIED", sl("v2-a", "v2", True))
    assert readiness.service_ready("ml", "v2") is True
    assert readiness.service_ready("other", "v2") is None  # per namespace
    cache.seen("DELETED", sl("v2-a", "v2"))
    cache.seen("DELETED", sl("v2-b", "v2"))
    assert readiness.service_ready("ml", "v2") is None


def test_a_new_object_or_an_annotation_runs_before_the_analyses_already_queued(setup: Any) -> None:
    """Issue 18: one more rollout's first weight (or an abort) does not wait behind a thousand due
    analyses queued for the workers; a status echo of the operator's own write is not urgent."""
    s, clock, controllers = setup
    for uid in ("a", "b", "c"):
        s.seen("modelrollouts", "ADDED", body(uid))
    controllers["c"] = FakeController(60.0)
    for key in s.due():
        s.run_one(key)  # running objects now: a and b next due in 30 s, c in 60 s
    clock.t += 30
    busy = [body(u, rv=2) for u in ("a", "b")]
    for b in busy:
        s.seen("modelrollouts", "MODIFIED", b)  # status-only changes (the operator's own writes)
    queued = s.due()
    assert sorted(queued) == [("modelrollouts", "a"), ("modelrollouts", "b")]
    aborted = body("c", rv=3)
    aborted["metadata"]["annotations"] = {"mlrollouts.io/abort": "true"}
    s.seen("modelrollouts", "MODIFIED", aborted)
    s.seen("modelrollouts", "ADDED", body("new"))
    for key in [*queued, *s.due()]:
        s._submit(key)
    order = [s._queue.get_nowait()[2] for _ in range(4)]
    assert order[:2] == [("modelrollouts", "c"), ("modelrollouts", "new")]
    assert sorted(order[2:]) == [("modelrollouts", "a"), ("modelrollouts", "b")]
