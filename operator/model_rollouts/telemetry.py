"""The operator's own Prometheus metrics (prometheus-client), served on --metrics-port."""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from model_rollouts.analysis import comparison

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
NOTIFICATIONS = Counter(
    "mlrollouts_notifications_total",
    "Notifications to ClusterNotificationProviders, by result: sent (a 2xx), failed (no answer, not 2xx, "
    "provider unusable), dropped (the bounded queue was full) or refused (the provider does not admit the "
    "object's namespace: nothing sent)",
    ["result"],
)


def set_phase(kind: str, namespace: str, name: str, phase: str, all_phases: tuple[str, ...]) -> None:
    """One series per object: its current phase, value 1 (the other phases' series are removed, so
    an object costs one series here, and ``== 1`` selects the same as before)."""
    for p in all_phases:
        if p != phase:
            with contextlib.suppress(KeyError):
                PHASE.remove(kind, namespace, name, p)
    PHASE.labels(kind, namespace, name, phase).set(1)


# -- The latest analysis, per object ---------------------------------------------------------------
# Labels are bounded by the spec: kind, namespace, name, a metric or guardrail name and a variant
# (rollouts: stable/candidate; experiments: the variants' names). Values are never labels.
OBJ = ["kind", "namespace", "name"]
ESTIMATE = Gauge(
    "mlrollouts_comparison_estimate",
    "Latest estimate of a comparison's metric per arm (rollouts: stable and candidate; experiments: "
    "each variant and the control)",
    [*OBJ, "metric", "variant"],
)
SAMPLES = Gauge(
    "mlrollouts_comparison_samples",
    "Samples (trials or count) behind each arm's estimate",
    [*OBJ, "metric", "variant"],
)
DIFFERENCE = Gauge(
    "mlrollouts_comparison_difference",
    "Estimated difference of a comparison: candidate minus stable, or variant minus control",
    [*OBJ, "metric", "variant"],
)
CI_LOW = Gauge(
    "mlrollouts_comparison_ci_low",
    "Lower end of the confidence interval (sequence) of the difference; absent while unbounded",
    [*OBJ, "metric", "variant"],
)
CI_HIGH = Gauge(
    "mlrollouts_comparison_ci_high",
    "Upper end of the confidence interval (sequence) of the difference; absent while unbounded",
    [*OBJ, "metric", "variant"],
)
SEGMENT_DIFFERENCE = Gauge(
    "mlrollouts_segment_difference",
    "A segmented comparison's difference (candidate minus stable) in each segment (its spec's values)",
    [*OBJ, "metric", "segment"],
)
SEGMENT_STATUS = Gauge(
    "mlrollouts_segment_status",
    "1 for each segment's status in the latest analysis (pass, fail, inconclusive, tooSmall)",
    [*OBJ, "metric", "segment", "status"],
)
P_VALUE = Gauge(
    "mlrollouts_comparison_p_value",
    "p-value of a comparison's test (experiments: unadjusted)",
    [*OBJ, "metric", "variant"],
)
GUARDRAIL = Gauge(
    "mlrollouts_guardrail_value", "Latest guardrail measurement per variant", [*OBJ, "guardrail", "variant"]
)
GUARDRAIL_THRESHOLD = Gauge(
    "mlrollouts_guardrail_threshold",
    "A guardrail's bound from the spec (bound: min or max)",
    [*OBJ, "guardrail", "bound"],
)
SRM_P_VALUE = Gauge("mlrollouts_srm_p_value", "p-value of the sample-ratio-mismatch test", OBJ)
SRM_MISMATCH = Gauge(
    "mlrollouts_srm_mismatch", "1 while the experiment is paused for a sample-ratio mismatch, else 0", OBJ
)
VARIANT_REQUESTS = Gauge(
    "mlrollouts_variant_requests",
    "Requests each variant served (analysis.requests), the observed split the SRM check uses",
    [*OBJ, "variant"],
)
DEADLINE = Gauge(
    "mlrollouts_progress_deadline_exceeded",
    "1 while the object is held or was rolled back because progressDeadline passed, else 0",
    OBJ,
)
RECONCILE_FAILING = Gauge(
    "mlrollouts_reconcile_errors_consecutive",
    "Consecutive failed attempts to apply the current decision (0 once one is applied)",
    OBJ,
)

#: Condition reasons that mean the progress deadline passed (held, or rolled back for it).
DEADLINE_REASONS = ("ProgressDeadlineExceeded", "Inconclusive")
_ANALYSIS: tuple[Gauge, ...] = (
    ESTIMATE, SAMPLES, DIFFERENCE, CI_LOW, CI_HIGH, P_VALUE, GUARDRAIL, GUARDRAIL_THRESHOLD,
    SEGMENT_DIFFERENCE, SEGMENT_STATUS, SRM_P_VALUE, SRM_MISMATCH, VARIANT_REQUESTS, DEADLINE,
    RECONCILE_FAILING,
)  # fmt: skip
#: Every metric with per-object series: what :func:`forget` removes.
PER_OBJECT: tuple[MetricWrapperBase, ...] = (
    PHASE,
    WEIGHT,
    DECISIONS,
    MEASUREMENT_ERRORS,
    RECONCILE_ERRORS,
    LIMITS,
    *_ANALYSIS,
)


#: Per object, the label values each analysis gauge was last given (what the next record replaces).
_exported: dict[tuple[str, str, str], dict[Gauge, set[tuple[str, ...]]]] = {}
_lock = threading.Lock()


