"""The per-object loop shared by the resource handlers: pacing from status, then one tick:
validate, measure, read the route once, decide, write the route at most once, write status.

The engine is the one source of weights: the route gets exactly what the engine's ``route_weights``
says for the status it decided (retired Services at 0 where the route still has them), checked and
written against the one read of the tick, and verified from the write's response.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from typing import Any, Generic, TypeVar, cast

import kopf
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from model_rollouts import leader, telemetry
from model_rollouts.api.common import (
    GROUP,
    VERSION,
    ResourceSpec,
    ResourceStatus,
    dump,
    set_condition,
)
from model_rollouts.api.errors import SpecError, validation_message
from model_rollouts.api.provider import inline_query_fields, namespaced_template_fields
from model_rollouts.engine.actions import LIMIT_REASONS, Event
from model_rollouts.engine.status import bound_texts
from model_rollouts.engine.status import invalid as invalid_status
from model_rollouts.kube.client import api, get_object, now
from model_rollouts.kube.events import post_event
from model_rollouts.kube.status import write_status
from model_rollouts.metrics import pools
from model_rollouts.metrics.provider import MetricProvider, Result
from model_rollouts.metrics.resolve import check_queries, make_provider
from model_rollouts.notify import Notice
from model_rollouts.notify import events as notify_events
from model_rollouts.notify import sender as notify_sender
from model_rollouts.traffic import registry, rules
from model_rollouts.traffic.registry import RouteOwners
from model_rollouts.traffic.router import Arm, Mirror, NotOptedIn, TrafficRouter


class Measuring(Exception):
    """The due analysis is being measured in its tenant's pool; a later wake-up picks up the result."""


T = TypeVar("T")

SpecT = TypeVar("SpecT", bound=ResourceSpec)
StatusT = TypeVar("StatusT", bound=ResourceStatus)

#: Seconds between re-checks of an object whose spec is invalid (an edit re-checks at once).
INVALID_RECHECK = 15.0
#: Longest backoff between attempts to apply a decision that failed.
MAX_BACKOFF = 300.0
#: Seconds a wake-up waits for the watch to bring back the object's own status write before it reads
#: the object once instead.
STALE_WAIT = 5.0
#: Fewest seconds between two ticks of one object that is due all the time (a rollout waiting to start).
MIN_GAP = 0.4


def backoff(errors: int) -> float:
    return min(MAX_BACKOFF, 2.0 ** max(0, errors - 1))


def safe_error(e: BaseException) -> str:
    """A fixed, sanitised description of an exception: never a response body or a header."""
    if isinstance(e, ApiException):
        return f"Kubernetes API answered HTTP {e.status} {str(e.reason or '')[:60]}".strip()
    if isinstance(e, SpecError):  # RouterError or ProviderError: a fixed text naming the field
        return str(e)[:300]
    return type(e).__name__


