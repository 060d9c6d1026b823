"""One scheduler for every object of this instance: no Kopf timer per object.

The watch feeds it (``seen``, from the ``on.event`` handlers in handlers/shards.py): it keeps each
ModelRollout's and ModelExperiment's latest body and wakes the object at once on every event. A
wake-up runs in a small pool of worker threads (never two at once for one object) and answers when the
object next wants one: its due time comes from its status (the engine's ``next_due``: one interval
after the last analysis, a backoff), so one heap ordered by due time is the only clock. A wake-up that
starts a measurement returns at once (the measurement runs in its tenant's pool, metrics/pools.py) and
the measurement's end wakes the object again, so a slow provider of one tenant holds no worker.

What an object costs between events:

- active (``engine.*.active``): one wake-up when due; the tick reads the body the watch delivered, never
  a GET (after its own status write a tick waits for the watch to bring that write back; only when
  the watch is more than ``STALE_WAIT`` seconds behind is the object read once);
- RolledBack or Aborted: nothing until its route changes (an HTTPRoute event wakes the guard, which
  reads the route from the watch) or the object does; a route no watch keeps (an Istio
  VirtualService) is checked every ``GUARD_INTERVAL`` seconds;
- otherwise finished: nothing at all.

Only the leader acts: a standby keeps the bodies and the heap but wakes nothing, and when it becomes
the leader every object is woken once. An object that leaves this instance (relabelled to another
shard, or deleted) is dropped with its due time.
"""

from __future__ import annotations

import contextlib
import copy
import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import kopf

from model_rollouts import leader
from model_rollouts.handlers import slices  # noqa: F401  (registers the EndpointSlice watch a tick reads)
from model_rollouts.traffic import registry, watched
from model_rollouts.traffic.registry import RouteOwners

logger = logging.getLogger("model_rollouts.scheduler")

#: Seconds between checks that, after RolledBack/Aborted, a route no watch keeps still gives the
#: rolled-back arm nothing (an HTTPRoute's check is driven by its watch events instead).
GUARD_INTERVAL = 30.0
#: Worker threads that run wake-ups (a tick never waits on a provider: measurements run in the
#: tenant's pool; a gate's webhook is bounded by its timeout).
WORKERS = 16
#: Seconds a standby (or a scheduler with nothing due) sleeps between looks at the Lease.
IDLE = 0.5

Key = tuple[str, str]  # (plural, uid)


class Waker(Protocol):
    """What the scheduler needs of a per-object controller (handlers/controller.py)."""

    def wake(self, seen: Mapping[str, Any], owners: RouteOwners | None = None) -> float | None: ...

    def guard(self, obj: Mapping[str, Any]) -> None: ...


@dataclass(frozen=True)
class Kind:
    """One resource kind the scheduler wakes."""

    plural: str
    #: The object's controller: (namespace, name, uid) -> Waker; it is told ``ready`` when a
    #: measurement it started has ended.
    controller: Callable[[str, str, str], Any]
    #: Whether the object needs ticks (``engine.*.active`` of spec, status, annotations).
    active: Callable[[Mapping[str, Any], Mapping[str, Any], Mapping[str, str]], bool]
    #: Forget the controller of a uid (the object left this instance).
    forget: Callable[[str], object]


def guarded(body: Mapping[str, Any]) -> bool:
    """After RolledBack/Aborted a guard keeps the rolled-back arm at 0."""
    return (body.get("status") or {}).get("phase") in ("RolledBack", "Aborted")


def route_of(body: Mapping[str, Any]) -> tuple[tuple[str, str], bool] | None:
    """((namespace, route name), whether a watch keeps that route) of an object's trafficRouting."""
    spec = body.get("spec") or {}
    routing = spec.get("trafficRouting") if isinstance(spec, Mapping) else None
    namespace = str((body.get("metadata") or {}).get("namespace") or "")
    found = registry.route_key(namespace, routing) if isinstance(routing, Mapping) else None
    if found is None or not isinstance(routing, Mapping):
        return None
    return (namespace, found[0][1]), isinstance(routing.get("gatewayAPI"), Mapping)