def _replace(
    gauge: Gauge, kind: str, namespace: str, name: str, values: Mapping[tuple[str, ...], float]
) -> None:
    """Set the object's series of ``gauge`` to exactly ``values`` (extra label values -> value);
    series not in it (a renamed comparison, a dropped variant, a value no longer known) go away."""
    want = {(kind, namespace, name, *k): v for k, v in values.items() if math.isfinite(v)}
    with _lock:
        before = _exported.setdefault((kind, namespace, name), {}).get(gauge, set())
        for labels in before - want.keys():
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
        for labels, v in want.items():
            gauge.labels(*labels).set(v)
        _exported[(kind, namespace, name)][gauge] = set(want)


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def analysis_values(
    kind: str, status: Mapping[str, Any], spec: Mapping[str, Any]
) -> dict[Gauge, dict[tuple[str, ...], float]]:
    """What the gauges of one object say, from its status (``lastAnalysis`` and friends) and spec."""
    out: dict[Gauge, dict[tuple[str, ...], float]] = {g: {} for g in _ANALYSIS}
    experiment = kind == "ModelExperiment"
    base = comparison.baseline_name(spec)
    for m in status.get("lastAnalysis") or []:
        metric, arm = str(m.get("name")), str(m.get("variant") or "candidate")
        if m.get("kind") == "guardrail":
            if (v := _num(m.get("value"))) is not None and m.get("outcome") == "value":
                out[GUARDRAIL][(metric, arm)] = v
            continue
        c = comparison.numbers(m.get("details"))
        pairs = [
            (ESTIMATE, (metric, base), c["baseline"]),
            (ESTIMATE, (metric, arm), c["candidate"]),
            (SAMPLES, (metric, base), c["baselineN"]),
            (SAMPLES, (metric, arm), c["candidateN"]),
            (DIFFERENCE, (metric, arm), c["difference"]),
            (CI_LOW, (metric, arm), c["ciLow"]),
            (CI_HIGH, (metric, arm), c["ciHigh"]),
            (P_VALUE, (metric, arm), c["pValue"]),
        ]
        for gauge, key, value in pairs:
            if value is not None:
                out[gauge][key] = value
        for r in m.get("segments") or []:
            seg = str(r.get("segment"))
            if (d := _num(r.get("difference"))) is not None:
                out[SEGMENT_DIFFERENCE][(metric, seg)] = d
            out[SEGMENT_STATUS][(metric, seg, str(r.get("status")))] = 1.0
    analysis = spec.get("analysis") or {}
    for g in (analysis.get("guardrails") if not experiment else spec.get("guardrails")) or []:
        for bound in ("min", "max"):
            if (x := _num(g.get(bound))) is not None:
                out[GUARDRAIL_THRESHOLD][(str(g.get("name")), bound)] = x
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    if experiment:
        if (p := _num(status.get("srmPValue"))) is not None:
            out[SRM_P_VALUE][()] = p
        srm = conditions.get("SampleRatioMismatch") or {}
        out[SRM_MISMATCH][()] = 1.0 if srm.get("status") == "True" else 0.0
        for v in status.get("variants") or []:
            if (r := _num(v.get("requests"))) is not None:
                out[VARIANT_REQUESTS][(str(v.get("name")),)] = r
    else:
        late = any(
            c.get("reason") in DEADLINE_REASONS and c.get("status") == "False" for c in conditions.values()
        )
        out[DEADLINE][()] = 1.0 if late else 0.0
    out[RECONCILE_FAILING][()] = float(_num(status.get("reconcileErrors")) or 0)
    return out


#: What a finished object keeps of the analysis gauges: what an alert reads (the deadline and
#: sample-ratio-mismatch flags); its phase, weights and counters stay until it is deleted.
FINISHED_KEEP: tuple[Gauge, ...] = (DEADLINE, SRM_MISMATCH)


def record(
    kind: str,
    namespace: str,
    name: str,
    status: Mapping[str, Any],
    spec: Mapping[str, Any],
    finished: bool = False,
) -> None:
    """Export the object's latest analysis (estimates, intervals, guardrails, SRM, deadline, errors).
    A ``finished`` object (promoted, rolled back, aborted, concluded) keeps only ``FINISHED_KEEP``:
    its other analysis series go, so a thousand finished objects cost a few series each."""
    for gauge, values in analysis_values(kind, status, spec).items():
        _replace(gauge, kind, namespace, name, values if not finished or gauge in FINISHED_KEEP else {})


def forget(kind: str, namespace: str, name: str, metrics: Iterable[MetricWrapperBase] = PER_OBJECT) -> None:
    """Remove every series of a deleted object: a walk over each metric's label values (no samples
    rendered), so deleting N objects costs N walks of the series, not N renderings of them."""
    with _lock:
        _exported.pop((kind, namespace, name), None)
    obj = (kind, namespace, name)
    for metric in metrics:
        with metric._lock:  # the children's dict, keyed by label values in declared order
            mine = [labels for labels in metric._metrics if labels[:3] == obj]
        for labels in mine:
            with contextlib.suppress(KeyError):
                metric.remove(*labels)


def forget_all(metrics: Iterable[MetricWrapperBase] = PER_OBJECT) -> None:
    """Remove every per-object series (a replica that is not the leader exports none of them, so a
    stale value of a former leader cannot keep an alert firing); ``mlrollouts_leader`` stays."""
    with _lock:
        _exported.clear()
        for metric in metrics:
            metric.clear()
