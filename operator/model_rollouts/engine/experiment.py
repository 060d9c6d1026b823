"""The ModelExperiment state machine: a pure function (spec, status, observations, now) -> (status, actions).

No I/O happens here. The handler measures every variant's primary metric (cumulative since the
experiment started) and guardrails, calls :func:`reconcile`, then applies the actions (weights per
Service, Events) and writes the returned status. Every transition is explained in status.

Rules, in the order they are applied at each analysis:

1. Guardrails run per active variant, also while paused (they protect users, not the experiment).
   A non-control variant reaching ``failureLimit`` consecutive breaches is dropped: weight 0,
   ``active: false``; its weight goes to the other active variants (fixed: proportionally to their
   configured weights; thompson: the bandit excludes it). A breaching control leaves no safe
   variant: with ``onFailure: rollback`` the experiment is RolledBack with all traffic to the control;
   with ``keep`` it only warns. With ``analysis.noData: fail`` a guardrail that cannot be measured
   counts as a breach.
2. Sample-ratio mismatch (fixed allocation only: under thompson the weights move every interval, so
   the expected split is not one set of weights): Pearson chi-square of the samples each active
   variant received since the split last changed, against the weights in force. Checked once every
   active variant has ``max(SRM_MIN_SAMPLES, minSamplesPerVariant / 2)`` such samples; below
   ``stoppingRules.srmAlpha`` the experiment pauses (weights unchanged) until the
   ``mlrollouts.io/resume`` annotation is set, which also restarts the SRM count.
3. The decision, once every active variant has ``minSamplesPerVariant`` samples (fixedHorizon: the
   planned sample size, since that test is valid at one look only): every active non-control variant
   is compared with the control, p-values are Holm-adjusted across variants (frequentist methods);
   the winner is the best variant that is significantly better (bayesian: probability to be best of
   at least ``successCriteria.probabilityToBeBest``). Futility (sequential/bayesian intervals that
   exclude an improvement of the MDE for every variant) and the sample cap or ``maxDuration`` stop
   the experiment without a winner. Without a winner no variant is ever promoted.
4. Conclusion: ``onSuccess: promoteWinner`` sends all traffic to the winner, or back to the control
   when there is none (decision ``noWinner`` or ``futile``): a null result is not a failure, so the
   phase is Concluded. ``onSuccess: keep`` concludes without moving traffic.

State lives in status fields, so a restart of the operator resumes exactly where it stood:
``revision`` (what is being compared: a change restarts the experiment from scratch, like a new
rollout revision), ``handled`` (the annotation values already acted on; values present when an
experiment or a new revision starts are recorded and not acted on) and ``srmBaseline``/``srmSince``
(the sample counts when the split last changed). ``history`` is a bounded, purely informational log:
nothing is ever read back from it.
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
    get_condition,
    parse_duration,
    set_condition,
)
from model_rollouts.api.experiment import (
    TERMINAL_PHASES,
    ModelExperimentSpec,
    ModelExperimentStatus,
    Variant,
    VariantStatus,
)
from model_rollouts.engine import bandit, stats
from model_rollouts.engine import status as status_
from model_rollouts.engine.actions import Event
from model_rollouts.engine.guardrails import evaluate, update_failures
from model_rollouts.metrics.provider import Result

# The same annotations as ModelRollout (the kubectl plugin sets them on either kind).
ANNOTATION_ABORT = "mlrollouts.io/abort"
ANNOTATION_RESUME = "mlrollouts.io/resume"

HISTORY_LIMIT = status_.HISTORY_LIMIT
#: SRM is never tested before each active variant has this many samples since the split changed.
SRM_MIN_SAMPLES = 20
#: Reasons on the Progressing condition.
SRM_REASON = "SampleRatioMismatch"

Data = stats.ProportionData | stats.MeanData


@dataclass(frozen=True)
class VariantObservation:
    """What was measured for one variant at one analysis.

    ``primary``: the primary metric's sums, cumulative since ``status.startedAt`` (its trials/count is
    also the traffic count for SRM); or ``problem``: why it could not be measured (``noData`` or
    ``error`` outcome). ``guardrails``: one Result per guardrail name, for active variants.
    """

    primary: Data | None = None
    problem: Result | None = None
    guardrails: dict[str, Result] = field(default_factory=dict)
    requests: float | None = None  # from analysis.requests, when set and measured


@dataclass(frozen=True)
class Observations:
    variants: dict[str, VariantObservation] = field(default_factory=dict)


@dataclass(frozen=True)
class SetWeights:
    weights: dict[str, int]  # per variant Service; sums to 100


Action = SetWeights | Event


@dataclass
class Decision:
    status: ModelExperimentStatus
    actions: list[Action]


# --------------------------------------------------------------------------- spec helpers


def control_of(spec: ModelExperimentSpec) -> Variant:
    return next(v for v in spec.variants if v.control)


def validate(spec: ModelExperimentSpec) -> str | None:
    """What the CRD's CEL rules check, for when they were not applied, plus what only we can judge.

    Returns a message naming the field, or None.
    """
    controls = [i for i, v in enumerate(spec.variants) if v.control]
    if len(controls) != 1:
        return f"spec.variants: exactly one variant must be the control (found {len(controls)})"
    for attr in ("name", "service"):
        seen: set[str] = set()
        for i, v in enumerate(spec.variants):
            value = getattr(v, attr)
            if value in seen:
                return (
                    f"spec.variants[{i}].{attr}: {value!r} is used by another variant; {attr}s must be unique"
                )
            seen.add(value)
    if any(v.weight is not None for v in spec.variants):
        total = sum(v.weight or 0 for v in spec.variants)
        if total != 100:
            return f"spec.variants[].weight: weights must sum to 100 when set (they sum to {total})"
        ci = controls[0]
        if not spec.variants[ci].weight:
            return f"spec.variants[{ci}].weight: the control needs a weight above 0 to be compared with"
        if not any(v.weight for v in spec.variants if not v.control):
            return "spec.variants[].weight: at least one non-control variant needs a weight above 0"
    pm = spec.primaryMetric
    needed = ("successes", "trials") if pm.type == "proportion" else ("sum", "count", "sumSquares")
    for f in needed:
        if not getattr(pm, f):
            return f"spec.primaryMetric.{f}: a {pm.type} metric needs the {', '.join(needed)} queries"
    sr = spec.stoppingRules
    if sr.maxSamplesPerVariant is not None and sr.maxSamplesPerVariant < sr.minSamplesPerVariant:
        return (
            f"spec.stoppingRules.maxSamplesPerVariant: {sr.maxSamplesPerVariant} is below "
            f"minSamplesPerVariant {sr.minSamplesPerVariant}"
        )
    if spec.allocation.strategy == "thompson":
        if pm.type != "proportion":
            return (
                "spec.allocation.strategy: thompson sampling needs a proportion primary metric "
                f"(spec.primaryMetric.type is {pm.type})"
            )
        if spec.allocation.minWeight * len(spec.variants) > 100:
            return (
                f"spec.allocation.minWeight: {spec.allocation.minWeight} x {len(spec.variants)} variants "
                "exceeds 100"
            )
    if spec.successCriteria.method == "bayesian" and pm.type != "proportion" and len(spec.variants) > 2:
        return (
            "spec.successCriteria.method: bayesian with a mean metric supports two variants only "
            "(probability to be best is computed for proportions)"
        )
    for f in ("interval", "window"):
        if parse_duration(getattr(spec.analysis, f)) <= 0:
            return f"spec.analysis.{f}: must be above 0"
    return None


def fixed_weights(spec: ModelExperimentSpec, active: set[str] | None = None) -> dict[str, int]:
    """Configured weights (or an equal split) over the active variants, per variant name.

    Integer percentages summing to 100: each variant gets the floor of its share; the rounding
    remainder goes to the control. Dropped variants get 0 and their share is spread proportionally.
    """
    names = [v.name for v in spec.variants]
    active = set(names) if active is None else active
    explicit = any(v.weight is not None for v in spec.variants)
    base = {v.name: ((v.weight or 0) if explicit else 1) if v.name in active else 0 for v in spec.variants}
    control = control_of(spec).name
    total = sum(base.values())
    if total <= 0:
        return {n: (100 if n == control else 0) for n in names}
    out = {n: 100 * w // total for n, w in base.items()}
    out[control] += 100 - sum(out.values())
    return out


def revision_of(spec: ModelExperimentSpec) -> str:
    """What is compared: the variants (names, services, which is the control) and the primary metric.

    A change restarts the experiment from scratch. Weights, guardrails and stopping rules are not part
    of it: they change how the experiment runs, not what its samples mean.
    """
    variants = [{"name": v.name, "service": v.service, "control": v.control} for v in spec.variants]
    body = json.dumps({"variants": variants, "primaryMetric": dump(spec.primaryMetric)}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:10]


def needs_measurement(spec: ModelExperimentSpec, status: ModelExperimentStatus) -> bool:
    """Metrics are read only for a started, not finished experiment of the current revision."""
    return (
        status.startedAt is not None
        and status.phase not in (*TERMINAL_PHASES, "Invalid", "Pending")
        and status.revision == revision_of(spec)
        and [v.name for v in status.variants] == [v.name for v in spec.variants]
    )


def service_weights(spec: ModelExperimentSpec, status: ModelExperimentStatus) -> dict[str, int]:
    """The status weights per Service (what the router should show)."""
    by_name = {v.name: v.weight for v in status.variants}
    return {v.service: by_name.get(v.name, 0) for v in spec.variants}


# --------------------------------------------------------------------------- entry points


def invalid(status: ModelExperimentStatus, message: str, now: datetime, generation: int) -> Decision:
    """Valid=False: the spec cannot be acted on; traffic is left exactly as it is."""
    s, events = status_.invalid(status, message, now, generation)
    return Decision(s, list(events))


def reconcile(
    spec: ModelExperimentSpec,
    status: ModelExperimentStatus,
    *,
    now: datetime,
    generation: int,
    annotations: dict[str, str] | None = None,
    observations: Observations | None = None,
) -> Decision:
    problem = validate(spec)
    if problem:
        return invalid(status, problem, now, generation)
    s = status.model_copy(deep=True)
    actions: list[Action] = []
    ann = annotations or {}
    s.observedGeneration = generation
    s.conditions = set_condition(s.conditions, "Valid", "True", "SpecValid", "spec accepted", now, generation)

    rev = revision_of(spec)
    names = [v.name for v in spec.variants]
    if s.startedAt is None or s.revision != rev or [v.name for v in s.variants] != names:
        if s.startedAt is None and spec.paused:
            if s.phase != "Paused":
                _history(s, now, "Paused", "SpecPaused", "created paused: not started")
            s.phase, s.message = "Paused", "paused by spec.paused before it started: no traffic moved"
            _conditions(s, now, generation, "SpecPaused")
            return Decision(s, actions)
        return _start(spec, s, actions, ann, rev, now, generation)

    if s.phase in TERMINAL_PHASES:
        _conditions(s, now, generation, s.phase)
        return Decision(s, actions)
    if s.phase == "Invalid":
        s.phase = "Running"
        _history(s, now, "Valid", "SpecValid", "spec is valid again; resuming")

    # User actions, by annotation: each new value acts once.
    abort = ann.get(ANNOTATION_ABORT)
    if abort and abort != s.handled.abort:
        s.handled.abort = abort
        return _finish(
            spec,
            s,
            actions,
            now,
            generation,
            "Aborted",
            "aborted",
            None,
            "AbortRequested",
            f"aborted by annotation {ANNOTATION_ABORT}={abort}: all traffic back to the control",
            to_control=True,
        )
    resume = ann.get(ANNOTATION_RESUME)
    if resume and resume != s.handled.resume:
        s.handled.resume = resume
        if _srm_held(s):
            msg = (
                f"resumed by annotation {ANNOTATION_RESUME}={resume} after a sample-ratio mismatch; "
                "the SRM check restarts from the current counts"
            )
            s.conditions = set_condition(s.conditions, SRM_REASON, "False", "Resumed", msg, now, generation)
            _split_changed(s, now)
            s.phase = "Running"
            actions.append(Event("Normal", "Resumed", msg))
            _history(s, now, "Resumed", "ResumeRequested", msg)

    if observations is not None:
        done = _analyse(spec, s, actions, observations, now, generation)
        if done is not None:
            return done

    # Pausing: by spec, or held by a sample-ratio mismatch until resumed.
    if spec.paused:
        if s.phase != "Paused" or _progress_reason(s) != "SpecPaused":
            actions.append(Event("Normal", "Paused", "paused by spec.paused"))
            _history(s, now, "Paused", "SpecPaused", "paused by spec.paused: weights held, no decision")
        s.phase = "Paused"
        s.message = "paused by spec.paused: weights held, no decision; guardrails still run"
        _conditions(s, now, generation, "SpecPaused")
        return Decision(s, actions)
    if _srm_held(s):
        s.phase = "Paused"
        cond = get_condition(s.conditions, SRM_REASON)
        s.message = (
            f"paused: {cond.message if cond else 'sample-ratio mismatch'}; set annotation "
            f"{ANNOTATION_RESUME}=<token> to resume"
        )
        _conditions(s, now, generation, SRM_REASON)
        return Decision(s, actions)
    if s.phase == "Paused":
        s.phase = "Running"
        actions.append(Event("Normal", "Resumed", "spec.paused cleared"))
        _history(s, now, "Resumed", "SpecResumed", "spec.paused cleared")
    s.phase = "Running"
    _conditions(s, now, generation, "Running")
    return Decision(s, actions)


# --------------------------------------------------------------------------- start and finish


def _start(
    spec: ModelExperimentSpec,
    s: ModelExperimentStatus,
    actions: list[Action],
    ann: dict[str, str],
    rev: str,
    now: datetime,
    generation: int,
) -> Decision:
    """Start (or, for a new revision, restart from scratch): fresh counts, the configured split."""
    reason = "Started" if s.startedAt is None else "NewRevision"
    weights = fixed_weights(spec)
    ctrl = control_of(spec).name
    split = ", ".join(f"{v.name} ({v.service}) {weights[v.name]}%" for v in spec.variants)
    msg = (
        f"started: {split}; {spec.allocation.strategy} allocation, control {ctrl}"
        if reason == "Started"
        else f"variants or primary metric changed (revision {s.revision or 'unrecorded'} -> {rev}): "
        f"restarting the experiment from scratch with {split}"
    )
    # Annotations present when this revision starts were meant for an earlier one: recorded, not acted on.
    handled = s.handled.model_copy(
        update={
            "abort": ann.get(ANNOTATION_ABORT, s.handled.abort),
            "resume": ann.get(ANNOTATION_RESUME, s.handled.resume),
        }
    )
    s = ModelExperimentStatus(
        phase="Running",
        message=msg,
        observedGeneration=generation,
        revision=rev,
        startedAt=now,
        variants=[VariantStatus(name=v.name, weight=weights[v.name]) for v in spec.variants],
        conditions=s.conditions,
        history=s.history,
        handled=handled,
        srmBaseline={v.name: 0.0 for v in spec.variants},
        srmSince=now,
    )
    s.conditions = set_condition(
        s.conditions, SRM_REASON, "Unknown", "NotChecked", "no samples yet", now, generation
    )
    actions += [SetWeights(_by_service(spec, weights)), Event("Normal", reason, msg)]
    _history(s, now, reason, reason, msg, {k: float(w) for k, w in weights.items()})
    _conditions(s, now, generation, "Running")
    return Decision(s, actions)


def _finish(
    spec: ModelExperimentSpec,
    s: ModelExperimentStatus,
    actions: list[Action],
    now: datetime,
    generation: int,
    phase: str,
    decision: str,
    winner: str | None,
    reason: str,
    message: str,
    values: dict[str, float] | None = None,
    to_control: bool = False,
    move: bool = True,
) -> Decision:
    """Enter a terminal phase. Traffic: all to the winner, or to the control, or (move=False) unchanged."""
    ctrl = control_of(spec).name
    target = winner if winner is not None else (ctrl if to_control else None)
    if move and target is not None:
        for v in s.variants:
            v.weight = 100 if v.name == target else 0
        actions.append(SetWeights(_by_service(spec, _weights(s))))
    s.phase = phase  # type: ignore[assignment]
    s.decision = decision
    s.winner = winner
    s.decisionReason = message
    s.message = message
    warn = phase in ("RolledBack", "Aborted")
    actions.append(Event("Warning" if warn else "Normal", reason, message))
    _history(s, now, phase, reason, message, values)
    _conditions(s, now, generation, reason)
    return Decision(s, actions)


# --------------------------------------------------------------------------- analysis


def _analyse(
    spec: ModelExperimentSpec,
    s: ModelExperimentStatus,
    actions: list[Action],
    obs: Observations,
    now: datetime,
    generation: int,
) -> Decision | None:
    """One analysis: guardrails, SRM, decision, allocation. Returns a Decision when the experiment ends."""
    s.lastAnalysisTime = now
    ctrl = control_of(spec).name
    by_name = {v.name: v for v in s.variants}
    data: dict[str, Data] = {}
    problems: list[str] = []
    for v in spec.variants:
        o = obs.variants.get(v.name)
        vs = by_name[v.name]
        if o is not None and o.requests is not None:
            vs.requests = o.requests
        if o is not None and o.primary is not None and o.problem is None:
            data[v.name] = o.primary
            vs.n = _n(o.primary)
        elif vs.active:
            p = (
                o.problem
                if o is not None and o.problem is not None
                else Result("error", message="not measured")
            )
            what = (
                "measurement failed"
                if p.outcome == "error"
                else ("no data" if p.outcome == "noData" else "not a number")
            )
            problems.append(
                f"{spec.primaryMetric.name} of {v.name}: {what}" + (f" ({p.message})" if p.message else "")
            )

    # 1. Guardrails per active variant.
    measurements: list[Measurement] = []
    for v in spec.variants:
        if not by_name[v.name].active:
            continue
        o = obs.variants.get(v.name)
        ms = []
        for g in spec.guardrails:
            r = (o.guardrails.get(g.name) if o is not None else None) or Result(
                "error", message="not measured"
            )
            m = evaluate(g, r, v.name)
            m = m.model_copy(update={"message": f"{v.name}: {m.message}"})
            if m.verdict == "noData" and spec.analysis.noData == "fail":
                m = m.model_copy(
                    update={"verdict": "fail", "message": f"{m.message} (analysis.noData is fail)"}
                )
            ms.append(m)
        s.guardrailFailures = update_failures(s.guardrailFailures, ms, key_prefix=f"{v.name}/")
        measurements += ms
    guard_problems = [m for m in measurements if m.verdict in ("noData", "error")]
    breaches = [m for m in measurements if m.verdict == "fail"]
    s.conditions = set_condition(
        s.conditions,
        "Healthy",
        "False" if breaches else ("Unknown" if guard_problems else "True"),
        "GuardrailBreached"
        if breaches
        else (
            "MeasurementError"
            if any(m.verdict == "error" for m in guard_problems)
            else "NoData"
            if guard_problems
            else "AnalysisPassing"
        ),
        "; ".join(m.message for m in measurements) or "no guardrails configured",
        now,
        generation,
    )

    failed: dict[str, list[str]] = {}
    for v in spec.variants:
        for g in spec.guardrails:
            count = s.guardrailFailures.get(f"{v.name}/{g.name}", 0)
            if by_name[v.name].active and count >= g.failureLimit:
                m = next(m for m in measurements if m.variant == v.name and m.name == g.name)
                failed.setdefault(v.name, []).append(
                    f"{m.message}; {count} consecutive breach(es) reached failureLimit {g.failureLimit}"
                )
    gvalues = {f"{m.variant}/{m.name}": m.value for m in measurements if m.value is not None}
    if ctrl in failed:
        why = f"the control {ctrl} breaches its guardrails: " + "; ".join(failed[ctrl])
        if spec.onFailure == "rollback":
            s.lastAnalysis = measurements
            for vst in s.variants:
                vst.active = vst.name == ctrl
            return _finish(
                spec,
                s,
                actions,
                now,
                generation,
                "RolledBack",
                "rolledBack",
                None,
                "GuardrailFailed",
                f"{why}: no variant is safe, all traffic to the control (onFailure rollback)",
                gvalues,
                to_control=True,
            )
        first = any(s.guardrailFailures.get(f"{ctrl}/{g.name}", 0) == g.failureLimit for g in spec.guardrails)
        if first:  # warn when the limit is reached, not at every breaching analysis after it
            msg = f"{why}; onFailure is keep: traffic unchanged"
            actions.append(Event("Warning", "ControlGuardrailFailed", msg))
            _history(s, now, "GuardrailFailed", "ControlGuardrailFailed", msg, gvalues)
    dropped = [n for n in failed if n != ctrl]
    for name in dropped:
        vs = by_name[name]
        vs.active = False
        vs.verdict = "dropped"
        vs.reason = "guardrail: " + "; ".join(failed[name])
        msg = f"variant {name} dropped (weight {vs.weight} -> 0): " + "; ".join(failed[name])
        actions.append(Event("Warning", "VariantDropped", msg))
        _history(s, now, "VariantDropped", "GuardrailFailed", msg, gvalues)
    if dropped:
        active = {v.name for v in s.variants if v.active}
        if not active - {ctrl}:
            s.lastAnalysis = measurements
            return _finish(
                spec,
                s,
                actions,
                now,
                generation,
                "RolledBack",
                "rolledBack",
                None,
                "GuardrailFailed",
                "every non-control variant was dropped by its guardrails: all traffic to the control",
                gvalues,
                to_control=True,
            )
        if spec.allocation.strategy == "fixed":
            _set_weights(
                spec,
                s,
                actions,
                now,
                fixed_weights(spec, active),
                f"redistributed after dropping {', '.join(dropped)}",
                event=False,
            )
        else:
            _set_weights(
                spec,
                s,
                actions,
                now,
                _thompson(spec, s, data, generation, now),
                f"bandit excludes {', '.join(dropped)}",
                event=False,
            )

    active_names = [v.name for v in spec.variants if by_name[v.name].active]
    paused = spec.paused or _srm_held(s)

    # 2. Sample-ratio mismatch.
    if not problems:
        _srm(spec, s, actions, active_names, now, generation)

    # 3. The decision.
    comparisons = _compare_all(spec, s, data, active_names) if not problems else []
    s.lastAnalysis = measurements + comparisons
    _sample_size(spec, s, data, active_names)
    if problems:
        kind = "measurement error" if any("measurement failed" in p for p in problems) else "no data"
        s.message = f"holding ({kind}): " + "; ".join(problems)
        return None
    if paused or _srm_held(s):
        return None
    ended = _decide(spec, s, actions, data, active_names, now, generation)
    if ended is not None:
        return ended

    # 4. Allocation.
    if spec.allocation.strategy == "thompson":
        new = _thompson(spec, s, data, generation, now)
        if new != _weights(s):
            analysis = s.message
            _set_weights(spec, s, actions, now, new, "thompson sampling update", event=False, record=False)
            s.message = f"{analysis}; {s.message}"
    return None


def _srm(
    spec: ModelExperimentSpec,
    s: ModelExperimentStatus,
    actions: list[Action],
    active: list[str],
    now: datetime,
    generation: int,
) -> None:
    if spec.allocation.strategy != "fixed":
        s.srmPValue = None
        s.conditions = set_condition(
            s.conditions,
            SRM_REASON,
            "Unknown",
            "NotCheckedForThompson",
            "SRM is checked for fixed allocation only: under thompson the weights change every interval",
            now,
            generation,
        )
        return
    if _srm_held(s):
        return
    base = s.srmBaseline
    by_name = {v.name: v for v in s.variants}
    counts = [max(0.0, _traffic(by_name[n]) - base.get(n, 0.0)) for n in active]
    weights = [float(by_name[n].weight) for n in active]
    need = max(SRM_MIN_SAMPLES, spec.stoppingRules.minSamplesPerVariant / 2)
    detail = ", ".join(
        f"{n} {c:.0f} at weight {w:.0f}" for n, c, w in zip(active, counts, weights, strict=True)
    )
    if min(counts, default=0) < need:
        s.conditions = set_condition(
            s.conditions,
            SRM_REASON,
            "Unknown",
            "NotEnoughSamples",
            f"waiting for {need:.0f} samples per active variant since the split last changed ({detail})",
            now,
            generation,
        )
        return
    p = stats.srm_test(counts, weights)
    s.srmPValue = p
    alpha = spec.stoppingRules.srmAlpha
    if p < alpha:
        msg = f"sample-ratio mismatch: p = {p:.3g} < srmAlpha {alpha:g}; samples {detail}"
        s.conditions = set_condition(s.conditions, SRM_REASON, "True", SRM_REASON, msg, now, generation)
        actions.append(Event("Warning", SRM_REASON, msg))
        values = {"pValue": p, **{f"n/{n}": c for n, c in zip(active, counts, strict=True)}}
        _history(s, now, "Paused", SRM_REASON, msg, values)
    else:
        s.conditions = set_condition(
            s.conditions,
            SRM_REASON,
            "False",
            "SplitMatches",
            f"p = {p:.3g} >= srmAlpha {alpha:g}; samples {detail}",
            now,
            generation,
        )


def _compare_all(
    spec: ModelExperimentSpec, s: ModelExperimentStatus, data: dict[str, Data], active: list[str]
) -> list[Measurement]:
    """Compare every active variant with the control; fill per-variant status; return measurements."""
    sc, pm = spec.successCriteria, spec.primaryMetric
    ctrl = control_of(spec).name
    by_name = {v.name: v for v in s.variants}
    cdata = data[ctrl]
    c_status = by_name[ctrl]
    c_status.estimate = _estimate(cdata)
    c_status.verdict, c_status.reason = "control", "the control: every variant is compared with it"
    treatments = [n for n in active if n != ctrl]
    results: dict[str, stats.Comparison] = {}
    for n in treatments:
        kwargs = {
            "alpha": sc.alpha,
            "method": sc.method,
            "better": pm.better,
            "mde": sc.minimumDetectableEffect,
            "max_samples": spec.stoppingRules.maxSamplesPerVariant if sc.method == "sequential" else None,
            "labels": (ctrl, n),
        }
        d = data[n]
        if isinstance(cdata, stats.ProportionData) and isinstance(d, stats.ProportionData):
            results[n] = stats.compare_proportions(cdata, d, **kwargs)  # type: ignore[arg-type]
        elif isinstance(cdata, stats.MeanData) and isinstance(d, stats.MeanData):
            results[n] = stats.compare_means(cdata, d, **kwargs)  # type: ignore[arg-type]
    frequentist = sc.method != "bayesian"
    adjusted = (
        dict(zip(treatments, stats.holm([results[n].p_value for n in treatments]), strict=True))
        if frequentist
        else {}
    )
    ptb: dict[str, float] = {}
    props = [d for n in active if isinstance(d := data[n], stats.ProportionData)]
    if len(props) == len(active):
        seed = int(sum(d.trials for d in props)) % 2**32
        ptb = dict(zip(active, stats.probability_to_be_best(props, better=pm.better, seed=seed), strict=True))
    for n, p in ptb.items():
        by_name[n].probabilityToBeBest = p
    out: list[Measurement] = []
    for n in treatments:
        r = results[n]
        vs = by_name[n]
        vs.estimate, vs.pValue = r.treatment_estimate, r.p_value
        # Status is JSON: an unbounded end (too little data for a mean) is left unset, not written as inf.
        vs.ciLow = r.ci_low if math.isfinite(r.ci_low) else None
        vs.ciHigh = r.ci_high if math.isfinite(r.ci_high) else None
        vs.adjustedPValue = adjusted.get(n)
        better = _in_better_direction(r.difference, pm.better)
        if frequentist:
            adj = adjusted[n]
            verdict = ("better" if better else "worse") if adj < sc.alpha else "inconclusive"
            note = f"; Holm-adjusted p = {adj:.3g} (alpha {sc.alpha:g}, {len(treatments)} comparison(s))"
        else:
            p_best = ptb.get(n)
            verdict = "better" if r.verdict == "pass" else "worse" if r.verdict == "fail" else "inconclusive"
            note = f"; P(best) = {p_best:.3g}" if p_best is not None else ""
        vs.verdict = verdict
        vs.reason = r.reason + note
        details = {
            "control": r.control_estimate,
            "variant": r.treatment_estimate,
            "controlN": r.control_n,
            "variantN": r.treatment_n,
            "difference": r.difference,
            "ciLow": r.ci_low,
            "ciHigh": r.ci_high,
            "pValue": r.p_value,
            "alpha": sc.alpha,
        }
        if n in adjusted:
            details["adjustedPValue"] = adjusted[n]
        if n in ptb:
            details["probabilityToBeBest"] = ptb[n]
        out.append(
            Measurement(
                name=pm.name,
                kind="comparison",
                variant=n,
                outcome="value",
                value=r.difference,
                threshold=(
                    f"{sc.method}, alpha {sc.alpha:g}, better {pm.better}, mde {sc.minimumDetectableEffect:g}"
                ),
                verdict="pass" if verdict == "better" else "fail" if verdict == "worse" else "inconclusive",
                message=f"{pm.name} {n} vs {ctrl}: {vs.reason}",
                details={k: v for k, v in details.items() if math.isfinite(v)},
            )
        )
    return out


def _sample_size(
    spec: ModelExperimentSpec, s: ModelExperimentStatus, data: dict[str, Data], active: list[str]
) -> None:
    """Planned samples per variant for the MDE (alpha split over the comparisons, conservatively)."""
    sc = spec.successCriteria
    ctrl = control_of(spec).name
    k = max(1, len(active) - 1)
    alpha = sc.alpha / k
    mde = sc.minimumDetectableEffect
    try:
        cdata = data.get(ctrl)
        if isinstance(cdata, stats.ProportionData):
            if cdata.trials < stats.MIN_SAMPLES_PER_ARM:
                return
            base = min(max(cdata.successes / cdata.trials, 0.001), 0.999)
            delta = mde if spec.primaryMetric.better == "higher" else -mde
            if not 0 < base + delta < 1:
                delta = -delta
            fn = (
                stats.sample_size_sequential_proportions
                if sc.method == "sequential"
                else stats.sample_size_proportions
            )
            s.sampleSizePerVariant = fn(base, delta, alpha=alpha, power=sc.power)
        elif isinstance(cdata, stats.MeanData):
            means = [
                d for n, d in data.items() if n in active and isinstance(d, stats.MeanData) and d.count >= 2
            ]
            dof = sum(d.count - 1 for d in means)
            if dof < stats.MIN_SAMPLES_PER_ARM:
                return
            sd = math.sqrt(sum(d.variance * (d.count - 1) for d in means) / dof)
            if sd <= 0:
                return
            fm = stats.sample_size_sequential_means if sc.method == "sequential" else stats.sample_size_means
            s.sampleSizePerVariant = fm(sd, mde, alpha=alpha, power=sc.power)
    except ValueError:
        return


def _decide(
    spec: ModelExperimentSpec,
    s: ModelExperimentStatus,
    actions: list[Action],
    data: dict[str, Data],
    active: list[str],
    now: datetime,
    generation: int,
) -> Decision | None:
    sc, sr, pm = spec.successCriteria, spec.stoppingRules, spec.primaryMetric
    ctrl = control_of(spec).name
    by_name = {v.name: v for v in s.variants}
    ns = {n: by_name[n].n for n in active}
    least = min(ns.values())
    elapsed = (now - s.startedAt).total_seconds() if s.startedAt else 0.0
    max_duration = parse_duration(sr.maxDuration)
    timed_out = elapsed >= max_duration
    at_cap = sr.maxSamplesPerVariant is not None and least >= sr.maxSamplesPerVariant
    need = sr.minSamplesPerVariant
    if sc.method == "fixedHorizon" and s.sampleSizePerVariant:
        need = max(need, s.sampleSizePerVariant)
    samples = ", ".join(f"{n} n={ns[n]:.0f}" for n in active)
    values = _decision_values(s, active)
    treatments = [n for n in active if n != ctrl]

    if least >= need or at_cap or timed_out:
        winner = _winner(spec, s, treatments)
        if winner is not None:
            w = by_name[winner]
            stat = (
                f"P(best) = {w.probabilityToBeBest:.3g} >= {sc.probabilityToBeBest:g}"
                if sc.method == "bayesian"
                else f"Holm-adjusted p = {w.adjustedPValue:.3g} < alpha {sc.alpha:g}"
            )
            detail = (
                f"{winner} {pm.name} = {w.estimate:.4g} vs {ctrl} (control) {by_name[ctrl].estimate:.4g} "
                f"(diff {(w.estimate or 0) - (by_name[ctrl].estimate or 0):+.4g}, "
                f"CI [{w.ciLow:+.4g}, {w.ciHigh:+.4g}], {stat}; {samples})"
            )
            if spec.onSuccess == "promoteWinner":
                return _finish(
                    spec,
                    s,
                    actions,
                    now,
                    generation,
                    "Concluded",
                    "promoted",
                    winner,
                    "WinnerPromoted",
                    f"winner {winner}: {detail}; all traffic to {winner}",
                    values,
                )
            return _finish(
                spec,
                s,
                actions,
                now,
                generation,
                "Concluded",
                "winnerKept",
                winner,
                "WinnerFound",
                f"winner {winner}: {detail}; onSuccess is keep: traffic unchanged",
                values,
                move=False,
            )
        futile = _futile(spec, s, treatments)
        if futile:
            return _null(
                spec,
                s,
                actions,
                now,
                generation,
                "futile",
                "Futile",
                f"futile: no variant can beat the control {ctrl} by the MDE "
                f"{sc.minimumDetectableEffect:g} ({futile}; {samples})",
                values,
            )
        one_look = sc.method == "fixedHorizon" and least >= need
        if at_cap or timed_out or one_look:
            why = (
                f"every active variant reached maxSamplesPerVariant {sr.maxSamplesPerVariant}"
                if at_cap
                else f"maxDuration {sr.maxDuration} elapsed"
                if timed_out
                else f"the fixed-horizon test at its planned {need} samples per variant ended"
            )
            return _null(
                spec,
                s,
                actions,
                now,
                generation,
                "noWinner",
                "NoWinner",
                f"no winner: {why} without a significant improvement over the control {ctrl} "
                f"({_summary(s, treatments)}; {samples})",
                values,
            )
        s.message = f"analysing: no decision yet ({_summary(s, treatments)}; {samples})"
        return None
    s.message = f"collecting samples: {samples}; a decision needs {need} per variant" + (
        " (planned sample size of the fixed-horizon test)" if need > sr.minSamplesPerVariant else ""
    )
    return None


def _winner(spec: ModelExperimentSpec, s: ModelExperimentStatus, treatments: list[str]) -> str | None:
    sc, pm = spec.successCriteria, spec.primaryMetric
    by_name = {v.name: v for v in s.variants}
    if sc.method == "bayesian":
        # Proportions: probability to be best among all active variants. Means (two variants): the
        # posterior probability of beating the control, 1 - pValue.
        c_est = by_name[control_of(spec).name].estimate or 0.0
        cands = []
        for n in treatments:
            v = by_name[n]
            ptb = v.probabilityToBeBest
            if ptb is None:
                ptb = 1.0 - (v.pValue if v.pValue is not None else 1.0)
            if _in_better_direction((v.estimate or 0.0) - c_est, pm.better) and ptb >= sc.probabilityToBeBest:
                cands.append(n)
    else:
        cands = [n for n in treatments if by_name[n].verdict == "better"]
    if not cands:
        return None
    sign = 1.0 if pm.better == "higher" else -1.0
    return max(cands, key=lambda n: (sign * (by_name[n].estimate or 0.0), n))


def _futile(spec: ModelExperimentSpec, s: ModelExperimentStatus, treatments: list[str]) -> str:
    """Non-empty (the intervals) when every variant's interval excludes an improvement of the MDE."""
    sc, pm = spec.successCriteria, spec.primaryMetric
    if not spec.stoppingRules.futility or not treatments:
        return ""
    mde = sc.minimumDetectableEffect
    by_name = {v.name: v for v in s.variants}
    parts = []
    for n in treatments:
        v = by_name[n]
        if v.ciLow is None or v.ciHigh is None:
            return ""
        if (pm.better == "higher" and not v.ciHigh < mde) or (pm.better == "lower" and not v.ciLow > -mde):
            return ""
        parts.append(f"{n} CI [{v.ciLow:+.4g}, {v.ciHigh:+.4g}]")
    return ", ".join(parts)


