"""The Kubernetes API for the operator's adapters: one client, status writes and Events.

Nothing here imports ``handlers/``, ``engine/``, ``traffic/``, ``metrics/`` or ``notify/``: they import it.
"""

from __future__ import annotations

from model_rollouts.kube.client import REQUEST_TIMEOUT, api, api_unlimited, configure_rate, get_object, now
from model_rollouts.kube.events import post_event
from model_rollouts.kube.status import write_status

__all__ = [
    "REQUEST_TIMEOUT",
    "api",
    "api_unlimited",
    "configure_rate",
    "get_object",
    "now",
    "post_event",
    "write_status",
]
