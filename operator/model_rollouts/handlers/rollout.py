"""Thin Kopf handlers for ModelRollout: read, measure, ask the engine, apply, write status."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import kopf

from model_rollouts.analysis import segments, stats
from model_rollouts.analysis.delay import label_window
from model_rollouts.api.common import GROUP, VERSION, format_duration, parse_duration
from model_rollouts.api.notification import Gate
from model_rollouts.api.rollout import (
    ANNOTATION_ABORT,
    ANNOTATION_PROMOTE,
    ANNOTATION_PROMOTE_FULL,
    ANNOTATION_RESUME,
    ANNOTATION_RETRY,
    LABEL_DELAY_SLOT,
    PLURAL,
    SEGMENT_SLOT,
    TERMINAL_PHASES,
    Comparison,
    ModelRolloutSpec,
    ModelRolloutStatus,
    VariantRef,
)
from model_rollouts.engine import post
from model_rollouts.engine import rollout as engine
from model_rollouts.handlers import common, scheduler
from model_rollouts.handlers.controller import Controller
from model_rollouts.handlers.judges import judge_queries, measure_judges
from model_rollouts.kube.readiness import service_ready
from model_rollouts.metrics.batch import in_one_request
from model_rollouts.metrics.provider import MetricProvider, Result, render
from model_rollouts.notify import sender as notify_sender
from model_rollouts.traffic import registry
from model_rollouts.traffic.router import CANDIDATE, RETIRED, Arm, Mirror

KIND = "ModelRollout"
logger = logging.getLogger("model_rollouts.rollout")
PHASES = (
    "Pending",
    "Progressing",
    "Paused",
    "Baking",
    "Promoted",
    "RolledBack",
    "Aborted",
    "Invalid",
    "Idle",
)
ANNOTATIONS = (
    ANNOTATION_PROMOTE,
    ANNOTATION_PROMOTE_FULL,
    ANNOTATION_ABORT,
    ANNOTATION_RESUME,
    ANNOTATION_RETRY,
)


def _placeholders(v: VariantRef, role: str, namespace: str, window: str) -> dict[str, str]:
    return {
        "variant": role,
        "service": v.service,
        "deployment": v.deployment or v.service,
        "namespace": namespace,
        "window": window,
    }


def resolve(spec: ModelRolloutSpec, namespace: str) -> ModelRolloutSpec:
    """The spec with every templateRef replaced by its template's queries (ProviderError naming the field)."""
    a = spec.analysis
    if not (any(g.templateRef for g in a.guardrails) or any(c.templateRef for c in a.comparisons)):
        return spec
    guardrails = [
        common.resolve_metric(g, f"spec.analysis.guardrails[{i}]", namespace, ("query",))
        for i, g in enumerate(a.guardrails)
    ]
    comparisons = [
        common.resolve_metric(c, f"spec.analysis.comparisons[{i}]", namespace, common.METRIC_FIELDS[c.type])
        for i, c in enumerate(a.comparisons)
    ]
    analysis = a.model_copy(update={"guardrails": guardrails, "comparisons": comparisons})
    return spec.model_copy(update={"analysis": analysis})


def _queries(spec: ModelRolloutSpec, namespace: str = "default") -> list[tuple[str, str | None]]:
    spec = resolve(spec, namespace)
    out: list[tuple[str, str | None]] = [
        (f"spec.analysis.guardrails[{i}].query", g.query) for i, g in enumerate(spec.analysis.guardrails)
    ]
    for i, c in enumerate(spec.analysis.comparisons):
        out += [
            (f"spec.analysis.comparisons[{i}].{f}", _segment_free(c, getattr(c, f)))
            for fs in common.METRIC_FIELDS.values()
            for f in fs
        ]
    out += judge_queries(spec.analysis)
    return out + _post_queries(spec, namespace)