def _null(
    spec: ModelExperimentSpec,
    s: ModelExperimentStatus,
    actions: list[Action],
    now: datetime,
    generation: int,
    decision: str,
    reason: str,
    message: str,
    values: dict[str, float],
) -> Decision:
    if spec.onSuccess == "promoteWinner":
        message += "; all traffic to the control"
    else:
        message += "; onSuccess is keep: traffic unchanged"
    return _finish(
        spec,
        s,
        actions,
        now,
        generation,
        "Concluded",
        decision,
        None,
        reason,
        message,
        values,
        to_control=True,
        move=spec.onSuccess == "promoteWinner",
    )


def _summary(s: ModelExperimentStatus, treatments: list[str]) -> str:
    by_name = {v.name: v for v in s.variants}
    parts = []
    for n in treatments:
        v = by_name[n]
        p = f", adj p {v.adjustedPValue:.3g}" if v.adjustedPValue is not None else ""
        b = f", P(best) {v.probabilityToBeBest:.3g}" if v.probabilityToBeBest is not None else ""
        ci = f" CI [{v.ciLow:+.4g}, {v.ciHigh:+.4g}]" if v.ciLow is not None and v.ciHigh is not None else ""
        est = f"{v.estimate:.4g}" if v.estimate is not None else "n/a"
        parts.append(f"{n} {est}{ci}{p}{b}")
    return "; ".join(parts)