class Scheduler:
    def __init__(self, workers: int = WORKERS, clock: Callable[[], float] = time.time) -> None:
        self._kinds: dict[str, Kind] = {}
        self._bodies: dict[Key, dict[str, Any]] = {}
        self._heap: list[tuple[float, int, Key]] = []
        self._due: dict[Key, float] = {}  # each object's one current due time (older heap entries are stale)
        self._running: set[Key] = set()
        #: Woken by a new object, a spec change, an annotation or a deletion: run before the wake-ups
        #: that are merely due (a user's apply or abort never waits behind a thousand analyses).
        self._urgent: set[Key] = set()
        self._queue: queue.PriorityQueue[tuple[int, int, Key | None]] = queue.PriorityQueue()
        self._threads: list[threading.Thread] = []
        self._again: set[Key] = set()  # woken while running: run once more when the current run ends
        self._routes: dict[tuple[str, str], set[Key]] = {}  # route -> objects whose guard it wakes
        self._route_of: dict[Key, tuple[str, str]] = {}
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._workers = workers
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._leading = False
        self.clock = clock
        #: Who claims which route, read from Kopf's indices (captured from the first event's kwargs).
        self.owners: RouteOwners | None = None

    # -- registration and the watch ----------------------------------------------------------------
    def register(self, kind: Kind) -> None:
        self._kinds[kind.plural] = kind

    def seen(self, plural: str, event_type: str | None, body: Mapping[str, Any]) -> None:
        """One watch event of an object: keep its latest body and wake it (DELETED: drop it)."""
        meta = body.get("metadata") or {}
        key = (plural, str(meta.get("uid") or ""))
        if not key[1] or plural not in self._kinds:
            return
        if event_type == "DELETED":
            self.drop(key)
            return
        copied = copy.deepcopy(dict(body))
        route = route_of(copied)
        with self._cond:
            old = self._bodies.get(key)
            old_rv, new_rv = (_rv(old) if old is not None else None), _rv(copied)
            if old_rv is not None and new_rv is not None and new_rv < old_rv:
                return  # never older than what is kept
            self._bodies[key] = copied
            self._index_route(key, route[0] if route else None)
            if old is None or _asked(old) != _asked(copied):
                self._urgent.add(key)  # someone asked for something: ahead of the analyses due
        self.wake(key)

    def route_event(self, namespace: str, name: str) -> None:
        """An HTTPRoute changed: wake the guard of every finished object on it."""
        with self._cond:
            keys = list(self._routes.get((namespace, name), ()))
        for key in keys:
            self.wake(key)

    def drop(self, key: Key) -> None:
        with self._cond:
            self._bodies.pop(key, None)
            self._due.pop(key, None)
            self._again.discard(key)
            self._urgent.discard(key)
            self._index_route(key, None)
        kind = self._kinds.get(key[0])
        if kind is not None:
            kind.forget(key[1])

    def _index_route(self, key: Key, route: tuple[str, str] | None) -> None:
        old = self._route_of.pop(key, None)
        if old is not None:
            keys = self._routes.get(old)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._routes[old]
        if route is not None:
            self._route_of[key] = route
            self._routes.setdefault(route, set()).add(key)

    # -- the clock ---------------------------------------------------------------------------------
    def wake(self, key: Key, delay: float = 0.0) -> None:
        """Wake ``key`` in ``delay`` seconds, or earlier if it is already due earlier."""
        at = self.clock() + max(0.0, delay)
        with self._cond:
            if key not in self._bodies:
                return
            if key in self._running and delay <= 0:
                self._again.add(key)
                return
            current = self._due.get(key)
            if current is not None and current <= at:
                return
            self._due[key] = at
            heapq.heappush(self._heap, (at, next(self._seq), key))
            self._cond.notify()

    def due(self, now: float | None = None) -> list[Key]:
        """Pop every object due by ``now`` (earliest first) that is not running; marks them running."""
        now = self.clock() if now is None else now
        out: list[Key] = []
        with self._cond:
            while self._heap and self._heap[0][0] <= now:
                at, _, key = heapq.heappop(self._heap)
                if self._due.get(key) != at:
                    continue  # superseded by an earlier wake-up, or dropped
                del self._due[key]
                if key in self._running:
                    self._again.add(key)
                    continue
                self._running.add(key)
                out.append(key)
        return out

    def next_at(self) -> float | None:
        with self._cond:
            return self._heap[0][0] if self._heap else None

    def pending(self) -> dict[Key, float]:
        """Each object's due time (for tests and debugging)."""
        with self._cond:
            return dict(self._due)

    # -- running -----------------------------------------------------------------------------------
    def run_one(self, key: Key) -> None:
        """One wake-up of one object (a worker thread); then its next due time, if it wants one."""
        delay: float | None = None
        with self._cond:
            self._urgent.discard(key)  # served (also when a test or a caller runs it directly)
        try:
            delay = self._run(key)
        except Exception as e:  # the controller logs its own; never let a worker die
            logger.error("%s %s: wake-up failed: %s", key[0], key[1], type(e).__name__)
            delay = 5.0
        finally:
            with self._cond:
                self._running.discard(key)
                again = key in self._again
                self._again.discard(key)
            if again:
                self.wake(key)
            elif delay is not None:
                self.wake(key, delay)

    def _run(self, key: Key) -> float | None:
        with self._cond:
            body = self._bodies.get(key)
        kind = self._kinds.get(key[0])
        if body is None or kind is None or not leader.ELECTOR.is_leader():
            return None
        meta = body.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            return None  # Kopf's deletion handler has it
        ctl = kind.controller(str(meta.get("namespace") or "default"), str(meta.get("name") or ""), key[1])
        ctl.ready = lambda: self.wake(key)
        if kind.active(body.get("spec") or {}, body.get("status") or {}, meta.get("annotations") or {}):
            return ctl.wake(body, self.owners)
        if guarded(body):
            ctl.guard(body)
            route = route_of(body)
            return None if route is not None and route[1] else GUARD_INTERVAL
        return None

    def _work(self) -> None:
        """One worker: the most urgent queued wake-up first, then in the order they fell due."""
        while True:
            _, _, key = self._queue.get()
            if key is None:
                return
            self.run_one(key)

    def _submit(self, key: Key) -> None:
        with self._cond:
            urgent = key in self._urgent
            self._urgent.discard(key)
        self._queue.put((0 if urgent else 1, next(self._seq), key))

    def _loop(self) -> None:
        while not self._stop.is_set():
            leading = leader.ELECTOR.is_leader()
            if leading and not self._leading:
                self.wake_all()  # a new leader looks at every object once
            self._leading = leading
            if not leading:
                self._stop.wait(IDLE)
                continue
            for key in self.due():
                self._submit(key)
            with self._cond:
                at = self._heap[0][0] if self._heap else None
                wait = IDLE if at is None else min(IDLE, max(0.0, at - self.clock()))
                if wait > 0:
                    self._cond.wait(wait)

    def wake_all(self) -> None:
        with self._cond:
            keys = list(self._bodies)
        for key in keys:
            self.wake(key)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._queue = queue.PriorityQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"wake-{i}", daemon=True) for i in range(self._workers)
        ]
        for t in self._threads:
            t.start()
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        # Queued wake-ups are dropped (the next leader, or this one when it starts again, wakes every
        # object once); each worker ends after its current run.
        while not self._queue.empty():
            with contextlib.suppress(queue.Empty):
                self._queue.get_nowait()
        for _ in self._threads:
            self._queue.put((-1, -1, None))
        self._threads = []
        self._leading = False


