"""Which transitions of an object are notifications, and to whom (pure).

The engines emit Events only on transitions that they record in status (history), and the handler
publishes them only after that status was written; a tick that changes nothing emits nothing, so
nothing is re-sent on every tick. :class:`Dedupe` also drops a transition seen before (same object,
event, reason, message and history time).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from typing import Any

from pydantic import TypeAdapter, ValidationError

from model_rollouts.api.common import MAX_MESSAGE, ResourceStatus, truncate
from model_rollouts.api.notification import NOTIFICATION_EVENTS, NotificationRef
from model_rollouts.engine.actions import LIMIT_REASONS, Event
from model_rollouts.notify import Notice

#: Event reasons that start (or restart) a rollout or experiment.
STARTED_REASONS = ("Started", "NewRevision", "RetryRequested", "Retried")
#: BakeStarted: the candidate has 100% (postPromotion's bake begins); HoldoutStarted: the replaced
#: model gets its holdout share back.
STEP_REASONS = ("WeightChanged", "WeightsChanged", "BakeStarted", "HoldoutStarted")
SRM_REASONS = ("SampleRatioMismatch",)
#: Error notifications: limits reached, a spec that cannot be acted on, a decision not applied.
ERROR_REASONS = (*LIMIT_REASONS, "InvalidSpec", "ReconcileFailed", "RouteWriteFailed", "RouteNotVerified")
#: Terminal phases and the notification each is (an experiment's Concluded is its Promoted).
PHASE_EVENTS = {
    "Promoted": "Promoted",
    "Concluded": "Promoted",
    "RolledBack": "RolledBack",
    "Aborted": "Aborted",
}


def event_of(reason: str) -> str | None:
    """The notification event of an Event reason that is not a phase change, or None."""
    if reason in STARTED_REASONS:
        return "Started"
    if reason in STEP_REASONS:
        return "Step"
    if reason == "Paused":
        return "Paused"
    if reason in SRM_REASONS:
        return "SRM"
    if reason in ERROR_REASONS:
        return "Error"
    return None


def _weights(status: ResourceStatus) -> dict[str, int]:
    variants = getattr(status, "variants", None)
    if variants:
        return {str(v.name): int(v.weight) for v in variants}
    weight = getattr(status, "weight", None)
    if weight is None:
        return {}
    return {"candidate": int(weight), "stable": 100 - int(weight)}


def notices(
    kind: str,
    namespace: str,
    name: str,
    old: ResourceStatus,
    new: ResourceStatus,
    actions: Iterable[object],
) -> list[Notice]:
    """The notifications of one written decision: its Events, and the phase it finished in."""
    when = new.history[-1].time.isoformat() if new.history else ""
    revision = getattr(new, "revision", None)
    weights = _weights(new)

    def make(event: str, reason: str, message: str, warning: bool) -> Notice:
        return Notice(
            event=event,
            kind=kind,
            namespace=namespace,
            name=name,
            phase=new.phase,
            reason=reason,
            message=truncate(message, MAX_MESSAGE),
            severity="warning" if warning else "info",
            time=when,
            revision=revision,
            weights=weights,
        )

    out: list[Notice] = []
    events = [e for e in actions if isinstance(e, Event)]
    finished = PHASE_EVENTS.get(new.phase) if new.phase != old.phase else None
    for e in events:
        if finished and e.reason == new.phase:
            continue  # the phase Event of a finish: the notification below says it
        event = event_of(e.reason)
        if event is not None:
            out.append(make(event, e.reason, e.message, e.type == "Warning"))
    if finished:
        reason = new.history[-1].reason if new.history else new.phase
        out.append(make(finished, reason, new.message, finished != "Promoted"))
    return out


def reconcile_error(
    kind: str, namespace: str, name: str, status: ResourceStatus, reason: str, message: str
) -> list[Notice]:
    """The first of a run of failures to apply a decision (later attempts back off, unannounced)."""
    if status.reconcileErrors != 1:
        return []
    when = status.lastReconcileErrorTime.isoformat() if status.lastReconcileErrorTime else ""
    return [
        Notice(
            event="Error",
            kind=kind,
            namespace=namespace,
            name=name,
            phase=status.phase,
            reason=reason,
            message=truncate(message, MAX_MESSAGE),
            severity="warning",
            time=when,
            revision=getattr(status, "revision", None),
            weights=_weights(status),
        )
    ]


_REFS: TypeAdapter[list[NotificationRef]] = TypeAdapter(list[NotificationRef])


def subscriptions(spec: Any) -> list[NotificationRef]:
    """``spec.notifications`` of a raw object ([] if absent or not valid: that is Valid=False's job)."""
    raw = (spec or {}).get("notifications") if isinstance(spec, dict) else None
    if not raw:
        return []
    try:
        return _REFS.validate_python(raw)
    except ValidationError:
        return []


def wants(ref: NotificationRef, event: str) -> bool:
    return event in NOTIFICATION_EVENTS and (not ref.events or event in ref.events)


class Dedupe:
    """A bounded set of transitions already published (oldest forgotten first).

    It holds keys (32-byte digests from :func:`key`), never notices or their messages: at its
    4,096-entry cap it holds well under 1 MB whatever the messages were.
    """

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._seen: OrderedDict[Hashable, None] = OrderedDict()
        self._lock = threading.Lock()

    def first(self, key: Hashable) -> bool:
        """True the first time ``key`` is seen."""
        with self._lock:
            if key in self._seen:
                self._seen.move_to_end(key)
                return False
            self._seen[key] = None
            while len(self._seen) > self.size:
                self._seen.popitem(last=False)
            return True


def key(uid: str, provider: str, n: Notice) -> bytes:
    """A transition's identity (object, provider, event, reason, message, time) as a SHA-256 digest."""
    h = hashlib.sha256()
    for part in (uid, provider, n.event, n.reason, n.message, n.time):
        b = part.encode()
        h.update(len(b).to_bytes(8, "big"))
        h.update(b)
    return h.digest()
