"""Thin Kopf handlers for ModelRollout: read, measure, ask the engine, apply, write status."""

from __future__ import annotations

import logging
import time
from typing import Any

import kopf
from pydantic import ValidationError

from model_rollouts import telemetry
from model_rollouts.api.common import GROUP, VERSION, dump, format_duration, parse_duration
from model_rollouts.api.rollout import (
    ANNOTATION_ABORT,
    ANNOTATION_PROMOTE,
    ANNOTATION_RESUME,
    PLURAL,
    Comparison,
    ModelRolloutSpec,
    ModelRolloutStatus,
    VariantRef,
)
from model_rollouts.engine import rollout as engine
from model_rollouts.engine import stats
from model_rollouts.handlers import common
from model_rollouts.metrics.provider import MetricProvider, Result, TemplateError, check_template, render
from model_rollouts.traffic.router import RouterError

KIND = "ModelRollout"
logger = logging.getLogger("model_rollouts.rollout")
PHASES = ("Pending", "Progressing", "Paused", "Promoted", "RolledBack", "Aborted", "Invalid")
ANNOTATIONS = (ANNOTATION_PROMOTE, ANNOTATION_ABORT, ANNOTATION_RESUME)


def _placeholders(v: VariantRef, role: str, namespace: str, window: str) -> dict[str, str]:
    return {"variant": role, "service": v.service, "deployment": v.deployment or v.service,
            "namespace": namespace, "window": window}


def _check_templates(spec: ModelRolloutSpec) -> None:
    for i, g in enumerate(spec.analysis.guardrails):
        try:
            check_template(g.query)
        except TemplateError as e:
            raise RouterError(f"spec.analysis.guardrails[{i}].query", str(e)) from e
    for i, c in enumerate(spec.analysis.comparisons):
        for f in ("successes", "trials", "sum", "count", "sumSquares"):
            q = getattr(c, f)
            if q:
                try:
                    check_template(q)
                except TemplateError as e:
                    raise RouterError(f"spec.analysis.comparisons[{i}].{f}", str(e)) from e


def measure(spec: ModelRolloutSpec, status: ModelRolloutStatus, provider: MetricProvider,
            namespace: str) -> engine.Observations:
    window = spec.analysis.window
    cand = _placeholders(spec.candidate, "candidate", namespace, window)
    guardrails = {g.name: provider.query(render(g.query, cand)) for g in spec.analysis.guardrails}
    comparisons: dict[str, engine.ComparisonData] = {}
    if spec.analysis.comparisons:
        started = status.revisionStartedAt or common.now()
        since = format_duration((common.now() - started).total_seconds())
        for c in spec.analysis.comparisons:
            comparisons[c.name] = _comparison_data(c, provider, {
                "stable": _placeholders(spec.stable, "stable", namespace, since),
                "candidate": _placeholders(spec.candidate, "candidate", namespace, since)})
    return engine.Observations(guardrails=guardrails, comparisons=comparisons)


def _comparison_data(c: Comparison, provider: MetricProvider,
                     values: dict[str, dict[str, str]]) -> engine.ComparisonData:
    fields = ("successes", "trials") if c.type == "proportion" else ("count", "sum", "sumSquares")
    got: dict[str, list[float]] = {}
    for role in ("stable", "candidate"):
        nums = []
        for f in fields:
            r = provider.query(render(getattr(c, f), values[role]))
            if r.outcome == "noData":  # a counter that never moved reads as zero events
                r = Result("value", 0.0)
            if not r.ok or r.value is None:
                return engine.ComparisonData(problem=Result(r.outcome, message=f"{role} {f}: {r.message}"))
            nums.append(max(0.0, r.value))
        got[role] = nums
    if c.type == "proportion":
        s, t = got["stable"], got["candidate"]
        return engine.ComparisonData(stable=stats.ProportionData(min(s[0], s[1]), s[1]),
                                     candidate=stats.ProportionData(min(t[0], t[1]), t[1]))
    s, t = got["stable"], got["candidate"]
    return engine.ComparisonData(stable=stats.MeanData(s[0], s[1], s[2]), candidate=stats.MeanData(t[0], t[1], t[2]))


