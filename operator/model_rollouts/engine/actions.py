"""Actions the pure engines ask the handlers to carry out, besides writing status."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event on the resource (and a line in the operator log)."""

    type: str  # Normal | Warning
    reason: str
    message: str
