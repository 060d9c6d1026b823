"""An object that leaves this operator instance (deleted, or relabelled to another shard) takes its
per-object series with it.

With a label selector on the watch (see sharding.py), the API server sends a DELETED event for an
object that no longer matches, although it still exists: relabelled to another instance, it is that
instance's to export from then on, and this one must not keep a stale phase, weight or alert series.
"""

from __future__ import annotations

from typing import Any

import kopf

from model_rollouts import telemetry
from model_rollouts.api.common import GROUP, VERSION

KINDS = {"modelrollouts": "ModelRollout", "modelexperiments": "ModelExperiment"}


def left(kind: str, event_type: str | None, namespace: str | None, name: str | None) -> bool:
    """Forget the series of an object this instance no longer sees; True if it did."""
    if event_type != "DELETED" or not name:
        return False
    telemetry.forget(kind, namespace or "default", name)
    return True


@kopf.on.event(GROUP, VERSION, "modelrollouts")
def rollout_event(type: str | None, namespace: str | None, name: str | None, **_: Any) -> None:
    left(KINDS["modelrollouts"], type, namespace, name)


@kopf.on.event(GROUP, VERSION, "modelexperiments")
def experiment_event(type: str | None, namespace: str | None, name: str | None, **_: Any) -> None:
    left(KINDS["modelexperiments"], type, namespace, name)
