"""Thin Kopf handlers for ModelExperiment: read, measure, ask the engine, apply, write status."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import kopf
from pydantic import ValidationError

from model_rollouts import telemetry
from model_rollouts.api.common import GROUP, VERSION, format_duration
from model_rollouts.api.experiment import (
    PLURAL,
    TERMINAL_PHASES,
    ModelExperimentSpec,
    ModelExperimentStatus,
    Variant,
)
from model_rollouts.engine import experiment as engine
from model_rollouts.handlers import common
from model_rollouts.metrics.provider import MetricProvider, Result, render
from model_rollouts.traffic.router import RouterError

KIND = "ModelExperiment"
PHASES = ("Pending", "Running", "Paused", "Concluded", "RolledBack", "Aborted", "Invalid")
ANNOTATIONS = (engine.ANNOTATION_ABORT, engine.ANNOTATION_RESUME)

logger = logging.getLogger("model_rollouts.modelexperiment")


def _placeholders(v: Variant, namespace: str, window: str) -> dict[str, str]:
    return {
        "variant": v.name,
        "service": v.service,
        "deployment": v.service,
        "namespace": namespace,
        "window": window,
    }


def _queries(spec: ModelExperimentSpec) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = [
        (f"spec.guardrails[{i}].query", g.query) for i, g in enumerate(spec.guardrails)
    ]
    out.append(("spec.analysis.requests", spec.analysis.requests))
    out += [
        (f"spec.primaryMetric.{f}", getattr(spec.primaryMetric, f))
        for fs in common.METRIC_FIELDS.values()
        for f in fs
    ]
    return out


def measure(
    spec: ModelExperimentSpec, status: ModelExperimentStatus, provider: MetricProvider, namespace: str
) -> engine.Observations:
    """Primary metric of every variant, cumulative since the experiment started; guardrails of active ones."""
    now = common.now()
    since = format_duration((now - (status.startedAt or now)).total_seconds())
    active = {v.name for v in status.variants if v.active}
    out: dict[str, engine.VariantObservation] = {}
    for v in spec.variants:
        primary, problem = common.read_counts(
            spec.primaryMetric, provider, _placeholders(v, namespace, since)
        )
        guardrails: dict[str, Result] = {}
        if v.name in active:
            values = _placeholders(v, namespace, spec.analysis.window)
            guardrails = {g.name: provider.query(render(g.query, values)) for g in spec.guardrails}
        requests = None
        if spec.analysis.requests:
            r = provider.query(render(spec.analysis.requests, _placeholders(v, namespace, since)))
            # No series yet means no requests yet; an error or NaN leaves the last count in status.
            requests = 0.0 if r.outcome == "noData" else (r.value if r.ok else None)
        out[v.name] = engine.VariantObservation(
            primary=primary, problem=problem, guardrails=guardrails, requests=requests
        )
    return engine.Observations(variants=out)


class ExperimentController(common.Controller[ModelExperimentSpec, ModelExperimentStatus]):
    kind, plural, phases, annotations = KIND, PLURAL, PHASES, ANNOTATIONS
    terminal = TERMINAL_PHASES
    spec_model, status_model = ModelExperimentSpec, ModelExperimentStatus

    def problem(self, spec: ModelExperimentSpec) -> str | None:
        return engine.validate(spec)

    def queries(self, spec: ModelExperimentSpec) -> list[tuple[str, str | None]]:
        return _queries(spec)

    def services(self, spec: ModelExperimentSpec) -> list[str]:
        return [v.service for v in spec.variants]

    def decide(
        self,
        spec: ModelExperimentSpec,
        status: ModelExperimentStatus,
        provider: MetricProvider,
        now: datetime,
        generation: int,
        annotations: dict[str, str],
    ) -> tuple[ModelExperimentStatus, list[object]]:
        observations = None
        if engine.needs_measurement(spec, status):
            observations = measure(spec, status, provider, self.namespace)
            self.count_errors(
                r
                for o in observations.variants.values()
                for r in [*o.guardrails.values(), *([o.problem] if o.problem else [])]
            )
        d = engine.reconcile(
            spec, status, now=now, generation=generation, annotations=annotations, observations=observations
        )
        return d.status, list(d.actions)

    def weights(
        self, spec: ModelExperimentSpec, status: ModelExperimentStatus
    ) -> tuple[dict[str, int], dict[str, int]] | None:
        """The route follows status (also re-asserted in terminal phases), once there are weights."""
        if not status.variants or status.phase in ("Invalid", "Pending"):
            return None
        return engine.service_weights(spec, status), {v.name: v.weight for v in status.variants}


_controllers: dict[str, ExperimentController] = {}


@kopf.timer(GROUP, VERSION, PLURAL, interval=0.5, sharp=False)
def experiment_timer(body: kopf.Body, namespace: str | None, name: str, uid: str, **_: Any) -> None:
    _controllers.setdefault(uid, ExperimentController(namespace or "default", name)).wake(body)


@kopf.on.delete(GROUP, VERSION, PLURAL)
def experiment_deleted(spec: kopf.Spec, namespace: str | None, name: str, uid: str, **_: Any) -> None:
    """Finalizer: all traffic to the control before the ModelExperiment goes away."""
    _controllers.pop(uid, None)
    ns = namespace or "default"
    variants = [v.get("name", "") for v in (dict(spec).get("variants") or []) if isinstance(v, dict)]
    telemetry.forget(KIND, ns, name, PHASES, variants)
    try:
        s = ModelExperimentSpec.model_validate(dict(spec))
        controls = [v for v in s.variants if v.control]
        if len(controls) != 1:
            logger.warning("deleted without restoring weights: spec.variants has %d controls", len(controls))
            return
        router = common.make_router(s.trafficRouting, ns)
        router.set_weights({v.service: (100 if v.control else 0) for v in s.variants})
        logger.info("deleted: all traffic to the control %s", controls[0].service)
    except (ValidationError, RouterError) as e:
        logger.warning("deleted without restoring weights: %s", e)