class RolloutController:
    """Runs one ModelRollout: a tick at every analysis interval, and at once on a spec or annotation change."""

    def __init__(self, namespace: str, name: str) -> None:
        self.namespace, self.name = namespace, name
        self._last_key: tuple[Any, ...] | None = None
        self._last_tick = 0.0

    def due(self, obj: dict[str, Any]) -> bool:
        meta = obj["metadata"]
        key = (meta.get("generation"), tuple((meta.get("annotations") or {}).get(a) for a in ANNOTATIONS))
        if key != self._last_key:
            self._last_key = key
            return True
        try:
            interval = parse_duration(obj["spec"]["analysis"]["interval"])
        except (KeyError, TypeError, ValueError):
            interval = 30.0
        phase = (obj.get("status") or {}).get("phase")
        if phase in ("Promoted", "RolledBack", "Aborted"):
            interval = max(interval, 60.0)  # only re-assert weights
        return time.monotonic() - self._last_tick >= interval

    def tick(self, obj: dict[str, Any]) -> None:
        t0 = time.monotonic()
        self._last_tick = t0
        meta = obj["metadata"]
        generation = int(meta.get("generation") or 0)
        status = ModelRolloutStatus.model_validate(
            {k: v for k, v in (obj.get("status") or {}).items() if k != "kopf"})
        now = common.now()
        try:
            spec = ModelRolloutSpec.model_validate(obj["spec"])
        except ValidationError as e:
            return self._apply(obj, engine.invalid(status, common.validation_message(e), now, generation), None, None)
        try:
            _check_templates(spec)
            router = common.make_router(spec.trafficRouting, self.namespace)
            router.check([spec.stable.service, spec.candidate.service])
            provider = common.make_provider(spec.analysis.prometheus, self.namespace)
        except RouterError as e:
            return self._apply(obj, engine.invalid(status, str(e), now, generation), None, None)
        observations = None
        if engine.needs_measurement(spec, status):
            observations = measure(spec, status, provider, self.namespace)
            errors = sum(1 for r in observations.guardrails.values() if r.outcome == "error")
            if errors:
                telemetry.MEASUREMENT_ERRORS.labels(KIND, self.namespace, self.name).inc(errors)
        decision = engine.reconcile(spec, status, now=now, generation=generation,
                                    annotations=meta.get("annotations") or {}, observations=observations)
        self._apply(obj, decision, spec, router)
        telemetry.ANALYSIS_SECONDS.labels(KIND).observe(time.monotonic() - t0)

    def _apply(self, obj: dict[str, Any], decision: engine.Decision, spec: ModelRolloutSpec | None,
               router: Any) -> None:
        s = decision.status
        if not common.write_status(PLURAL, obj, dump(s)):
            self._last_key = None  # conflict: read again and redo at the next wake-up
            return
        if spec is not None and router is not None:
            want = {spec.stable.service: 100 - s.weight, spec.candidate.service: s.weight}
            current = router.get_weights()
            if any(current.get(svc) != w for svc, w in want.items()):
                router.set_weights(want)
            telemetry.WEIGHT.labels(KIND, self.namespace, self.name, "stable").set(100 - s.weight)
            telemetry.WEIGHT.labels(KIND, self.namespace, self.name, "candidate").set(s.weight)
        for a in decision.actions:
            if isinstance(a, engine.Event):
                common.post_event(obj, a.type, a.reason, a.message)
                telemetry.DECISIONS.labels(KIND, self.namespace, self.name, a.reason).inc()
                log = logger.warning if a.type == "Warning" else logger.info
                log("%s/%s %s: %s", self.namespace, self.name, a.reason, a.message)
        telemetry.set_phase(KIND, self.namespace, self.name, s.phase, PHASES)


_controllers: dict[str, RolloutController] = {}


@kopf.timer(GROUP, VERSION, PLURAL, interval=0.5, sharp=False)
def rollout_timer(namespace: str, name: str, uid: str, **_: Any) -> None:
    """Wakes often but cheaply; the controller ticks at the analysis interval or on a change."""
    ctl = _controllers.setdefault(uid, RolloutController(namespace, name))
    try:
        obj = common.get_object(PLURAL, namespace, name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return
        if ctl.due(obj):
            ctl.tick(obj)
    except Exception as e:  # noqa: BLE001 - keep going; the next wake-up tries again
        logger.exception("%s/%s tick failed: %s", namespace, name, e)
        ctl._last_key = None


@kopf.on.delete(GROUP, VERSION, PLURAL)
def rollout_deleted(spec: dict[str, Any], namespace: str, name: str, uid: str, **_: Any) -> None:
    """Finalizer: all traffic back to stable before the ModelRollout goes away."""
    _controllers.pop(uid, None)
    telemetry.forget(KIND, namespace, name, PHASES, ["stable", "candidate"])
    try:
        s = ModelRolloutSpec.model_validate(spec)
        router = common.make_router(s.trafficRouting, namespace)
        router.set_weights({s.stable.service: 100, s.candidate.service: 0})
        logger.info("%s/%s deleted: all traffic back to stable %s", namespace, name, s.stable.service)
    except (ValidationError, RouterError) as e:
        logger.warning("%s/%s deleted without restoring weights: %s", namespace, name, e)
