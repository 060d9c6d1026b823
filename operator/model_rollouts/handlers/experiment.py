"""Thin Kopf handlers for ModelExperiment: read, measure, ask the engine, apply, write status."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import kopf

from model_rollouts.analysis import model_judges
from model_rollouts.api.common import GROUP, VERSION, format_duration
from model_rollouts.api.experiment import (
    PLURAL,
    TERMINAL_PHASES,
    ModelExperimentSpec,
    ModelExperimentStatus,
    Variant,
)
from model_rollouts.engine import experiment as engine
from model_rollouts.handlers import common, scheduler
from model_rollouts.handlers.controller import Controller
from model_rollouts.handlers.judges import judge_queries, measure_judges
from model_rollouts.kube.readiness import service_ready
from model_rollouts.metrics.batch import in_one_request
from model_rollouts.metrics.provider import MetricProvider, render
from model_rollouts.traffic import registry
from model_rollouts.traffic.router import RETIRED, Arm

KIND = "ModelExperiment"
PHASES = ("Pending", "Running", "Paused", "Concluded", "RolledBack", "Aborted", "Invalid")
ANNOTATIONS = (engine.ANNOTATION_ABORT, engine.ANNOTATION_RESUME, engine.ANNOTATION_RETRY)

logger = logging.getLogger("model_rollouts.modelexperiment")


def _placeholders(v: Variant, namespace: str, window: str) -> dict[str, str]:
    return {
        "variant": v.name,
        "service": v.service,
        "deployment": v.service,
        "namespace": namespace,
        "window": window,
    }


def resolve(spec: ModelExperimentSpec, namespace: str) -> ModelExperimentSpec:
    """The spec with every templateRef replaced by its template's queries (ProviderError naming the field)."""
    if not (spec.primaryMetric.templateRef or any(g.templateRef for g in spec.guardrails)):
        return spec
    guardrails = [
        common.resolve_metric(g, f"spec.guardrails[{i}]", namespace, ("query",))
        for i, g in enumerate(spec.guardrails)
    ]
    primary = common.resolve_metric(
        spec.primaryMetric, "spec.primaryMetric", namespace, common.METRIC_FIELDS[spec.primaryMetric.type]
    )
    return spec.model_copy(update={"guardrails": guardrails, "primaryMetric": primary})


def _queries(spec: ModelExperimentSpec, namespace: str = "default") -> list[tuple[str, str | None]]:
    spec = resolve(spec, namespace)
    out: list[tuple[str, str | None]] = [
        (f"spec.guardrails[{i}].query", g.query) for i, g in enumerate(spec.guardrails)
    ]
    out.append(("spec.analysis.requests", spec.analysis.requests))
    out += judge_queries(spec.analysis)
    out += [
        (f"spec.primaryMetric.{f}", getattr(spec.primaryMetric, f))
        for fs in common.METRIC_FIELDS.values()
        for f in fs
    ]
    return out


def measure(
    spec: ModelExperimentSpec,
    status: ModelExperimentStatus,
    provider: MetricProvider,
    namespace: str,
    now: datetime | None = None,
) -> engine.Observations:
    """Primary metric and guardrails of every active variant; the primary metric (and requests)
    cumulative since the experiment started (until ``now``, default the clock's), guardrails over
    ``analysis.window``."""
    spec = resolve(spec, namespace)
    now = now or common.now()
    since = format_duration((now - (status.startedAt or now)).total_seconds())
    active = {v.name for v in status.variants if v.active}
    out: dict[str, engine.VariantObservation] = {}
    for v in spec.variants:
        if v.name not in active:
            continue
        primary, problem = common.read_counts(
            spec.primaryMetric, provider, _placeholders(v, namespace, since)
        )
        values = _placeholders(v, namespace, spec.analysis.window)
        guardrails = {g.name: provider.query(render(g.query or "", values)) for g in spec.guardrails}
        requests = None
        if spec.analysis.requests:
            r = provider.query(render(spec.analysis.requests, _placeholders(v, namespace, since)))
            # No series yet means no requests yet; an error or NaN leaves the last count in status.
            requests = 0.0 if r.outcome == "noData" else (r.value if r.ok else None)
        out[v.name] = engine.VariantObservation(
            primary=primary, problem=problem, guardrails=guardrails, requests=requests
        )
    ready = {v.name: service_ready(namespace, v.service) for v in spec.variants if v.name in active}
    judged: dict[str, dict[str, model_judges.JudgeData]] = {}
    if spec.analysis.predictionShift or spec.analysis.calibration:
        control = engine.control_of(spec)
        others = {v.name: _placeholders(v, namespace, since) for v in spec.variants if v.name in active}
        others.pop(control.name, None)
        base = _placeholders(control, namespace, since)
        judged = measure_judges(
            spec.analysis, provider, base, others, baseline_name=f"control {control.name}"
        )
    return engine.Observations(variants=out, ready=ready, judges=judged)


