"""An object that leaves this operator instance (deleted, or relabelled to another shard).

With a label selector on the watch (see sharding.py), the API server sends a DELETED event for an
object that no longer matches, although it still exists (relabelled to another instance). This
module's ``on.event`` handlers feed every event to the one scheduler (handlers/scheduler.py), which
drops such an object with its due time, so it is ticked here no more, and record it (``here``). The
object's per-object series go with it: it is the other instance's to export from then on. An event
that shows the object again (relabelled back) undoes it and wakes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from model_rollouts import telemetry
from model_rollouts.api.common import GROUP, VERSION
from model_rollouts.handlers import scheduler

#: uids of objects that left this instance's watch while they still exist.
_left: set[str] = set()
#: Bound on the set (an object relabelled away for good stays in it; it never comes back here).
MAX_LEFT = 100_000


def here(uid: str | None = None, **_: Any) -> bool:
    """False once the object left this instance (until it comes back)."""
    return uid not in _left


def seen(kind: str, event_type: str | None, body: Mapping[str, Any]) -> None:
    """Note one watch event of an object of ``kind``."""
    meta = body.get("metadata") or {}
    uid = str(meta.get("uid") or "")
    if event_type != "DELETED":
        _left.discard(uid)
        return
    telemetry.forget(kind, str(meta.get("namespace") or "default"), str(meta.get("name") or ""))
    if meta.get("deletionTimestamp"):
        _left.discard(uid)  # really deleted: its finalizer ran, its timers are already stopped
    elif uid:
        if len(_left) >= MAX_LEFT:
            _left.clear()
        _left.add(uid)


@kopf.on.event(GROUP, VERSION, "modelrollouts")
def rollout_event(type: str | None, body: kopf.Body, **kwargs: Any) -> None:
    seen("ModelRollout", type, body)
    scheduler.capture_owners(kwargs)
    scheduler.SCHEDULER.seen("modelrollouts", type, body)


@kopf.on.event(GROUP, VERSION, "modelexperiments")
def experiment_event(type: str | None, body: kopf.Body, **kwargs: Any) -> None:
    seen("ModelExperiment", type, body)
    scheduler.capture_owners(kwargs)
    scheduler.SCHEDULER.seen("modelexperiments", type, body)
