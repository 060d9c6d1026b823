"""The operator's own Prometheus metrics (prometheus-client), served on --metrics-port."""

from __future__ import annotations

import contextlib

from prometheus_client import Counter, Gauge, Histogram

PHASE = Gauge(
    "mlrollouts_phase", "1 for the current phase of each resource", ["kind", "namespace", "name", "phase"]
)
WEIGHT = Gauge(
    "mlrollouts_weight",
    "Traffic weight the operator set, per resource and variant",
    ["kind", "namespace", "name", "variant"],
)
DECISIONS = Counter(
    "mlrollouts_decisions_total",
    "Transitions decided by the engine, by reason",
    ["kind", "namespace", "name", "decision"],
)
ANALYSIS_SECONDS = Histogram(
    "mlrollouts_analysis_duration_seconds",
    "Time to measure and decide one analysis interval",
    ["kind"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
MEASUREMENT_ERRORS = Counter(
    "mlrollouts_measurement_errors_total",
    "Metric queries that failed (not 'no data')",
    ["kind", "namespace", "name"],
)

RECONCILE_ERRORS = Counter(
    "mlrollouts_reconcile_errors_total",
    "Decisions that could not be applied (route write failed, API error); the object holds and retries",
    ["kind", "namespace", "name", "reason"],
)
LIMITS = Counter(
    "mlrollouts_limits_reached_total",
    "Deadlines and error limits reached, by reason",
    ["kind", "namespace", "name", "reason"],
)
LEADER = Gauge("mlrollouts_leader", "1 while this replica holds the leader Lease and acts")


def set_phase(kind: str, namespace: str, name: str, phase: str, all_phases: tuple[str, ...]) -> None:
    for p in all_phases:
        PHASE.labels(kind, namespace, name, p).set(1 if p == phase else 0)


def forget(kind: str, namespace: str, name: str, all_phases: tuple[str, ...], variants: list[str]) -> None:
    for p in all_phases:
        with contextlib.suppress(KeyError):
            PHASE.remove(kind, namespace, name, p)
    for v in variants:
        with contextlib.suppress(KeyError):
            WEIGHT.remove(kind, namespace, name, v)