def _post_queries(spec: ModelRolloutSpec, namespace: str) -> list[tuple[str, str | None]]:
    """The queries of spec.postPromotion (its own guardrails and comparisons), named by their field."""
    pp = spec.postPromotion
    if pp is None:
        return []
    at = "spec.postPromotion"
    gs = [
        common.resolve_metric(g, f"{at}.guardrails[{i}]", namespace, ("query",))
        for i, g in enumerate(pp.guardrails)
    ]
    out: list[tuple[str, str | None]] = [(f"{at}.guardrails[{i}].query", g.query) for i, g in enumerate(gs)]
    for i, c in enumerate(pp.comparisons):
        c = common.resolve_metric(c, f"{at}.comparisons[{i}]", namespace, common.METRIC_FIELDS[c.type])
        out += [
            (f"{at}.comparisons[{i}].{f}", _segment_free(c, getattr(c, f)))
            for fs in common.METRIC_FIELDS.values()
            for f in fs
        ]
    return out


def _segment_free(c: Comparison, query: str | None) -> str | None:
    """A comparison's query with the placeholders only it has set aside for the template check:
    {{ segment }} (with segments, filled per segment) and {{ labelDelay }} (with labelDelay)."""
    if query and c.segments is not None:
        query = SEGMENT_SLOT.sub("segment", query)
    if query and c.labelDelay is not None:
        query = LABEL_DELAY_SLOT.sub("0s", query)
    return query


def measure(
    spec: ModelRolloutSpec,
    status: ModelRolloutStatus,
    provider: MetricProvider,
    namespace: str,
    now: datetime | None = None,
) -> engine.Observations:
    """Guardrails on the candidate over ``analysis.window``; comparisons within the current epoch
    (as of ``now``, default the clock's: every window of one analysis is rendered from one instant)."""
    now = now or common.now()
    spec = resolve(spec, namespace)
    window = spec.analysis.window
    stable = status.stableService or spec.stable.service
    stable_ref = spec.stable if stable == spec.stable.service else VariantRef(service=stable)
    cand = _placeholders(spec.candidate, "candidate", namespace, window)
    guardrails = {g.name: provider.query(render(g.query or "", cand)) for g in spec.analysis.guardrails}
    comparisons: dict[str, engine.ComparisonData] = {}
    if spec.analysis.comparisons and engine.measure_comparisons(status):
        started = status.epochStartedAt or status.revisionStartedAt or now
        for c in spec.analysis.comparisons:
            refs = {"stable": stable_ref, "candidate": spec.candidate}
            comparisons.update(_measure_comparison(c, provider, refs, namespace, started, now))
    judges = None
    # Below weight 100 while rolling out (a shadow step included); not after promotion (bake, holdout).
    judged_now = status.weight < 100 and status.phase != post.PHASE
    if (spec.analysis.predictionShift or spec.analysis.calibration) and judged_now:
        started = status.epochStartedAt or status.revisionStartedAt or now
        since = format_duration((now - started).total_seconds())
        arms = {
            "stable": _placeholders(stable_ref, "stable", namespace, since),
            "candidate": _placeholders(spec.candidate, "candidate", namespace, since),
        }
        # In a shadow step the candidate's answers are labelled by no one: no calibration query.
        judged = (
            spec.analysis.model_copy(update={"calibration": []})
            if engine.in_shadow(status)
            else spec.analysis
        )
        judges = measure_judges(judged, provider, arms["stable"], {"candidate": arms["candidate"]})[
            "candidate"
        ]
    return engine.Observations(
        guardrails=guardrails,
        comparisons=comparisons,
        candidate_ready=candidate_ready(spec, namespace),
        judges=judges,
    )


def _measure_comparison(
    c: Comparison,
    provider: MetricProvider,
    refs: dict[str, VariantRef],
    namespace: str,
    started: datetime,
    now: datetime,
) -> dict[str, engine.ComparisonData]:
    """One comparison's counts in the current epoch (and its segments').

    With ``labelDelay`` the windows are ``analysis.delay``'s: ``{{ window }}`` spans the labels that
    arrived after the epoch start plus the delay, and ``{{ labelDelay }}`` (the trials query's
    ``offset``) shifts the trials' window back by the delay. Before the first labels of the epoch
    are complete there are no counts to compare (zero: no verdict), and nothing is queried.
    """
    since, extra = format_duration((now - started).total_seconds()), {}
    if c.labelDelay:
        win = label_window(started, now, parse_duration(c.labelDelay))
        if win is None:
            zero = engine.ComparisonData(stable=_zero(c), candidate=_zero(c))
            keys = [c.name] + [
                segments.segment_key(c.name, v) for v in (c.segments.values if c.segments else [])
            ]
            return dict.fromkeys(keys, zero)
        since, extra = (
            format_duration(win.seconds),
            {"labelDelay": format_duration(win.trials_offset_seconds)},
        )
    arms = {role: {**_placeholders(ref, role, namespace, since), **extra} for role, ref in refs.items()}
    if c.segments is None:
        return {c.name: _comparison_data(c, provider, arms)}
    return _segment_data(c, provider, arms)