def _asked(body: Mapping[str, Any]) -> tuple[Any, ...]:
    """What a user (or a tool) asks of an object: its spec's generation, annotations, deletion."""
    meta = body.get("metadata") or {}
    return (meta.get("generation"), meta.get("annotations"), meta.get("deletionTimestamp"))


def _rv(body: Mapping[str, Any]) -> int | None:
    try:
        return int(str((body.get("metadata") or {}).get("resourceVersion")))
    except ValueError:
        return None


#: The process-wide scheduler.
SCHEDULER = Scheduler()


def capture_owners(kwargs: Mapping[str, Any]) -> None:
    """Kopf hands its indices to every handler; they are live views, so one capture serves for good."""
    if SCHEDULER.owners is None and "rollout_routes" in kwargs and "experiment_routes" in kwargs:
        SCHEDULER.owners = registry.route_owners(kwargs["rollout_routes"], kwargs["experiment_routes"])


@kopf.on.startup()
def start_scheduler(**_: Any) -> None:
    SCHEDULER.start()


@kopf.on.cleanup()
def stop_scheduler(**_: Any) -> None:
    SCHEDULER.stop()


@kopf.on.event("gateway.networking.k8s.io", "v1", "httproutes")
def route_changed(type: str | None, body: kopf.Body, **_: Any) -> None:
    """A finished object's guard runs when its route changes, reading the route from the watch."""
    watched.ROUTES.seen(type, body)  # before the guard reads it (whichever route handler Kopf runs first)
    meta = body.get("metadata") or {}
    SCHEDULER.route_event(str(meta.get("namespace") or ""), str(meta.get("name") or ""))