def _decision_values(s: ModelExperimentStatus, active: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for v in s.variants:
        if v.name not in active:
            continue
        out[f"{v.name}/n"] = v.n
        for key, val in (
            ("estimate", v.estimate),
            ("ciLow", v.ciLow),
            ("ciHigh", v.ciHigh),
            ("adjustedPValue", v.adjustedPValue),
            ("probabilityToBeBest", v.probabilityToBeBest),
        ):
            if val is not None and math.isfinite(val):
                out[f"{v.name}/{key}"] = val
    return out


def _thompson(
    spec: ModelExperimentSpec, s: ModelExperimentStatus, data: dict[str, Data], generation: int, now: datetime
) -> dict[str, int]:
    """Bandit weights; seeded from the generation and the analysis time, so the engine stays pure."""
    excluded = [v.name for v in s.variants if not v.active]
    arms: dict[str, stats.ProportionData] = {}
    for v in spec.variants:
        d = data.get(v.name)
        arms[v.name] = d if isinstance(d, stats.ProportionData) else stats.ProportionData(0.0, 0.0)
    seed = (generation * 1_000_003 + int(now.timestamp())) % 2**32
    alloc = spec.allocation
    return bandit.thompson_weights(
        arms,
        _weights(s),
        min_weight=alloc.minWeight,
        max_step=alloc.maxStep,
        excluded=excluded,
        better=spec.primaryMetric.better,
        seed=seed,
    )


# --------------------------------------------------------------------------- small helpers


def _n(d: Data) -> float:
    return d.trials if isinstance(d, stats.ProportionData) else d.count


def _estimate(d: Data) -> float | None:
    if isinstance(d, stats.ProportionData):
        return d.successes / d.trials if d.trials > 0 else None
    return d.mean if d.count > 0 else None


def _in_better_direction(diff: float, better: str) -> bool:
    return diff > 0 if better == "higher" else diff < 0


def _weights(s: ModelExperimentStatus) -> dict[str, int]:
    return {v.name: v.weight for v in s.variants}


def _by_service(spec: ModelExperimentSpec, weights: dict[str, int]) -> dict[str, int]:
    return {v.service: weights.get(v.name, 0) for v in spec.variants}


def _set_weights(
    spec: ModelExperimentSpec,
    s: ModelExperimentStatus,
    actions: list[Action],
    now: datetime,
    weights: dict[str, int],
    why: str,
    event: bool = True,
    record: bool = True,
) -> None:
    old = _weights(s)
    if weights == old:
        return
    for v in s.variants:
        v.weight = weights.get(v.name, 0)
    change = ", ".join(f"{n} {old.get(n, 0)}->{w}" for n, w in weights.items() if old.get(n, 0) != w)
    msg = f"weights {change}: {why}"
    s.message = msg
    actions.append(SetWeights(_by_service(spec, weights)))
    if event:
        actions.append(Event("Normal", "WeightsChanged", msg))
    if record:
        _history(s, now, "WeightsChanged", "WeightsChanged", msg, {k: float(w) for k, w in weights.items()})
    if spec.allocation.strategy == "fixed":  # SRM runs for fixed allocation only
        _split_changed(s, now)


def _split_changed(s: ModelExperimentStatus, now: datetime) -> None:
    """Remember the sample counts at which the split changed: SRM counts the samples after it."""
    s.srmBaseline = {v.name: _traffic(v) for v in s.variants}
    s.srmSince = now


def _traffic(v: VariantStatus) -> float:
    """What SRM counts: measured requests when analysis.requests is set, else primary-metric samples."""
    return v.requests if v.requests is not None else v.n


def _srm_held(s: ModelExperimentStatus) -> bool:
    c = get_condition(s.conditions, SRM_REASON)
    return c is not None and c.status == "True"


def _progress_reason(s: ModelExperimentStatus) -> str | None:
    c = get_condition(s.conditions, "Progressing")
    return c.reason if c is not None else None


_history = status_.record


def _conditions(s: ModelExperimentStatus, now: datetime, generation: int, reason: str) -> None:
    c: list[Condition] = s.conditions
    done = s.phase in TERMINAL_PHASES
    c = set_condition(c, "Progressing", "False" if done else "True", reason, s.message, now, generation)
    c = set_condition(
        c, "Completed", "True" if done else "False", s.phase if done else reason, s.message, now, generation
    )
    if s.phase == "RolledBack":
        c = set_condition(c, "Healthy", "False", reason, s.message, now, generation)
    s.conditions = c