def _zero(c: Comparison) -> stats.ProportionData | stats.MeanData:
    return stats.ProportionData(0.0, 0.0) if c.type == "proportion" else stats.MeanData(0.0, 0.0, 0.0)


def candidate_ready(spec: ModelRolloutSpec, namespace: str) -> bool | None:
    """False when the candidate Service has EndpointSlices and none has a ready endpoint; None if unknown."""
    return service_ready(namespace, spec.candidate.service)


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


def _segment_data(
    c: Comparison, provider: MetricProvider, arms: dict[str, dict[str, str]]
) -> dict[str, engine.ComparisonData]:
    """Each segment's counts (under ``segments.segment_key``) and the comparison's: their sum.

    A segment that cannot be measured makes the whole comparison unmeasured (no data is not zero).
    """
    assert c.segments is not None
    out: dict[str, engine.ComparisonData] = {}
    pooled: engine.ComparisonData | None = None
    for v in c.segments.values:
        d = _comparison_data(c, provider, {k: {**a, "segment": v} for k, a in arms.items()})
        out[segments.segment_key(c.name, v)] = d
        if d.problem is not None or d.stable is None or d.candidate is None:
            problem = d.problem or Result("error", message="not measured")
            msg = f"{c.segments.label} {v}: {problem.message}"
            out[c.name] = engine.ComparisonData(problem=Result(problem.outcome, message=msg))
            return out
        pooled = (
            d
            if pooled is None or pooled.stable is None or pooled.candidate is None
            else engine.ComparisonData(
                stable=segments.add(pooled.stable, d.stable),
                candidate=segments.add(pooled.candidate, d.candidate),
            )
        )
    assert pooled is not None
    out[c.name] = pooled
    return out


