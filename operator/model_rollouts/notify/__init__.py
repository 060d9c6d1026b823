"""Notifications and gates (issue 11): what happened, in one shape, sent in the background.

- :mod:`.events`: which transitions of an object are notifications (pure).
- :mod:`.webhook`, :mod:`.slack`, :mod:`.teams`: one payload format each, behind :class:`Format`;
  :mod:`.payloads` maps each provider type to its format.
- :mod:`.sender`: the platform's ClusterNotificationProviders resolved and POSTed to from a bounded
  background queue (never from the control loop), and the gates asked synchronously.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Severity = Literal["info", "warning"]


@dataclass(frozen=True)
class Notice:
    """One notification: an event of one object, with fixed texts the engine wrote (never a server's)."""

    event: str  # one of api.notification.NOTIFICATION_EVENTS
    kind: str
    namespace: str
    name: str
    phase: str
    reason: str
    message: str
    severity: Severity
    time: str  # RFC 3339: when the transition was recorded
    revision: str | None = None
    weights: dict[str, int] = field(default_factory=dict)  # candidate/stable, or per variant

    @property
    def title(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}: {self.event}"


class Format(Protocol):
    """A payload format: a JSON body for one notice."""

    def __call__(self, notice: Notice) -> dict[str, Any]: ...