class ExperimentController(Controller[ModelExperimentSpec, ModelExperimentStatus]):
    kind, plural, phases, annotations = KIND, PLURAL, PHASES, ANNOTATIONS
    terminal = TERMINAL_PHASES
    spec_model, status_model = ModelExperimentSpec, ModelExperimentStatus

    def problem(self, spec: ModelExperimentSpec) -> str | None:
        return engine.validate(spec)

    def queries(self, spec: ModelExperimentSpec) -> list[tuple[str, str | None]]:
        return _queries(spec, self.namespace)

    def arms(self, spec: ModelExperimentSpec, status: ModelExperimentStatus) -> list[Arm]:
        """The arms the route must have: the spec's variants. Services of removed variants are set
        to 0 in the same write when the route still has them; one already gone from the route carries
        no traffic, so it is not required."""
        return [Arm(v.name, v.service) for v in spec.variants]

    def arm_weights(
        self, spec: ModelExperimentSpec, status: ModelExperimentStatus, per_service: Mapping[str, int]
    ) -> dict[Arm, int]:
        roles = dict.fromkeys(status.retiredServices, RETIRED)
        roles.update({v.service: v.name for v in spec.variants})
        roles.update({v.service: v.name for v in status.variants if v.service})
        return {Arm(roles.get(svc, RETIRED), svc): w for svc, w in per_service.items()}

    def due(self, spec: ModelExperimentSpec, status: ModelExperimentStatus, now: datetime) -> bool:
        return engine.analysis_due(spec, status, now)

    def observe(
        self,
        spec: ModelExperimentSpec,
        status: ModelExperimentStatus,
        provider: MetricProvider,
        now: datetime,
    ) -> engine.Observations | None:
        if not self.due(spec, status, now):  # pacing lives in status
            return None

        def run() -> engine.Observations:  # in the tenant's pool; its queries in one request
            at = common.now()
            return in_one_request(provider, lambda p: measure(spec, status, p, self.namespace, at))

        observations = self.measured(provider, run)
        self.count_errors(
            r
            for o in observations.variants.values()
            for r in [*o.guardrails.values(), *([o.problem] if o.problem else [])]
        )
        return observations

    def decide(
        self,
        spec: ModelExperimentSpec,
        status: ModelExperimentStatus,
        observations: engine.Observations | None,
        now: datetime,
        generation: int,
        annotations: dict[str, str],
    ) -> tuple[ModelExperimentStatus, list[object]]:
        d = engine.reconcile(
            spec, status, now=now, generation=generation, annotations=annotations, observations=observations
        )
        return d.status, list(d.actions)

    def weights(
        self, spec: ModelExperimentSpec, status: ModelExperimentStatus
    ) -> tuple[dict[Arm, int], dict[str, int]] | None:
        """The engine's weights for this status, retired Services at 0 (the router leaves out one the
        route no longer has: it carries no traffic)."""
        w = engine.route_weights(spec, status)
        if w is None:
            return None
        return self.arm_weights(spec, status, w), {v.name: v.weight for v in status.variants}

    def next_due(self, spec: ModelExperimentSpec, status: ModelExperimentStatus) -> datetime | None:
        return engine.next_due(spec, status)

    def guard_weights(
        self, spec: ModelExperimentSpec, status: ModelExperimentStatus
    ) -> dict[str, int] | None:
        return engine.guard_weights(spec, status)

    def deletion_weights(
        self, spec: ModelExperimentSpec, status: ModelExperimentStatus
    ) -> dict[str, int] | None:
        return engine.deletion_weights(spec, status)

    @staticmethod
    def active(spec: Mapping[str, Any], status: Mapping[str, Any], annotations: Mapping[str, str]) -> bool:
        return engine.active(spec, status, annotations)


_controllers: dict[str, ExperimentController] = {}


def _controller(namespace: str | None, name: str, uid: str) -> ExperimentController:
    return _controllers.setdefault(uid, ExperimentController(namespace or "default", name))


@kopf.index(GROUP, VERSION, PLURAL)
def experiment_routes(body: kopf.Body, **_: Any) -> dict[tuple[str, str, int], registry.RouteClaim] | None:
    """Which route rule each ModelExperiment claims, kept from the watch (the one-owner check
    reads it instead of listing every object of the namespace)."""
    return registry.route_claim(KIND, body)


# No Kopf timer per object: the one scheduler wakes it from the watch (handlers/shards.py feeds it).
scheduler.SCHEDULER.register(
    scheduler.Kind(PLURAL, _controller, engine.active, lambda uid: _controllers.pop(uid, None))
)


@kopf.on.delete(GROUP, VERSION, PLURAL)
def experiment_deleted(
    spec: kopf.Spec, status: kopf.Status, namespace: str | None, name: str, uid: str, retry: int, **_: Any
) -> None:
    """Finalizer: all traffic to the control only while the experiment runs; after the end the route
    is left as the end left it (on the winner)."""
    _controller(namespace, name, uid).delete(spec, status, retry)
    _controllers.pop(uid, None)
