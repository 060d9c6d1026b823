"""Thin Kopf handlers for ModelRollout: read, measure, ask the engine, apply, write status."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import kopf
from pydantic import ValidationError

from model_rollouts import telemetry
from model_rollouts.api.common import GROUP, VERSION, format_duration
from model_rollouts.api.rollout import (
    ANNOTATION_ABORT,
    ANNOTATION_PROMOTE,
    ANNOTATION_RESUME,
    PLURAL,
    TERMINAL_PHASES,
    Comparison,
    ModelRolloutSpec,
    ModelRolloutStatus,
    VariantRef,
)
from model_rollouts.engine import rollout as engine
from model_rollouts.handlers import common
from model_rollouts.metrics.provider import MetricProvider, Result, render
from model_rollouts.traffic.router import RouterError

KIND = "ModelRollout"
logger = logging.getLogger("model_rollouts.rollout")
PHASES = ("Pending", "Progressing", "Paused", "Promoted", "RolledBack", "Aborted", "Invalid")
ANNOTATIONS = (ANNOTATION_PROMOTE, ANNOTATION_ABORT, ANNOTATION_RESUME)


def _placeholders(v: VariantRef, role: str, namespace: str, window: str) -> dict[str, str]:
    return {
        "variant": role,
        "service": v.service,
        "deployment": v.deployment or v.service,
        "namespace": namespace,
        "window": window,
    }


def _queries(spec: ModelRolloutSpec) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = [
        (f"spec.analysis.guardrails[{i}].query", g.query) for i, g in enumerate(spec.analysis.guardrails)
    ]
    for i, c in enumerate(spec.analysis.comparisons):
        out += [
            (f"spec.analysis.comparisons[{i}].{f}", getattr(c, f))
            for fs in common.METRIC_FIELDS.values()
            for f in fs
        ]
    return out


def measure(
    spec: ModelRolloutSpec, status: ModelRolloutStatus, provider: MetricProvider, namespace: str
) -> engine.Observations:
    window = spec.analysis.window
    cand = _placeholders(spec.candidate, "candidate", namespace, window)
    guardrails = {g.name: provider.query(render(g.query, cand)) for g in spec.analysis.guardrails}
    comparisons: dict[str, engine.ComparisonData] = {}
    if spec.analysis.comparisons:
        started = status.revisionStartedAt or common.now()
        since = format_duration((common.now() - started).total_seconds())
        for c in spec.analysis.comparisons:
            comparisons[c.name] = _comparison_data(
                c,
                provider,
                {
                    "stable": _placeholders(spec.stable, "stable", namespace, since),
                    "candidate": _placeholders(spec.candidate, "candidate", namespace, since),
                },
            )
    return engine.Observations(guardrails=guardrails, comparisons=comparisons)


def _comparison_data(
    c: Comparison, provider: MetricProvider, values: dict[str, dict[str, str]]
) -> engine.ComparisonData:
    stable, problem = common.read_counts(c, provider, values["stable"])
    if problem is None:
        candidate, problem = common.read_counts(c, provider, values["candidate"])
        if problem is None:
            return engine.ComparisonData(stable=stable, candidate=candidate)
        return engine.ComparisonData(problem=Result(problem.outcome, message=f"candidate {problem.message}"))
    return engine.ComparisonData(problem=Result(problem.outcome, message=f"stable {problem.message}"))


class RolloutController(common.Controller[ModelRolloutSpec, ModelRolloutStatus]):
    kind, plural, phases, annotations = KIND, PLURAL, PHASES, ANNOTATIONS
    terminal = TERMINAL_PHASES
    spec_model, status_model = ModelRolloutSpec, ModelRolloutStatus

    def queries(self, spec: ModelRolloutSpec) -> list[tuple[str, str | None]]:
        return _queries(spec)

    def services(self, spec: ModelRolloutSpec) -> list[str]:
        return [spec.stable.service, spec.candidate.service]

    def decide(
        self,
        spec: ModelRolloutSpec,
        status: ModelRolloutStatus,
        provider: MetricProvider,
        now: datetime,
        generation: int,
        annotations: dict[str, str],
    ) -> tuple[ModelRolloutStatus, list[object]]:
        observations = None
        if engine.needs_measurement(spec, status):
            observations = measure(spec, status, provider, self.namespace)
            self.count_errors(observations.guardrails.values())
        d = engine.reconcile(
            spec, status, now=now, generation=generation, annotations=annotations, observations=observations
        )
        return d.status, list(d.actions)

    def weights(
        self, spec: ModelRolloutSpec, status: ModelRolloutStatus
    ) -> tuple[dict[str, int], dict[str, int]]:
        w = status.weight
        return {spec.stable.service: 100 - w, spec.candidate.service: w}, {"stable": 100 - w, "candidate": w}


_controllers: dict[str, RolloutController] = {}


@kopf.timer(GROUP, VERSION, PLURAL, interval=0.5, sharp=False)
def rollout_timer(body: kopf.Body, namespace: str | None, name: str, uid: str, **_: Any) -> None:
    _controllers.setdefault(uid, RolloutController(namespace or "default", name)).wake(body)


@kopf.on.delete(GROUP, VERSION, PLURAL)
def rollout_deleted(spec: kopf.Spec, namespace: str | None, name: str, uid: str, **_: Any) -> None:
    """Finalizer: all traffic back to stable before the ModelRollout goes away."""
    _controllers.pop(uid, None)
    namespace = namespace or "default"
    telemetry.forget(KIND, namespace, name, PHASES, ["stable", "candidate"])
    try:
        s = ModelRolloutSpec.model_validate(dict(spec))
        router = common.make_router(s.trafficRouting, namespace)
        router.set_weights({s.stable.service: 100, s.candidate.service: 0})
        logger.info("%s/%s deleted: all traffic back to stable %s", namespace, name, s.stable.service)
    except (ValidationError, RouterError) as e:
        logger.warning("%s/%s deleted without restoring weights: %s", namespace, name, e)