class Controller(Generic[SpecT, StatusT]):
    """Per-object loop shared by the resource handlers; subclasses supply the kind-specific hooks.

    The scheduler (handlers/scheduler.py) calls :func:`wake` with the watch's latest body when the
    object changed or when :func:`wake` last said it would be due. Pacing lives in the object's
    status: a tick is due when the engine's ``next_due`` (one interval after
    ``status.lastAnalysisTime``) has passed, after a failed write's backoff, or when the generation
    or an action annotation changed. Nothing in memory decides when to measure or advance: a
    restart, retry, conflict or second replica never adds an analysis. The only memory here is a
    hint that saves wake-ups between due times.

    A tick: measure (in the tenant's pool; a tick that only starts a measurement touches no route),
    read the route once, check it, ask the engine, write the engine's ``route_weights`` for the
    decided status at most once (none when the route already carries them) and verify them from the
    write's response; then status; then Events. A failed or unverified route write keeps the old
    status, adds ``ReconcileError`` and backs off.
    """

    kind = ""
    plural = ""
    phases: tuple[str, ...] = ()
    terminal: tuple[str, ...] = ()
    annotations: tuple[str, ...] = ()
    spec_model: type[SpecT]
    status_model: type[StatusT]

    def __init__(self, namespace: str, name: str) -> None:
        self.namespace, self.name = namespace, name
        self.logger = logging.getLogger(f"model_rollouts.{self.kind.lower()}")
        self._last_key: tuple[Any, ...] | None = None
        self._not_before = 0.0
        self._invalid_checked = 0.0
        #: The analysis being measured: (what it was asked for, its result to come).
        self._measuring: tuple[Any, Future[Any], dt.datetime] | None = None
        self._asked: Any = None
        self._tick_now = now()
        #: The resourceVersion of the copy this object's last status write was made from (stale now).
        self._stale_rv: str | None = None
        self._due_of: tuple[str, dt.datetime | None] | None = None  # (resourceVersion, due) last computed
        self._spec_of: tuple[Any, SpecT] | None = None  # (generation, parsed spec) last parsed
        self._status_of: tuple[str, StatusT] | None = None  # (resourceVersion, parsed status) last parsed
        self._queries_checked: int | None = None  # the generation whose queries passed check_queries
        self._asked_of: tuple[str, tuple[int, str]] | None = None  # (resourceVersion, _asked) last made
        self._stale_since = 0.0
        #: Called when a measurement this object started has ended (the scheduler wakes it then).
        self.ready: Callable[[], None] = lambda: None

    # -- hooks --------------------------------------------------------------------------------------
    def problem(self, spec: SpecT) -> str | None:
        """A semantic problem the schema cannot express, naming the field; None if there is none."""
        return None

    def queries(self, spec: SpecT) -> list[tuple[str, str | None]]:
        """(field, PromQL template) pairs to check for unknown placeholders."""
        raise NotImplementedError

    def arms(self, spec: SpecT, status: StatusT) -> list[Arm]:
        """The arms the route must be able to weight (retired ones need not be there)."""
        raise NotImplementedError

    def due(self, spec: SpecT, status: StatusT, now: dt.datetime) -> bool:
        """Whether the engine wants an analysis measured now (pacing from status)."""
        raise NotImplementedError

    def observe(self, spec: SpecT, status: StatusT, provider: MetricProvider, now: dt.datetime) -> Any:
        """The observations of the analysis the engine says is due (None if none is): measured in
        the tenant's pool, so this raises Measuring until they are ready (see :meth:`measured`)."""
        raise NotImplementedError

    def decide(
        self,
        spec: SpecT,
        status: StatusT,
        observations: Any,
        now: dt.datetime,
        generation: int,
        annotations: dict[str, str],
    ) -> tuple[StatusT, list[object]]:
        """Ask the engine (and, for a rollout, the gates it asks about)."""
        raise NotImplementedError

    def weights(self, spec: SpecT, status: StatusT) -> tuple[dict[Arm, int], dict[str, int]] | None:
        """(the engine's weight per arm for this status, the same per variant label for telemetry)
        that the route must carry, or None."""
        raise NotImplementedError

    def arm_weights(self, spec: SpecT, status: StatusT, per_service: Mapping[str, int]) -> dict[Arm, int]:
        """The engine's weights per Service as weights per arm (Services of no arm: retired)."""
        raise NotImplementedError

    def mirror(self, spec: SpecT, status: StatusT) -> Mirror | None:
        """The operator's mirror the route must carry for this status (a rollout's shadow step); None:
        none (an operator-owned mirror on the route is removed by the same write)."""
        return None

    def next_due(self, spec: SpecT, status: StatusT) -> dt.datetime | None:
        """When the engine next wants a tick (from status); None: not until the object changes."""
        raise NotImplementedError

    def guard_weights(self, spec: SpecT, status: StatusT) -> dict[str, int] | None:
        """After RolledBack/Aborted: weights a slow guard re-asserts if the route drifts."""
        return None

    def deletion_weights(self, spec: SpecT, status: StatusT) -> dict[str, int] | None:
        """What the route gets when the object is deleted; None leaves it alone."""
        return None

    @staticmethod
    def active(spec: Mapping[str, Any], status: Mapping[str, Any], annotations: Mapping[str, str]) -> bool:
        """The object needs ticks (finished objects do not: the scheduler wakes only their guard)."""
        raise NotImplementedError

    # -- pacing -------------------------------------------------------------------------------------
    def _spec(self, obj: Mapping[str, Any]) -> SpecT:
        """The parsed spec, remembered for its generation (a spec change raises it): the ticks of an
        analysis and the look at its due time parse it once. ValidationError as the model raises it."""
        generation = obj["metadata"].get("generation")
        cached = self._spec_of
        if generation is not None and cached is not None and cached[0] == generation:
            return cached[1]
        spec = self.spec_model.model_validate(obj["spec"])
        self._spec_of = (generation, spec) if generation is not None else None
        return spec

    def _asked_for(self, obj: Mapping[str, Any], generation: int, status: StatusT) -> tuple[int, str]:
        """What a measurement is asked for: the generation and the status, as text. Remembered per
        resourceVersion: the wake-up that picks a measurement up reads the copy that started it."""
        rv = str(obj["metadata"].get("resourceVersion") or "")
        cached = self._asked_of
        if rv and cached is not None and cached[0] == rv and cached[1][0] == generation:
            return cached[1]
        asked = (generation, json.dumps(dump(status), sort_keys=True))
        self._asked_of = (rv, asked) if rv else None
        return asked

    def _status(self, obj: Mapping[str, Any]) -> StatusT:
        """The parsed status, remembered for the copy's resourceVersion: the wake-up that picks up a
        measurement reads the same copy as the one that started it. Read-only (the engine decides on
        a deep copy)."""
        rv = str(obj["metadata"].get("resourceVersion") or "")
        cached = self._status_of
        if rv and cached is not None and cached[0] == rv:
            return cached[1]
        status = self.status_model.model_validate(
            {k: v for k, v in (obj.get("status") or {}).items() if k != "kopf"}
        )
        self._status_of = (rv, status) if rv else None
        return status

    def due_at(self, obj: Mapping[str, Any]) -> dt.datetime | None:
        """When this object next needs a tick, read from its status alone (remembered for the
        object's resourceVersion: the wake-up at the due time parses nothing again)."""
        rv = obj["metadata"].get("resourceVersion")
        cached = self._due_of
        if rv and cached is not None and cached[0] == rv:
            return cached[1]
        due = self._due_at(obj)
        self._due_of = (str(rv), due) if rv else None
        return due

    def _due_at(self, obj: Mapping[str, Any]) -> dt.datetime | None:
        status = self._status(obj)
        if status.phase == "Invalid":
            return None  # re-checked on edits and every INVALID_RECHECK seconds
        try:
            spec = self._spec(obj)
        except ValidationError:
            return None
        due = self.next_due(spec, status)
        if status.reconcileErrors and status.lastReconcileErrorTime is not None:
            retry = status.lastReconcileErrorTime + dt.timedelta(seconds=backoff(status.reconcileErrors))
            due = retry if due is None else max(due, retry)
        return due

    def _key(self, obj: Mapping[str, Any]) -> tuple[Any, ...]:
        meta = obj["metadata"]
        return (
            meta.get("generation"),
            tuple((meta.get("annotations") or {}).get(a) for a in self.annotations),
        )

    def _wait(self, obj: Mapping[str, Any]) -> float:
        """Seconds until this object is due for a tick (<= 0: now), from its status alone."""
        if (obj.get("status") or {}).get("phase") == "Invalid":
            return INVALID_RECHECK - (time.monotonic() - self._invalid_checked)
        due = self.due_at(obj)
        return INVALID_RECHECK if due is None else (due - now()).total_seconds()

    def wake(self, seen: Mapping[str, Any], owners: RouteOwners | None = None) -> float | None:
        """One wake-up from the scheduler (handlers/scheduler.py) with the watch's latest body: tick if
        due, and answer in how many seconds the object next wants one (None: not before an event or
        the end of its running measurement wakes it)."""
        if not leader.ELECTOR.is_leader() or seen["metadata"].get("deletionTimestamp"):
            return None
        key = self._key(seen)
        changed = key != self._last_key
        left = self._not_before - time.monotonic()
        if not changed and left > 0:
            return left
        if not changed and self._measuring is not None and not self._measuring[1].done():
            return None  # a query is running in the tenant's pool: its end wakes the object
        try:
            obj = dict(seen)
            if self._stale_rv is not None and seen["metadata"].get("resourceVersion") == self._stale_rv:
                # The watch has not yet brought back this object's own last status write (or what
                # made it conflict): deciding from this copy would decide that analysis again.
                behind = time.monotonic() - self._stale_since
                if behind < STALE_WAIT:
                    return STALE_WAIT - behind  # the watch event wakes it first
                fresh = get_object(self.plural, self.namespace, self.name)  # the watch is far behind
                if fresh is None or fresh["metadata"].get("deletionTimestamp"):
                    return None
                obj, key = fresh, self._key(fresh)
                changed = key != self._last_key
            self._stale_rv = None
            if not changed:
                # Nothing due by the watch's copy: no API read at all (an Invalid object or one
                # between analyses costs nothing at the API server until it is due).
                wait = self._wait(obj)
                if wait > 0:
                    return wait
            self._last_key = key
            self._invalid_checked = time.monotonic()
            self.tick(obj, owners)
            if self._measuring is not None and not self._measuring[1].done():
                return None
            if self._stale_rv is not None:
                return STALE_WAIT  # status written: the watch's next copy wakes it
            return max(MIN_GAP, self._not_before - time.monotonic(), self._wait(obj))
        except Exception as e:
            # Never the exception's text (an API or HTTP error may quote a body or a header): its
            # class and where it was raised.
            self.logger.error(
                "%s/%s: tick failed: %s\n%s",
                self.namespace,
                self.name,
                safe_error(e),
                "".join(traceback.format_tb(e.__traceback__)).rstrip(),
            )
            self._not_before = time.monotonic() + 5.0
            with contextlib.suppress(Exception):
                fresh = get_object(self.plural, self.namespace, self.name)
                if fresh is not None:
                    self.reconcile_error(fresh, self._status(fresh), "ReconcileFailed", safe_error(e))
            return max(5.0, self._not_before - time.monotonic())

    def _written(self, obj: Mapping[str, Any]) -> None:
        """This object's status was written (or its write conflicted) from ``obj``: that copy is stale."""
        self._stale_rv = obj["metadata"].get("resourceVersion")
        self._stale_since = time.monotonic()

    # -- the tick -----------------------------------------------------------------------------------
    def tick(self, obj: dict[str, Any], owners: RouteOwners | None = None) -> None:
        """Validate, measure, decide, apply. An unusable spec gives Valid=False and no traffic change.

        ``owners``: who claims which route, from the operator's watch (see :func:`route_owners`)."""
        t0 = time.monotonic()
        meta = obj["metadata"]
        generation = int(meta.get("generation") or 0)
        annotations = dict(meta.get("annotations") or {})
        status = self._status(obj)
        if status.phase in self.terminal and not self.active(
            obj.get("spec") or {}, obj.get("status") or {}, annotations
        ):
            return  # finished: nothing is re-validated, nothing can move traffic
        now_ = now()
        try:
            spec = self._spec(obj)
        except ValidationError as e:
            return self.write(obj, status, *invalid_status(status, validation_message(e), now_, generation))
        problem = self.problem(spec)
        if problem:
            return self.write(obj, status, *invalid_status(status, problem, now_, generation))
        try:
            if self._queries_checked != generation:  # the queries are the spec's: once per generation
                check_queries(self.queries(spec))
                self._queries_checked = generation
            self.check_providers(spec)
            if status.phase in ("Pending", "Invalid") or status.observedGeneration != generation:
                self.check_owner(obj, spec, owners)
            router = registry.make_router(api(), spec.trafficRouting, self.namespace, (self.kind, self.name))
            rules.check(self.kind, spec.trafficRouting, self.arms(spec, status))  # match.variant
        except SpecError as e:  # a router, provider, template or Secret the object cannot use
            return self.write(obj, status, *invalid_status(status, str(e), now_, generation))
        self._asked = self._asked_for(obj, generation, status)
        pending = self._measuring
        measured = pending is not None and pending[0] == self._asked
        if pending is not None and measured:
            now_ = pending[2]  # decided as of when it was measured: pacing as if measured inline
        self._tick_now = now_
        try:
            if not measured and self.due(spec, status, now_):
                # This tick only starts the measurement (in the tenant's pool): no route read; the
                # wake-up that picks up the result reads, checks and writes the route.
                self.observe(spec, status, self._provider(spec), now_)
            # The one read of the route in this tick: checked, compared and written against.
            state = router.read()
            router.admit(state, self.arms(spec, status))
            observations = self.observe(spec, status, self._provider(spec), now_)
        except SpecError as e:  # a router, provider, template or Secret the object cannot use
            return self.write(obj, status, *invalid_status(status, str(e), now_, generation))
        except Measuring:
            return  # the handler thread never waits on a provider; the next wake-up reads the result
        new, actions = self.decide(spec, status, observations, now_, generation, annotations)
        finished_before = status.phase in self.terminal
        route = None if finished_before and new.phase in self.terminal else self.weights(spec, new)
        if route is not None:
            desired, labels = route
            mirror = self.mirror(spec, new)
            try:
                # No request when the route already carries them (and the operator's own rules).
                carried = router.write(state, desired, mirror, owned=self.owned(spec, new, desired))
            except Exception as e:
                return self.reconcile_error(obj, status, "RouteWriteFailed", safe_error(e))
            wrong = carried.wrong(desired)
            mirrored = carried.mirror_wrong(desired, mirror)
            if mirrored is not None:
                want_m = {mirror.arm.backend: mirror.percent} if mirror else {}
                return self.reconcile_error(
                    obj, status, "RouteNotVerified", f"route mirrors {mirrored} after the write, not {want_m}"
                )
            if wrong:
                want = {a.backend: w for a, w in desired.items()}
                return self.reconcile_error(
                    obj, status, "RouteNotVerified", f"route carries {wrong} after the write, not {want}"
                )
            for label, w in labels.items():
                telemetry.WEIGHT.labels(self.kind, self.namespace, self.name, label).set(w)
        if new.reconcileErrors:
            new.reconcileErrors, new.lastReconcileErrorTime = 0, None
            new.conditions = set_condition(
                new.conditions,
                "ReconcileError",
                "False",
                "Applied",
                "the last decision was applied",
                now_,
                generation,
            )
        self.write(obj, status, new, actions)
        telemetry.ANALYSIS_SECONDS.labels(self.kind).observe(time.monotonic() - t0)

    def check_owner(self, obj: Mapping[str, Any], spec: SpecT, owners: RouteOwners | None) -> None:
        """One route, one owner: another active object managing the same route rule wins if older.

        Read from the operator's watch (the Kopf indices ``rollout_routes`` and ``experiment_routes``),
        never from a LIST: checking costs nothing at the API server however many objects there are.
        """
        if owners is not None:
            registry.check_owner(self.kind, self.namespace, obj["metadata"], spec.trafficRouting, owners)

    def check_providers(self, spec: SpecT) -> None:
        """SpecError naming the field of the first notification provider or gate that does not admit
        this namespace (its allowedNamespaces / namespaceSelector): the object is Valid=False."""
        named = [
            *(
                (f"spec.notifications[{i}].provider", r.provider)
                for i, r in enumerate(getattr(spec, "notifications", None) or [])
            ),
            *(
                (f"spec.gates[{i}].provider", g.provider)
                for i, g in enumerate(getattr(spec, "gates", None) or [])
            ),
        ]
        for field, provider in named:
            why = notify_sender.check(provider, self.namespace)
            if why is not None:
                raise SpecError(field, why)

    def measured(self, provider: MetricProvider, measure: Callable[[], T]) -> T:
        """The result of ``measure`` for the status this tick was asked about, run in the pool of the
        provider's budget key (the tenant's: provider and namespace, see metrics/pools.py); raises
        Measuring until it is ready. A measurement asked for an older status or generation is dropped."""
        pending = self._measuring
        if pending is not None and pending[0] == self._asked:
            if not pending[1].done():
                raise Measuring()
            self._measuring = None
            return cast(T, pending[1].result())  # the measurement's own exception, if any, is raised here
        key = str(getattr(provider, "key", None) or f"namespace@{self.namespace}")
        future = pools.submit(key, measure)
        self._measuring = (self._asked, future, self._tick_now)
        future.add_done_callback(lambda _: self.ready())
        raise Measuring()

    def count_errors(self, results: Iterable[Result]) -> None:
        errors = sum(1 for r in results if r.outcome == "error")
        if errors:
            telemetry.MEASUREMENT_ERRORS.labels(self.kind, self.namespace, self.name).inc(errors)

    def reconcile_error(self, obj: dict[str, Any], status: ResourceStatus, reason: str, message: str) -> None:
        """Hold: keep the old status (so nothing advances), record the failure and back off."""
        s = status.model_copy(deep=True)
        s.reconcileErrors += 1
        s.lastReconcileErrorTime = now()
        wait = backoff(s.reconcileErrors)
        msg = f"attempt {s.reconcileErrors}: {message}; holding, next attempt in {wait:.0f}s or later"
        s.conditions = set_condition(
            s.conditions,
            "ReconcileError",
            "True",
            reason,
            msg,
            s.lastReconcileErrorTime,
            s.observedGeneration,
        )
        telemetry.RECONCILE_ERRORS.labels(self.kind, self.namespace, self.name, reason).inc()
        telemetry.record(self.kind, self.namespace, self.name, dump(s), obj.get("spec") or {})
        self.logger.warning("%s/%s %s: %s", self.namespace, self.name, reason, msg)
        self._not_before = time.monotonic() + wait
        self._written(obj)
        if write_status(self.plural, obj, dump(s)):
            post_event(obj, "Warning", reason, msg)
            errs = notify_events.reconcile_error(self.kind, self.namespace, self.name, s, reason, msg)
            self.notify(obj, errs)

    def write(
        self, obj: dict[str, Any], old: ResourceStatus, status: ResourceStatus, actions: Iterable[object]
    ) -> None:
        """Status (the record; skipped when nothing changed), then Events and metrics."""
        bound_texts(status)
        dumped = dump(status)
        if dumped != dump(old):
            self._written(obj)  # written or conflicting: the watch's next copy is the one to decide from
            if not write_status(self.plural, obj, dumped):
                self._not_before = 0.0  # conflict: decide afresh from the watch's next copy
                return
        for e in actions:
            if not isinstance(e, Event):
                continue
            post_event(obj, e.type, e.reason, e.message)
            telemetry.DECISIONS.labels(self.kind, self.namespace, self.name, e.reason).inc()
            if e.reason in LIMIT_REASONS:
                telemetry.LIMITS.labels(self.kind, self.namespace, self.name, e.reason).inc()
            log = self.logger.warning if e.type == "Warning" else self.logger.info
            log(
                "%s/%s %s: %s",
                self.namespace,
                self.name,
                e.reason,
                e.message,
                extra={
                    "namespace": self.namespace,
                    "object": self.name,
                    "kind": self.kind,
                    "phase": status.phase,
                    "revision": getattr(status, "revision", None),
                    "weight": getattr(status, "weight", None),
                    "decision": e.reason,
                },
            )
        telemetry.set_phase(self.kind, self.namespace, self.name, status.phase, self.phases)
        finished = status.phase in self.terminal
        telemetry.record(self.kind, self.namespace, self.name, dumped, obj.get("spec") or {}, finished)
        self.notify(obj, notify_events.notices(self.kind, self.namespace, self.name, old, status, actions))

    def notify(self, obj: Mapping[str, Any], notices: list[Notice]) -> None:
        """Queue the notifications of a written transition (spec.notifications); never blocks or raises."""
        if not notices:
            return
        refs = notify_events.subscriptions(obj.get("spec"))
        if refs:
            try:
                notify_sender.sender().publish(str(obj["metadata"].get("uid") or self.name), refs, notices)
            except Exception as e:
                self.logger.warning("%s/%s notifications: %s", self.namespace, self.name, safe_error(e))

    def _provider(self, spec: SpecT) -> MetricProvider:
        """The object's provider (ProviderError naming the field when it may not use one)."""
        return make_provider(
            spec.analysis,
            self.namespace,
            inline_query_fields(spec, "spec"),
            namespaced_template_fields(spec, "spec"),
        )

    def owned(
        self, spec: SpecT, status: StatusT, weights: Mapping[Arm, int], active: bool | None = None
    ) -> rules.Owned:
        """The operator's own match and sticky rules for these weights (traffic/rules.py): none once
        the status is terminal (promotion, rollback, abort) or ``active`` is False (deletion)."""
        live = status.phase not in self.terminal if active is None else active
        return rules.desired(self.kind, self.namespace, self.name, spec.trafficRouting, weights, live)

    def _router(self, spec: SpecT) -> TrafficRouter:
        return registry.make_router(api(), spec.trafficRouting, self.namespace, (self.kind, self.name))

    # -- after the end ------------------------------------------------------------------------------
    def guard(self, obj: Mapping[str, Any]) -> None:
        """After RolledBack/Aborted (the scheduler runs it when the route or the object changes): a
        rolled-back candidate gets no traffic again."""
        if not leader.ELECTOR.is_leader():
            return
        try:
            spec = self.spec_model.model_validate(obj["spec"])
            status = self._status(obj)
            if not obj["metadata"].get("deletionTimestamp"):  # a new leader exports it too: the alert stays
                telemetry.set_phase(self.kind, self.namespace, self.name, status.phase, self.phases)
                telemetry.record(self.kind, self.namespace, self.name, dump(status), dict(obj["spec"]), True)
            want = self.guard_weights(spec, status)
            if not want:
                return
            router = self._router(spec)
            state = router.read()
            current = state.weights
            drift = {k: current[k] for k, v in want.items() if v == 0 and current.get(k, 0) > 0}
            arms = self.arm_weights(spec, status, {k: v for k, v in want.items() if k in current})
            if not drift and state.mirror_wrong(arms, None) is None:
                return
            # And no mirror to the candidate, and none of the operator's own match/sticky rules.
            router.write(state, arms, None, owned=self.owned(spec, status, arms))
            what = drift or state.mirrors
            msg = f"route gave traffic (or a mirror) to {what} after {status.phase}; set back to {want}"
            post_event(dict(obj), "Warning", "RouteRestored", msg)
            self.logger.warning("%s/%s RouteRestored: %s", self.namespace, self.name, msg)
        except Exception as e:  # never Kopf's logging of the exception's text
            self.logger.info("%s/%s guard: %s", self.namespace, self.name, safe_error(e))

    def delete(self, spec_body: Mapping[str, Any], status_body: Mapping[str, Any], retry: int) -> None:
        """Finalizer: move traffic only if the engine says so; a persistent failure ends bounded."""
        if not leader.ELECTOR.is_leader():
            raise kopf.TemporaryError("not the leader; the leader handles the deletion", delay=5)
        telemetry.forget(self.kind, self.namespace, self.name)
        try:
            spec = self.spec_model.model_validate(dict(spec_body))
            status = self.status_model.model_validate(
                {k: v for k, v in dict(status_body).items() if k != "kopf"}
            )
        except ValidationError:
            self.logger.warning(
                "%s/%s deleted with an invalid spec: route left alone", self.namespace, self.name
            )
            return
        want = self.deletion_weights(spec, status)
        if not want:
            self.logger.info(
                "%s/%s deleted after %s: route left alone", self.namespace, self.name, status.phase
            )
            return
        try:
            router = self._router(spec)
            state = router.read()
            w = self.arm_weights(spec, status, {k: v for k, v in want.items() if k in state.weights})
            router.write(state, w, None, owned=self.owned(spec, status, w, active=False))  # and its own rules
            self.logger.info(
                "%s/%s deleted while %s: route set to %s", self.namespace, self.name, status.phase, want
            )
        except NotOptedIn:  # permanent: the route's owner has withdrawn it; no retries
            msg = "the route does not opt in to this object (any more): route left alone; deleting"
            self.logger.warning("%s/%s %s", self.namespace, self.name, msg)
            post_event({"apiVersion": f"{GROUP}/{VERSION}", "kind": self.kind,
                        "metadata": {"name": self.name, "namespace": self.namespace}},
                       "Warning", "RouteLeftAlone", msg)  # fmt: skip
        except Exception as e:  # never Kopf's logging of the exception's text
            if retry < DELETE_RETRIES:
                raise kopf.TemporaryError(
                    f"restoring the route failed: {safe_error(e)}", delay=2 + 2 * retry
                ) from e
            msg = f"gave up restoring the route after {retry + 1} attempts ({safe_error(e)}); deleting anyway"
            self.logger.warning("%s/%s %s", self.namespace, self.name, msg)
            post_event({"apiVersion": f"{GROUP}/{VERSION}", "kind": self.kind,
                        "metadata": {"name": self.name, "namespace": self.namespace}},
                       "Warning", "RouteRestoreFailed", msg)  # fmt: skip


#: Attempts to restore a route on deletion before the finalizer is released anyway.
DELETE_RETRIES = 4
