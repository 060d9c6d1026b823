"""Status bookkeeping shared by the rollout and experiment state machines (pure)."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel

from model_rollouts.api.common import (
    MAX_MESSAGE,
    Condition,
    HistoryEntry,
    ResourceStatus,
    set_condition,
    truncate,
)
from model_rollouts.engine.actions import Event

HISTORY_LIMIT = 30
#: "Now": what ``next_due`` returns when something is to start at once.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

S = TypeVar("S", bound=ResourceStatus)


def digest(body: Any) -> str:
    """A short, stable hash of a JSON-able value: how revisions (and the rollout's steps) are named."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:10]


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


def spec_valid(conditions: list[Condition], now: datetime, generation: int) -> list[Condition]:
    """Valid=True: the spec was accepted at this generation (both kinds)."""
    return set_condition(conditions, "Valid", "True", "SpecValid", "spec accepted", now, generation)


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


def _bounded(value: Any) -> Any:
    if isinstance(value, str):
        return truncate(value, MAX_MESSAGE)
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            old = getattr(value, name)
            new = _bounded(old)
            if new is not old:
                setattr(value, name, new)
        return value
    if isinstance(value, list):
        for i, item in enumerate(value):
            value[i] = _bounded(item)
        return value
    if isinstance(value, dict):
        for k, item in value.items():
            value[k] = _bounded(item)
        return value
    return value


def bound_texts(s: S) -> S:
    """Every text in a status (messages, reasons, recorded annotation values) cut to MAX_MESSAGE
    characters with a marker, in place: no input can make a status grow past its fixed shape."""
    _bounded(s)
    return s
