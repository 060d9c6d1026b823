"""Status bookkeeping shared by the rollout and experiment state machines (pure)."""

from __future__ import annotations

from datetime import datetime
from typing import TypeVar

from model_rollouts.api.common import HistoryEntry, ResourceStatus, set_condition
from model_rollouts.engine.actions import Event

HISTORY_LIMIT = 30

S = TypeVar("S", bound=ResourceStatus)


def record(
    s: ResourceStatus,
    now: datetime,
    event: str,
    reason: str,
    message: str,
    values: dict[str, float] | None = None,
    *,
    weight: int | None = None,
    step: int | None = None,
) -> None:
    """Append a transition to the bounded, informational history (nothing reads it back)."""
    s.history.append(
        HistoryEntry(
            time=now,
            event=event,
            phase=s.phase,
            weight=weight,
            step=step,
            reason=reason,
            message=message,
            values=values or None,
        )
    )
    del s.history[:-HISTORY_LIMIT]


def invalid(status: S, message: str, now: datetime, generation: int) -> tuple[S, list[Event]]:
    """Valid=False: the spec cannot be acted on; no weight action, so traffic stays exactly as it is."""
    s = status.model_copy(deep=True)
    events: list[Event] = []
    if s.phase != "Invalid" or s.message != message:
        events.append(Event("Warning", "InvalidSpec", message))
        record(s, now, "Invalid", "InvalidSpec", message)
    s.phase = "Invalid"
    s.message = message
    s.observedGeneration = generation
    s.conditions = set_condition(s.conditions, "Valid", "False", "InvalidSpec", message, now, generation)
    s.conditions = set_condition(
        s.conditions, "Progressing", "False", "InvalidSpec", message, now, generation
    )
    return s, events
