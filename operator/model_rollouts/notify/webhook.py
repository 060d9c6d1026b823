"""Generic JSON webhook: the notice as one flat, documented object (also the gate request's shape)."""

from __future__ import annotations

from typing import Any

from model_rollouts.api.common import GROUP, VERSION
from model_rollouts.notify import Notice


def payload(notice: Notice) -> dict[str, Any]:
    out: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Notification",
        "event": notice.event,
        "severity": notice.severity,
        "object": {"kind": notice.kind, "namespace": notice.namespace, "name": notice.name},
        "phase": notice.phase,
        "reason": notice.reason,
        "message": notice.message,
        "time": notice.time,
    }
    if notice.revision:
        out["revision"] = notice.revision
    if notice.weights:
        out["weights"] = dict(notice.weights)
    return out
