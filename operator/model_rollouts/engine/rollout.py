"""The ModelRollout state machine: a pure function (spec, status, observations, now) -> (status, actions).

No I/O happens here. The handler measures, calls :func:`reconcile`, then applies the actions
(weights, Events) and writes the returned status. Every transition is explained in status.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import datetime

from model_rollouts.api.common import (
    Condition,
    Measurement,
    dump,
    parse_duration,
    set_condition,
)
from model_rollouts.api.rollout import (
    ANNOTATION_ABORT,
    ANNOTATION_PROMOTE,
    ANNOTATION_RESUME,
    TERMINAL_PHASES,
    Comparison,
    ModelRolloutSpec,
    ModelRolloutStatus,
)
from model_rollouts.engine import stats
from model_rollouts.engine import status as status_
from model_rollouts.engine.actions import Event
from model_rollouts.engine.guardrails import evaluate, update_failures
from model_rollouts.metrics.provider import Result


@dataclass(frozen=True)
class ComparisonData:
    """Summed counts of one comparison for stable and candidate, or the measurement problem."""

    stable: stats.ProportionData | stats.MeanData | None = None
    candidate: stats.ProportionData | stats.MeanData | None = None
    problem: Result | None = None


@dataclass(frozen=True)
class Observations:
    guardrails: dict[str, Result] = field(default_factory=dict)
    comparisons: dict[str, ComparisonData] = field(default_factory=dict)


@dataclass(frozen=True)
class SetWeight:
    weight: int  # candidate percentage; stable gets the rest


Action = SetWeight | Event


@dataclass
class Decision:
    status: ModelRolloutStatus
    actions: list[Action]


def revision_of(spec: ModelRolloutSpec) -> str:
    """A rollout restarts from weight 0 when what it rolls out (stable or candidate) changes."""
    body = json.dumps({"stable": dump(spec.stable), "candidate": dump(spec.candidate)}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:10]


def needs_measurement(spec: ModelRolloutSpec, status: ModelRolloutStatus) -> bool:
    """Metrics are read only while the candidate gets traffic in an active rollout."""
    return (
        status.phase not in (*TERMINAL_PHASES, "Invalid")
        and status.weight > 0
        and status.revision == revision_of(spec)
    )


def reconcile(
    spec: ModelRolloutSpec,
    status: ModelRolloutStatus,
    *,
    now: datetime,
    generation: int,
    annotations: dict[str, str] | None = None,
    observations: Observations | None = None,
) -> Decision:
    s = status.model_copy(deep=True)
    actions: list[Action] = []
    ann = annotations or {}
    s.observedGeneration = generation
    s.conditions = set_condition(s.conditions, "Valid", "True", "SpecValid", "spec accepted", now, generation)

    rev = revision_of(spec)
    if s.revision != rev:
        reason = "Started" if s.revision is None else "NewRevision"
        msg = (
            f"rolling out {_variant(spec.candidate)} over {_variant(spec.stable)}"
            if reason == "Started"
            else f"candidate or stable changed (revision {s.revision} -> {rev}): restarting from weight 0"
        )
        old_handled = s.handled
        s = ModelRolloutStatus(
            revision=rev,
            revisionStartedAt=now,
            stepStartedAt=now,
            phase="Progressing",
            message=msg,
            observedGeneration=generation,
            conditions=s.conditions,
            history=s.history,
            handled=old_handled,
        )
        actions += [SetWeight(0), Event("Normal", reason, msg)]
        _history(s, now, reason, reason, msg)
        # Annotations present before this revision started were meant for an earlier one.
        s.handled.promote = ann.get(ANNOTATION_PROMOTE, s.handled.promote)
        s.handled.abort = ann.get(ANNOTATION_ABORT, s.handled.abort)
        s.handled.resume = ann.get(ANNOTATION_RESUME, s.handled.resume)
        if reason == "NewRevision":
            _conditions(s, now, generation)
            return Decision(s, actions)

    if s.phase in TERMINAL_PHASES:
        _conditions(s, now, generation)
        return Decision(s, actions)
    if s.phase == "Invalid":  # the spec became valid again: carry on where it stood
        s.phase = "Progressing"
        _history(s, now, "Valid", "SpecValid", "spec is valid again; resuming")

    # User actions, by annotation: each new value acts once.
    abort = ann.get(ANNOTATION_ABORT)
    if abort and abort != s.handled.abort:
        s.handled.abort = abort
        return _finish(
            s,
            actions,
            now,
            generation,
            "Aborted",
            0,
            "AbortRequested",
            f"aborted by annotation {ANNOTATION_ABORT}={abort}: all traffic back to stable",
        )
    promote = ann.get(ANNOTATION_PROMOTE)
    if promote and promote != s.handled.promote:
        s.handled.promote = promote
        return _finish(
            s,
            actions,
            now,
            generation,
            "Promoted",
            100,
            "PromoteRequested",
            f"promoted by annotation {ANNOTATION_PROMOTE}={promote}: skipping remaining steps",
        )

    # Measurements: guardrails at every interval, comparisons against stable.
    gate_ok = True
    hold_reasons: list[str] = []
    if observations is not None and s.weight > 0:
        s.lastAnalysisTime = now
        results = _analyse(spec, observations)
        s.lastAnalysis = results
        s.guardrailFailures = update_failures(
            s.guardrailFailures, [m for m in results if m.kind == "guardrail"]
        )
        for g in spec.analysis.guardrails:
            if s.guardrailFailures.get(g.name, 0) >= g.failureLimit:
                m = next(m for m in results if m.name == g.name and m.kind == "guardrail")
                return _finish(
                    s,
                    actions,
                    now,
                    generation,
                    "RolledBack",
                    0,
                    "GuardrailFailed",
                    f"guardrail {m.message}; {s.guardrailFailures[g.name]} consecutive breach(es) "
                    f"reached failureLimit {g.failureLimit}",
                    _values(results),
                )
        for m in results:
            if m.kind == "comparison" and m.verdict == "fail":
                return _finish(
                    s,
                    actions,
                    now,
                    generation,
                    "RolledBack",
                    0,
                    "ComparisonFailed",
                    f"candidate is worse than stable: {m.message}",
                    _values(results),
                )
        missing = [m for m in results if m.verdict in ("noData", "error")]
        if missing and spec.analysis.noData == "fail" and any(m.verdict == "noData" for m in missing):
            m = next(m for m in missing if m.verdict == "noData")
            return _finish(
                s,
                actions,
                now,
                generation,
                "RolledBack",
                0,
                "NoData",
                f"{m.message} and analysis.noData is fail",
                _values(results),
            )
        if missing:
            gate_ok = False
            hold_reasons += [m.message for m in missing]
        healthy = not missing
        s.conditions = set_condition(
            s.conditions,
            "Healthy",
            "True" if healthy else "Unknown",
            "AnalysisPassing"
            if healthy
            else ("MeasurementError" if any(m.verdict == "error" for m in missing) else "NoData"),
            "; ".join(m.message for m in results) or "no guardrails configured",
            now,
            generation,
        )
    elif s.weight > 0:
        gate_ok = False
        hold_reasons.append("waiting for the first analysis at this weight")

    # Pausing.
    if spec.paused:
        if s.phase != "Paused":
            actions.append(Event("Normal", "Paused", "paused by spec.paused"))
            _history(s, now, "Paused", "SpecPaused", "paused by spec.paused")
        s.phase, s.message = "Paused", f"paused by spec.paused at weight {s.weight}"
        _conditions(s, now, generation)
        return Decision(s, actions)
    if s.phase == "Paused" and s.currentStep < len(spec.steps) and spec.steps[s.currentStep].pause is None:
        s.phase = "Progressing"
        actions.append(Event("Normal", "Resumed", "spec.paused cleared"))
        _history(s, now, "Resumed", "SpecResumed", "spec.paused cleared")

    # Steps: advance while nothing blocks; at most one weight change per analysis.
    while True:
        if s.currentStep >= len(spec.steps):
            blocking = _required_not_passed(spec.analysis.comparisons, s.lastAnalysis)
            if not gate_ok or blocking:
                why = "; ".join(
                    hold_reasons + [f"{b} has not passed yet (requiredToPromote)" for b in blocking]
                )
                s.message = f"holding before promotion at weight {s.weight}: {why}"
                break
            if s.weight != 100:
                _set_weight(
                    s, actions, now, 100, "all steps done: full traffic to candidate before promotion"
                )
                break
            return _finish(
                s,
                actions,
                now,
                generation,
                "Promoted",
                100,
                "AnalysisPassed",
                "all steps completed with passing analysis",
                _values(s.lastAnalysis),
            )
        step = spec.steps[s.currentStep]
        if step.setWeight is not None:
            target = step.setWeight
            if s.weight == target:
                _advance(s, now)
                continue
            if s.weight > 0 and not gate_ok:
                s.message = f"holding at weight {s.weight} (step {s.currentStep}): {'; '.join(hold_reasons)}"
                break
            nxt = target
            if spec.maxWeightStep and abs(target - s.weight) > spec.maxWeightStep:
                nxt = s.weight + spec.maxWeightStep * (1 if target > s.weight else -1)
            _set_weight(
                s,
                actions,
                now,
                nxt,
                f"step {s.currentStep}: setWeight {target}"
                + (f" (split by maxWeightStep {spec.maxWeightStep})" if nxt != target else ""),
            )
            s.stepWeight = nxt if nxt != target else None
            if nxt == target:
                _advance(s, now)
            gate_ok = False  # the new weight must be analysed before anything else moves
            hold_reasons = [f"waiting for the first analysis at weight {nxt}"]
            break
        if step.pause is not None and step.pause.duration is None:
            resume = ann.get(ANNOTATION_RESUME)
            if resume and resume != s.handled.resume:
                s.handled.resume = resume
                actions.append(
                    Event("Normal", "Resumed", f"resumed by annotation {ANNOTATION_RESUME}={resume}")
                )
                _history(
                    s, now, "Resumed", "ResumeRequested", f"manual gate at step {s.currentStep} released"
                )
                s.phase = "Progressing"
                _advance(s, now)
                continue
            if s.phase != "Paused":
                actions.append(Event("Normal", "Paused", f"manual gate at step {s.currentStep}"))
                _history(s, now, "Paused", "ManualGate", f"waiting at step {s.currentStep} for a resume")
            s.phase = "Paused"
            s.message = (
                f"waiting at step {s.currentStep} (weight {s.weight}) for "
                f"`kubectl annotate mro ... {ANNOTATION_RESUME}=<token>`"
            )
            break
        duration = parse_duration((step.pause.duration if step.pause else step.analysis.duration) or "0s")  # type: ignore[union-attr]
        started = s.stepStartedAt or now
        elapsed = (now - started).total_seconds()
        kind = "pause" if step.pause else "analysis"
        if elapsed < duration:
            s.message = f"step {s.currentStep}: {kind} at weight {s.weight}, {duration - elapsed:.0f}s left"
            if hold_reasons:
                s.message += f" ({'; '.join(hold_reasons)})"
            break
        if not gate_ok and s.weight > 0:
            s.message = (
                f"holding at weight {s.weight} after {kind} step {s.currentStep}: {'; '.join(hold_reasons)}"
            )
            break
        _advance(s, now)

    s.phase = "Paused" if s.phase == "Paused" else "Progressing"
    _conditions(s, now, generation)
    return Decision(s, actions)


def _analyse(spec: ModelRolloutSpec, obs: Observations) -> list[Measurement]:
    out = [
        evaluate(g, obs.guardrails.get(g.name, Result("error", message="not measured")), "candidate")
        for g in spec.analysis.guardrails
    ]
    m = len(spec.analysis.comparisons)
    for c in spec.analysis.comparisons:
        out.append(_compare(c, obs.comparisons.get(c.name), spec.analysis.alpha / max(m, 1)))
    return out


def _compare(c: Comparison, data: ComparisonData | None, alpha: float) -> Measurement:
    if data is None or data.problem is not None or data.stable is None or data.candidate is None:
        problem = data.problem if data and data.problem else Result("error", message="not measured")
        verdict = "error" if problem.outcome == "error" else "noData"
        return Measurement(
            name=c.name,
            kind="comparison",
            variant="candidate",
            outcome=problem.outcome,
            verdict=verdict,
            message=f"{c.name}: {problem.message or problem.outcome}",
        )
    kwargs = {
        "alpha": alpha,
        "method": "sequential",
        "better": c.better,
        "test": "nonInferiority" if c.test == "nonInferiority" else "superiority",
        "margin": c.margin,
    }
    if isinstance(data.stable, stats.ProportionData) and isinstance(data.candidate, stats.ProportionData):
        r = stats.compare_proportions(data.stable, data.candidate, **kwargs)  # type: ignore[arg-type]
    elif isinstance(data.stable, stats.MeanData) and isinstance(data.candidate, stats.MeanData):
        r = stats.compare_means(data.stable, data.candidate, **kwargs)  # type: ignore[arg-type]
    else:
        return Measurement(
            name=c.name,
            kind="comparison",
            outcome="error",
            verdict="error",
            message=f"{c.name}: stable and candidate data differ in type",
        )
    details = {
        "stable": r.control_estimate,
        "candidate": r.treatment_estimate,
        "stableN": r.control_n,
        "candidateN": r.treatment_n,
        "difference": r.difference,
        "ciLow": r.ci_low,
        "ciHigh": r.ci_high,
        "pValue": r.p_value,
        "alpha": alpha,
    }
    # Status is JSON: an unbounded interval end (no data yet for a mean) is left out, not written as inf.
    details = {k: v for k, v in details.items() if math.isfinite(v)}
    return Measurement(
        name=c.name,
        kind="comparison",
        variant="candidate",
        outcome="value",
        value=r.difference if math.isfinite(r.difference) else None,
        threshold=f"{c.test} margin {c.margin:g}, alpha {alpha:.4g}",
        verdict=r.verdict,
        message=f"{c.name}: {r.reason}",
        details=details,
    )


def _required_not_passed(comparisons: list[Comparison], last: list[Measurement]) -> list[str]:
    verdicts = {m.name: m.verdict for m in last if m.kind == "comparison"}
    return [c.name for c in comparisons if c.requiredToPromote and verdicts.get(c.name) != "pass"]


def _values(results: list[Measurement]) -> dict[str, float]:
    return {m.name: m.value for m in results if m.value is not None}


def _variant(v: object) -> str:
    svc = getattr(v, "service", "?")
    ver = getattr(v, "modelVersion", None)
    return f"{svc}" + (f" ({ver})" if ver else "")


def _advance(s: ModelRolloutStatus, now: datetime) -> None:
    s.currentStep += 1
    s.stepStartedAt = now
    s.stepWeight = None


def _set_weight(s: ModelRolloutStatus, actions: list[Action], now: datetime, weight: int, why: str) -> None:
    msg = f"weight {s.weight} -> {weight}: {why}"
    s.weight = weight
    s.message = msg
    actions += [SetWeight(weight), Event("Normal", "WeightChanged", msg)]
    _history(s, now, "WeightChanged", "StepAdvanced", msg)


def _finish(
    s: ModelRolloutStatus,
    actions: list[Action],
    now: datetime,
    generation: int,
    phase: str,
    weight: int,
    reason: str,
    message: str,
    values: dict[str, float] | None = None,
) -> Decision:
    s.phase = phase  # type: ignore[assignment]
    s.weight = weight
    s.stepWeight = None
    s.message = message
    actions += [SetWeight(weight), Event("Warning" if phase != "Promoted" else "Normal", phase, message)]
    _history(s, now, phase, reason, message, values)
    _conditions(s, now, generation, reason)
    return Decision(s, actions)


def _history(
    s: ModelRolloutStatus,
    now: datetime,
    event: str,
    reason: str,
    message: str,
    values: dict[str, float] | None = None,
) -> None:
    status_.record(s, now, event, reason, message, values, weight=s.weight, step=s.currentStep)


def _conditions(s: ModelRolloutStatus, now: datetime, generation: int, reason: str | None = None) -> None:
    c: list[Condition] = s.conditions
    done = s.phase in TERMINAL_PHASES
    c = set_condition(c, "Progressing", "False" if done else "True", s.phase, s.message, now, generation)
    c = set_condition(c, "Completed", "True" if done else "False", s.phase, s.message, now, generation)
    if s.phase == "RolledBack":
        c = set_condition(c, "Healthy", "False", reason or "RolledBack", s.message, now, generation)
    s.conditions = c