class RolloutController(Controller[ModelRolloutSpec, ModelRolloutStatus]):
    kind, plural, phases, annotations = KIND, PLURAL, PHASES, ANNOTATIONS
    terminal = TERMINAL_PHASES
    spec_model, status_model = ModelRolloutSpec, ModelRolloutStatus

    def queries(self, spec: ModelRolloutSpec) -> list[tuple[str, str | None]]:
        return _queries(spec, self.namespace)

    def arms(self, spec: ModelRolloutSpec, status: ModelRolloutStatus) -> list[Arm]:
        # The serving stable (spec.stable only before the first revision) and the candidate must be in
        # the route; retired services of an earlier revision may have left it.
        return [
            Arm("stable", status.stableService or spec.stable.service),
            Arm("candidate", spec.candidate.service),
        ]

    def arm_weights(
        self, spec: ModelRolloutSpec, status: ModelRolloutStatus, per_service: Mapping[str, int]
    ) -> dict[Arm, int]:
        roles = {a.backend: a.role for a in reversed(self.arms(spec, status))}  # stable wins a tie
        return {Arm(roles.get(svc, RETIRED), svc): w for svc, w in per_service.items()}

    def due(self, spec: ModelRolloutSpec, status: ModelRolloutStatus, now: datetime) -> bool:
        return engine.needs_measurement(spec, status, now)

    def observe(
        self, spec: ModelRolloutSpec, status: ModelRolloutStatus, provider: MetricProvider, now: datetime
    ) -> engine.Observations | None:
        if not self.due(spec, status, now):  # pacing lives in status
            return None
        # In the bake and holdout, the post-promotion guardrails and comparisons (engine/post.py).
        measured = post.measured_spec(spec, status)

        def run() -> engine.Observations:  # in the tenant's pool; its queries in one request
            at = common.now()
            return in_one_request(provider, lambda p: measure(measured, status, p, self.namespace, at))

        observations = self.measured(provider, run)
        self.count_errors(observations.guardrails.values())
        self.count_errors(d.problem for d in observations.comparisons.values() if d.problem is not None)
        return observations

    def decide(
        self,
        spec: ModelRolloutSpec,
        status: ModelRolloutStatus,
        observations: engine.Observations | None,
        now: datetime,
        generation: int,
        annotations: dict[str, str],
    ) -> tuple[ModelRolloutStatus, list[object]]:
        d = engine.reconcile(
            spec, status, now=now, generation=generation, annotations=annotations, observations=observations
        )
        if d.asks:  # the engine would move past a gate: ask it, then decide with its answer
            answers = {
                g.name: self.ask_gate(g, spec, status, d.status) for g in spec.gates if g.name in d.asks
            }
            d = engine.reconcile(
                spec,
                status,
                now=now,
                generation=generation,
                annotations=annotations,
                observations=observations,
                gates=answers,
            )
        return d.status, list(d.actions)

    def ask_gate(
        self, gate: Gate, spec: ModelRolloutSpec, status: ModelRolloutStatus, held: ModelRolloutStatus
    ) -> engine.GateAnswer:
        """POST the gate request to the gate's provider (bounded by its timeout); any failure is closed,
        a gate still answering another object's request is busy (a hold, not closed)."""
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "GateRequest",
            "gate": gate.name,
            "type": gate.type,
            "object": {"kind": KIND, "namespace": self.namespace, "name": self.name},
            "phase": held.phase,
            "revision": held.revision,
            "weight": held.weight,
            "candidate": spec.candidate.service,
            "stable": held.stableService or spec.stable.service,
        }
        reply = notify_sender.ask(gate.provider, body, self.namespace)
        return engine.GateAnswer(open=reply.open, message=reply.message, busy=reply.busy)

    def weights(
        self, spec: ModelRolloutSpec, status: ModelRolloutStatus
    ) -> tuple[dict[Arm, int], dict[str, int]] | None:
        if status.phase == "Invalid" or status.revision is None:
            return None
        w = self.arm_weights(spec, status, engine.route_weights(spec, status))
        cw = engine.candidate_weight(status)
        return w, {"stable": 100 - cw, "candidate": cw}

    def mirror(self, spec: ModelRolloutSpec, status: ModelRolloutStatus) -> Mirror | None:
        m = engine.route_mirror(spec, status)
        return None if m is None else Mirror(Arm(CANDIDATE, m[0]), m[1])

    def next_due(self, spec: ModelRolloutSpec, status: ModelRolloutStatus) -> datetime | None:
        return engine.next_due(spec, status)

    def guard_weights(self, spec: ModelRolloutSpec, status: ModelRolloutStatus) -> dict[str, int] | None:
        return engine.guard_weights(spec, status)

    def deletion_weights(self, spec: ModelRolloutSpec, status: ModelRolloutStatus) -> dict[str, int] | None:
        return engine.deletion_weights(spec, status)

    @staticmethod
    def active(spec: Mapping[str, Any], status: Mapping[str, Any], annotations: Mapping[str, str]) -> bool:
        return engine.active(spec, status, annotations)


_controllers: dict[str, RolloutController] = {}


def _controller(namespace: str | None, name: str, uid: str) -> RolloutController:
    return _controllers.setdefault(uid, RolloutController(namespace or "default", name))


@kopf.index(GROUP, VERSION, PLURAL)
def rollout_routes(body: kopf.Body, **_: Any) -> dict[tuple[str, str, int], registry.RouteClaim] | None:
    """Which route rule each ModelRollout claims, kept from the watch (the one-owner check
    reads it instead of listing every object of the namespace)."""
    return registry.route_claim(KIND, body)


# No Kopf timer per object: the one scheduler wakes it from the watch (handlers/shards.py feeds it).
scheduler.SCHEDULER.register(
    scheduler.Kind(PLURAL, _controller, engine.active, lambda uid: _controllers.pop(uid, None))
)


@kopf.on.delete(GROUP, VERSION, PLURAL)
def rollout_deleted(
    spec: kopf.Spec, status: kopf.Status, namespace: str | None, name: str, uid: str, retry: int, **_: Any
) -> None:
    """Finalizer: traffic back to stable only while a rollout is in progress (or revertOnDeletion)."""
    _controller(namespace, name, uid).delete(spec, status, retry)
    _controllers.pop(uid, None)
