"""Actions the pure engines ask the handlers to carry out, besides writing status."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event on the resource (and a line in the operator log)."""

    type: str  # Normal | Warning
    reason: str
    message: str


#: Event reasons of deadlines and error limits (also counted as mlrollouts_limits_reached_total).
LIMIT_REASONS = ("ProgressDeadlineExceeded", "Inconclusive", "ErrorLimitReached")
