"""Names the Kopf handlers share, gathered from the layers below them.

The Kubernetes client, status writes and Events live in :mod:`model_rollouts.kube`; provider, Secret
and metric-template resolution in :mod:`model_rollouts.metrics.resolve`; reading counts in
:mod:`model_rollouts.metrics.counts`; route claims (the one-owner check) in
:mod:`model_rollouts.traffic.registry`; the per-object loop in :mod:`model_rollouts.handlers.controller`.
"""

from __future__ import annotations

from typing import Any

from model_rollouts.api.errors import validation_message as validation_message
from model_rollouts.kube.client import REQUEST_TIMEOUT as REQUEST_TIMEOUT
from model_rollouts.kube.client import api as api
from model_rollouts.kube.client import get_object as get_object
from model_rollouts.kube.client import now as now
from model_rollouts.kube.events import post_event as post_event
from model_rollouts.kube.status import write_status as write_status
from model_rollouts.metrics.counts import METRIC_FIELDS as METRIC_FIELDS
from model_rollouts.metrics.counts import read_counts as read_counts
from model_rollouts.metrics.errors import ProviderError as ProviderError
from model_rollouts.metrics.resolve import ANALYSIS_BUDGET as ANALYSIS_BUDGET
from model_rollouts.metrics.resolve import Measurement as Measurement
from model_rollouts.metrics.resolve import Scoped as Scoped
from model_rollouts.metrics.resolve import check_queries as check_queries
from model_rollouts.metrics.resolve import make_provider as make_provider
from model_rollouts.metrics.resolve import provider_for as provider_for
from model_rollouts.metrics.resolve import resolve_metric as resolve_metric
from model_rollouts.traffic.registry import FINISHED_PHASES as FINISHED_PHASES
from model_rollouts.traffic.registry import RouteClaim as RouteClaim
from model_rollouts.traffic.registry import RouteOwners as RouteOwners
from model_rollouts.traffic.registry import route_claim as route_claim
from model_rollouts.traffic.registry import route_owners as route_owners

_MOVED = (
    "Controller",
    "Measuring",
    "backoff",
    "safe_error",
    "DELETE_RETRIES",
    "INVALID_RECHECK",
    "MAX_BACKOFF",
)


def __getattr__(name: str) -> Any:
    """The Controller and its helpers, from handlers/controller.py (which imports this module)."""
    if name in _MOVED:
        from model_rollouts.handlers import controller

        return getattr(controller, name)
    raise AttributeError(name)
