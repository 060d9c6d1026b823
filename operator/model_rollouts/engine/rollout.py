"""The ModelRollout state machine: a pure function (spec, status, observations, now) -> (status, actions).

No I/O happens here. The handler measures, calls :func:`reconcile`, then applies the actions
(weights, Events) and writes the returned status. Every transition is explained in status.

A tick is a short composition: revision, terminal phase and the abort/promote-full annotations
(:func:`_begin`), the analysis of this tick, then the step walk (:mod:`model_rollouts.engine.steps`)
and the conditions it ends with (:func:`_steps`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from model_rollouts.analysis import segments, sequential, stats, threshold
from model_rollouts.analysis.assess import Policy, assess
from model_rollouts.analysis.comparison import ROLLOUT_NAMES
from model_rollouts.analysis.vocabulary import Result
from model_rollouts.api.common import (
    ArmCounts,
    Condition,
    Measurement,
    Verdict,
    action_annotations,
    dump,
    parse_duration,
    set_condition,
)
from model_rollouts.api.rollout import (
    ANNOTATION_ABORT,
    ANNOTATION_PROMOTE,
    ANNOTATION_PROMOTE_FULL,
    ANNOTATION_RESUME,
    ANNOTATION_RETRY,
    TERMINAL_PHASES,
    Comparison,
    EpochCounts,
    ModelRolloutSpec,
    ModelRolloutStatus,
)
from model_rollouts.engine import planning, post, series, steps
from model_rollouts.engine import status as status_
from model_rollouts.engine.actions import LIMIT_REASONS, Event
from model_rollouts.engine.status import EPOCH
from model_rollouts.engine.steps import GateAnswer, exposure


@dataclass(frozen=True)
class ComparisonData:
    """Counts of one comparison for stable and candidate within the current epoch, or the problem."""

    stable: stats.ProportionData | stats.MeanData | None = None
    candidate: stats.ProportionData | stats.MeanData | None = None
    problem: Result | None = None


@dataclass(frozen=True)
class Observations:
    """One analysis. Comparison counts are those collected since ``status.epochStartedAt``."""

    guardrails: dict[str, Result] = field(default_factory=dict)
    comparisons: dict[str, ComparisonData] = field(default_factory=dict)
    candidate_ready: bool | None = None  # None: readiness unknown (no EndpointSlices visible)


@dataclass
class Decision:
    status: ModelRolloutStatus
    actions: list[Event]
    #: Gates (by name) the engine needs answered to decide this tick; the handler asks them and
    #: calls again with the answers (the engine does no I/O).
    asks: list[str] = field(default_factory=list)


def revision_of(spec: ModelRolloutSpec) -> str:
    """A new revision starts when the candidate changes; the baseline is whatever is serving."""
    return status_.digest(dump(spec.candidate))


def steps_hash(spec: ModelRolloutSpec) -> str:
    return status_.digest([dump(st) for st in spec.steps])


def interval_of(spec: ModelRolloutSpec) -> float:
    return parse_duration(spec.analysis.interval)


def _last_mark(status: ModelRolloutStatus) -> datetime | None:
    """The last analysis or weight change, whichever is later: the next analysis is one interval on."""
    marks = [t for t in (status.lastAnalysisTime, status.epochStartedAt) if t is not None]
    # A gate asked while no analysis runs (weight 0) is asked again one interval later, not at once.
    marks += [g.lastAskedTime for g in status.gates]
    return max(marks) if marks else None


def analysis_due(spec: ModelRolloutSpec, status: ModelRolloutStatus, now: datetime) -> bool:
    """Pacing lives in status: the next analysis is due one interval after the last one (or the
    last weight change), never earlier, whatever restarts, retries or replicas happen."""
    mark = _last_mark(status)
    return mark is None or (now - mark).total_seconds() >= interval_of(spec) - 0.001


def needs_measurement(spec: ModelRolloutSpec, status: ModelRolloutStatus, now: datetime) -> bool:
    """Metrics are read only while the candidate gets traffic (or a shadow step's mirrored copies) in
    an active rollout, once per interval."""
    return (
        status.phase not in (*TERMINAL_PHASES, "Invalid")
        and exposure(status) > 0
        and status.revision == revision_of(spec)
        and analysis_due(spec, status, now)
    )


def measure_comparisons(status: ModelRolloutStatus) -> bool:
    """Comparisons need both arms: at weight 100 the stable arm gets no traffic. In a shadow step
    (weight 0) the candidate answers the mirrored copies and the stable every request."""
    return 0 < status.weight < 100 or (status.weight == 0 and bool(status.shadowPercent))


def next_due(spec: ModelRolloutSpec, status: ModelRolloutStatus) -> datetime | None:
    """When the engine next wants a tick: the next analysis (or at once when something is to start)."""
    if status.phase in TERMINAL_PHASES:
        return None
    mark = _last_mark(status)
    if status.phase == "Invalid" or status.revision != revision_of(spec) or mark is None:
        return EPOCH
    return mark + timedelta(seconds=interval_of(spec))


def active(spec: Mapping[str, Any], status: Mapping[str, Any], annotations: Mapping[str, str]) -> bool:
    """Whether the object needs the fast timer (finished ones do not), from the raw object."""
    phase = status.get("phase")
    if phase not in TERMINAL_PHASES:
        return True
    try:
        if status.get("revision") != revision_of(ModelRolloutSpec.model_validate(spec)):
            return True
    except ValueError:
        return False  # an invalid edit of a finished rollout changes nothing
    handled = status.get("handled") or {}
    retry = action_annotations(annotations).get(ANNOTATION_RETRY)
    return bool(retry) and phase in ("RolledBack", "Aborted") and retry != handled.get("retry")


def route_weights(spec: ModelRolloutSpec, status: ModelRolloutStatus) -> dict[str, int]:
    """What the route must carry for this status: baseline, candidate, and retired services at 0."""
    stable = status.stableService or spec.stable.service
    out = {svc: 0 for svc in status.retiredServices if svc not in (stable, spec.candidate.service)}
    if spec.candidate.service == stable:
        out[stable] = 100
        return out
    w = candidate_weight(status)
    out[stable] = 100 - w
    out[spec.candidate.service] = w
    return out


def candidate_weight(status: ModelRolloutStatus) -> int:
    """The candidate's weight on the route: 0 while it has no ready endpoint in a running rollout
    (``status.weight`` keeps the step's weight it gets back), else ``status.weight``."""
    return 0 if status.candidateUnready and status.phase not in TERMINAL_PHASES else status.weight


def route_mirror(spec: ModelRolloutSpec, status: ModelRolloutStatus) -> tuple[str, int] | None:
    """(candidate Service, percent) the route must mirror to during a shadow step; None: no mirror
    (every other status, so a rollback, promotion, abort or new revision removes it)."""
    if (
        status.shadowPercent
        and status.phase not in (*TERMINAL_PHASES, "Invalid")
        and status.revision == revision_of(spec)
        and spec.candidate.service != (status.stableService or spec.stable.service)
    ):
        return spec.candidate.service, status.shadowPercent
    return None


def guard_weights(spec: ModelRolloutSpec, status: ModelRolloutStatus) -> dict[str, int] | None:
    """After a rollback or abort the candidate stays at 0 in this revision, whatever edits the route."""
    if status.phase in ("RolledBack", "Aborted") and status.revision == revision_of(spec):
        stable = status.stableService or spec.stable.service
        if stable != spec.candidate.service:
            return {spec.candidate.service: 0, stable: 100}
    return None


def deletion_weights(spec: ModelRolloutSpec, status: ModelRolloutStatus) -> dict[str, int] | None:
    """Traffic moves on deletion only while a rollout is in progress (or with revertOnDeletion)."""
    stable = status.stableService or spec.stable.service
    if stable == spec.candidate.service:
        return None
    if spec.revertOnDeletion or (status.phase not in (*TERMINAL_PHASES, "Pending") and exposure(status) > 0):
        return {stable: 100, spec.candidate.service: 0}
    return None


def reconcile(
    spec: ModelRolloutSpec,
    status: ModelRolloutStatus,
    *,
    now: datetime,
    generation: int,
    annotations: dict[str, str] | None = None,
    observations: Observations | None = None,
    gates: Mapping[str, GateAnswer] | None = None,
) -> Decision:
    """One decision; an analysis made in it is also appended to the bounded status.series.

    ``gates``: answers of the gates asked for this tick. A gate the engine needs and that has no
    answer here holds the weight and is named in ``Decision.asks``.
    """
    asks: list[str] = []
    d = _reconcile(
        spec,
        status,
        now=now,
        generation=generation,
        annotations=action_annotations(annotations),
        observations=observations,
        gates=(gates or {}, asks),
    )
    d.asks = asks
    status_.bound_texts(d.status)
    if series.analysed_now(status, d.status, now, observations is not None):
        series.append(d.status.series, series.rollout_point(d.status, now))
    return d


def _reconcile(
    spec: ModelRolloutSpec,
    status: ModelRolloutStatus,
    *,
    now: datetime,
    generation: int,
    annotations: dict[str, str] | None = None,
    observations: Observations | None = None,
    gates: tuple[Mapping[str, GateAnswer], list[str]],
) -> Decision:
    """Revision, terminal phases and annotations; the analysis; then the steps (engine/steps.py).

    Longer than the others: the measurements block below is kept inline (it becomes one call to the
    shared assessment of issue 17); everything before and after it is one call each.
    """
    tick = _Tick(spec, now, generation, annotations or {}, observations, *gates)
    s, actions, early = _begin(tick, status)
    if early is not None:
        return early
    if s.phase == post.PHASE:  # after the candidate reached 100%: bake and holdout (engine/post.py)
        return _post(tick, s, actions)

    # Measurements: guardrails at every interval, comparisons against stable within the epoch.
    hold_reasons: list[str] = []
    measured = observations is not None and exposure(s) > 0
    if measured:
        assert observations is not None
        ended, hold_reasons = _measure(spec, s, observations, actions, now, generation)
        if ended is not None:
            return ended
        planning.update(spec, s, observations.comparisons, actions, now, generation)
    elif exposure(s) > 0 and s.lastAnalysisTime is None:
        hold_reasons.append("waiting for the first analysis at this weight")
    analysed_here = measured and not hold_reasons
    if not measured and exposure(s) > 0:
        # Between analyses nothing moves; the next analysis is due at lastAnalysisTime + interval.
        _conditions(s, now, generation)
        return Decision(s, actions)

    return _steps(tick, s, actions, hold_reasons, analysed_here)


@dataclass(frozen=True)
class _Tick:
    """One call of reconcile: what each of its parts reads."""

    spec: ModelRolloutSpec
    now: datetime
    generation: int
    annotations: dict[str, str]
    observations: Observations | None
    answers: Mapping[str, GateAnswer]
    asks: list[str]


def _begin(t: _Tick, status: ModelRolloutStatus) -> tuple[ModelRolloutStatus, list[Event], Decision | None]:
    """Everything before the analysis: a new revision, a finished rollout, steps edits, abort and
    promote-full. A Decision when the tick ends here."""
    spec, now, generation, ann = t.spec, t.now, t.generation, t.annotations
    s = status.model_copy(deep=True)
    actions: list[Event] = []
    s.observedGeneration = generation
    s.conditions = status_.spec_valid(s.conditions, now, generation)

    rev = revision_of(spec)
    if s.revision != rev:
        s = _new_revision(spec, s, rev, now, generation, ann, actions)
        if s.phase != "Progressing" or s.history[-1].reason == "NewRevision":
            _conditions(s, now, generation)
            return s, actions, Decision(s, actions)

    if s.phase in TERMINAL_PHASES and _stays_finished(t, s, actions):
        _conditions(s, now, generation)
        return s, actions, Decision(s, actions)
    if s.phase == "Invalid":  # the spec became valid again: carry on where it stood
        s.phase = post.PHASE if post.running(s) else "Progressing"
        _history(s, now, "Valid", "SpecValid", "spec is valid again; resuming")

    sh = steps_hash(spec)
    if s.stepsHash != sh and s.phase != post.PHASE:  # the steps are behind a baking rollout
        if s.stepsHash is not None:
            msg = f"spec.steps changed: restarting the steps from step 0 at weight {s.weight}"
            actions.append(Event("Normal", "StepsChanged", msg))
            _history(s, now, "StepsChanged", "StepsChanged", msg)
            s.currentStep, s.stepStartedAt, s.stepWeight = 0, now, None
        s.stepsHash = sh
    return s, actions, _user_finish(t, s, actions)


def _stays_finished(t: _Tick, s: ModelRolloutStatus, actions: list[Event]) -> bool:
    """A finished rollout stays finished (True) unless a new retry restarts a rolled-back one."""
    spec, now = t.spec, t.now
    retry = t.annotations.get(ANNOTATION_RETRY)
    if retry and retry != s.handled.retry and s.phase in ("RolledBack", "Aborted"):
        s.handled.retry = retry
        msg = f"retry requested by annotation {ANNOTATION_RETRY}={retry}: steps restart from weight 0"
        _restart(spec, s, now)
        actions.append(Event("Normal", "RetryRequested", msg))
        _history(s, now, "Retry", "RetryRequested", msg)
        return False
    if retry:
        s.handled.retry = retry
    stable = s.stableService or spec.stable.service
    if s.phase == "Promoted" and spec.stable.service not in (stable, spec.candidate.service):
        s.message = (
            f"promoted: {stable} is serving; spec.stable ({spec.stable.service}) is ignored until "
            "the candidate changes"
        )
    return True


def _user_finish(t: _Tick, s: ModelRolloutStatus, actions: list[Event]) -> Decision | None:
    """User actions, by annotation: each new value acts once."""
    spec, now, generation, ann = t.spec, t.now, t.generation, t.annotations
    abort = ann.get(ANNOTATION_ABORT)
    if abort and abort != s.handled.abort:
        s.handled.abort = abort
        return _finish(
            s, actions, now, generation, "Aborted", 0, "AbortRequested",
            f"aborted by annotation {ANNOTATION_ABORT}={abort}: all traffic back to {_stable(spec, s)}",
        )  # fmt: skip
    full = ann.get(ANNOTATION_PROMOTE_FULL)
    if full and full != s.handled.promoteFull:
        s.handled.promoteFull = full
        return _finish(
            s, actions, now, generation, "Promoted", 100, "PromoteFullRequested",
            f"promoted by annotation {ANNOTATION_PROMOTE_FULL}={full}: skipping remaining steps, "
            "analysis and gates",
        )  # fmt: skip
    return None


def _steps(
    t: _Tick, s: ModelRolloutStatus, actions: list[Event], hold_reasons: list[str], analysed: bool
) -> Decision:
    """The step walk (engine/steps.py) after the analysis, and the conditions it ends with.

    ``hold_reasons``: why the analysis holds the weight; ``analysed``: an analysis ran and passed.
    """
    now, generation, observations = t.now, t.generation, t.observations
    ctx = steps.StepContext(
        spec=t.spec,
        now=now,
        annotations=t.annotations,
        hold_reasons=hold_reasons,
        analysed=analysed,
        candidate_ready=observations.candidate_ready if observations is not None else None,
        missing_evidence=_required_not_passed(t.spec.analysis.comparisons, s),
        values=_values(s.lastAnalysis),
        epoch=current_epoch(s, observations),
        answers=t.answers,
        asks=t.asks,
    )
    out = steps.run(s, ctx)
    actions += out.events
    if out.finish is not None:
        f = out.finish
        if f.phase == "Promoted" and t.spec.postPromotion is not None:
            actions += post.start(t.spec, s, now, generation)
            _conditions(s, now, generation)
            return Decision(s, actions)
        return _finish(s, actions, now, generation, f.phase, f.weight, f.reason, f.message, f.values)
    if out.progressing is not None:
        reason, message = out.progressing
        _conditions(s, now, generation, progressing_reason=reason, progressing_message=message)
    else:
        _conditions(s, now, generation)
    return Decision(s, actions)


def _post(t: _Tick, s: ModelRolloutStatus, actions: list[Event]) -> Decision:
    """A tick of the bake or holdout (engine/post.py); its end is a finish like any other."""
    obs = t.observations if t.observations is not None and s.weight > 0 else None
    out = post.tick(t.spec, s, obs, t.now, t.generation)
    actions += out.events
    if out.end is not None:
        e = out.end
        if e.phase == "RolledBack":  # the distinct reason as its own Event (the notification says it too)
            actions.append(Event("Warning", e.reason, e.message))
        return _finish(s, actions, t.now, t.generation, e.phase, e.weight, e.reason, e.message, e.values)
    _conditions(s, t.now, t.generation)
    return Decision(s, actions)


def _stable(spec: ModelRolloutSpec, s: ModelRolloutStatus) -> str:
    return s.stableService or spec.stable.service


def _new_revision(
    spec: ModelRolloutSpec,
    s: ModelRolloutStatus,
    rev: str,
    now: datetime,
    generation: int,
    ann: dict[str, str],
    actions: list[Event],
) -> ModelRolloutStatus:
    first = s.revision is None
    serving = s.stableService or spec.stable.service
    # After a promotion everything but the serving version was set to 0 in its last write.
    previous = [] if s.phase == "Promoted" else [*s.retiredServices, s.candidateService or ""]
    if s.phase == post.PHASE and s.candidateService:  # a new candidate mid-bake: the baked one serves
        serving, previous = s.candidateService, [*s.retiredServices, s.stableService or ""]
    keep = (serving, spec.candidate.service)
    retired = [] if first else [svc for svc in previous if svc and svc not in keep]
    new = ModelRolloutStatus(
        revision=rev,
        stableService=serving,
        candidateService=spec.candidate.service,
        retiredServices=retired[-4:],
        observedGeneration=generation,
        conditions=s.conditions,
        history=s.history,
        handled=s.handled,
    )
    # Annotations present before this revision started were meant for an earlier one.
    for key, attr in (
        (ANNOTATION_PROMOTE, "promote"),
        (ANNOTATION_PROMOTE_FULL, "promoteFull"),
        (ANNOTATION_ABORT, "abort"),
        (ANNOTATION_RESUME, "resume"),
        (ANNOTATION_RETRY, "retry"),
    ):
        setattr(new.handled, attr, ann.get(key, getattr(new.handled, attr)))
    if spec.candidate.service == serving:
        new.phase, new.weight = "Idle", 0
        new.message = f"{serving} is serving and is the candidate: nothing to roll out"
        _history(new, now, "Idle", "NothingToRollOut", new.message)
        return new
    _restart(spec, new, now)
    if first:
        msg = f"rolling out {_variant(spec.candidate)} over {serving}"
        reason = "Started"
    else:
        msg = (
            f"candidate changed (revision {s.revision} -> {rev}): rolling out {_variant(spec.candidate)} "
            f"over the serving {serving}, from weight 0"
            + (f"; {', '.join(retired)} set to 0" if retired else "")
        )
        reason = "NewRevision"
    new.message = msg
    actions.append(Event("Normal", reason, msg))
    _history(new, now, reason, reason, msg)
    return new


def _restart(spec: ModelRolloutSpec, s: ModelRolloutStatus, now: datetime) -> None:
    """Steps from the start at weight 0, with fresh evidence."""
    s.phase = "Progressing"
    s.weight = 0
    s.currentStep = 0
    s.stepWeight = None
    s.revisionStartedAt = s.stepStartedAt = s.epochStartedAt = now
    s.epochs = {}
    s.passedComparisons = []
    s.heldSince = None
    s.candidateUnready = False
    s.shadowPercent = None
    s.guardrailFailures = {}
    s.consecutiveErrors = 0
    s.lastAnalysis = []
    s.lastAnalysisTime = None
    s.plan = []
    s.postPromotion = None
    s.conditions = [
        c for c in s.conditions if c.type not in (planning.CONDITION, post.CONDITION)
    ]  # the old revision's forecast
    s.gates = []
    s.stepsHash = steps_hash(spec)


def _measure(
    spec: ModelRolloutSpec,
    s: ModelRolloutStatus,
    obs: Observations,
    actions: list[Event],
    now: datetime,
    generation: int,
) -> tuple[Decision | None, list[str]]:
    """One analysis, judged by the shared :func:`assess`: a Decision when it ends the rollout, else
    why nothing may advance (empty: the analysis passed)."""
    s.lastAnalysisTime = now
    results = _analyse(spec, s, obs)
    s.lastAnalysis = results
    # A pass of an always-valid test stays valid at any later time: latch it for the gate.
    for m in results:
        if (
            m.kind == "comparison"
            and m.verdict == "pass"
            and not m.carried
            and m.name not in s.passedComparisons
        ):
            s.passedComparisons.append(m.name)
    a = assess(_policy(spec), {"candidate": results}, s.guardrailFailures, s.consecutiveErrors)
    s.guardrailFailures, s.consecutiveErrors = a.failures, a.consecutive_errors
    end: tuple[str, str] | None = None
    if limit := a.at_limit("candidate"):
        end = ("GuardrailFailed", f"guardrail {limit[0].text()}")
    elif a.worse is not None:
        end = ("ComparisonFailed", f"candidate is worse than stable: {a.worse.message}")
    elif "candidate" in a.no_data_fail:
        end = ("NoData", f"{a.no_data_fail['candidate'].message} and analysis.noData is fail")
    elif a.error_limit_reached and spec.analysis.onErrorLimit == "rollback":
        return _finish(
            s, actions, now, generation, "RolledBack", 0, "ErrorLimitReached", a.error_limit_message()
        ), []
    if end is not None:
        return _finish(s, actions, now, generation, "RolledBack", 0, *end, _values(results)), []
    if a.error_limit_reached and a.error_limit_first:
        actions.append(Event("Warning", "ErrorLimitReached", a.error_limit_hold_message()))
        _history(s, now, "ErrorLimitReached", "ErrorLimitReached", a.error_limit_message())
    h = a.health()
    s.conditions = set_condition(s.conditions, "Healthy", h.status, h.reason, h.message, now, generation)
    return None, a.hold_reasons()


def _policy(spec: ModelRolloutSpec) -> Policy:
    """One measured arm (the candidate); a breach below failureLimit holds the steps, Healthy waits
    for the limit (then the rollout rolls back)."""
    g = spec.analysis.guardrails
    return Policy(spec.analysis, g, per_arm=False, breach_holds=True, breach_unhealthy=False)


def _analyse(spec: ModelRolloutSpec, s: ModelRolloutStatus, obs: Observations) -> list[Measurement]:
    """Guardrails on the candidate; comparisons stratified by epoch (closed epochs + the current one).

    At weight 100 the stable arm gets no traffic, so comparisons are not measured: their last
    measurement is carried (marked ``carried``) and does not gate anything.
    """
    out = [threshold.measure(g, obs.guardrails.get(g.name), "candidate") for g in spec.analysis.guardrails]
    m = len(spec.analysis.comparisons)
    if not measure_comparisons(s):
        prev = {x.name: x for x in s.lastAnalysis if x.kind == "comparison"}
        carried = [
            prev[c.name].model_copy(update={"carried": True})
            for c in spec.analysis.comparisons
            if c.name in prev
        ]
        return out + carried
    for c in spec.analysis.comparisons:
        alpha = spec.analysis.alpha / max(m, 1)
        pooled = _compare(c, obs.comparisons.get(c.name), s.epochs.get(c.name, []), alpha, _share(s))
        out.append(_unseen_in_shadow(s, _segmented(c, pooled, obs, s, alpha)))
    return out


def _unseen_in_shadow(s: ModelRolloutStatus, m: Measurement) -> Measurement:
    """In a shadow step no user sees the candidate's answers, so a metric users make (feedback,
    clicks) has no data there: such a comparison is undecided (not a hold, not a noData failure); it
    is measured again from the first weight, and the gate before 100% still needs its pass."""
    if s.weight or not s.shadowPercent or m.verdict != "noData":
        return m
    why = f"{m.message}; not measurable in a shadow step (no user sees the candidate's answers)"
    return m.model_copy(update={"verdict": "inconclusive", "message": why})


def _share(s: ModelRolloutStatus) -> int:
    """The candidate's percent of the samples both arms get: its weight, or in a shadow step at P%
    (the stable answers every request, the candidate P% copies) 100·P/(100+P)."""
    p = s.shadowPercent or 0
    return s.weight or round(100 * p / (100 + p))


def _segmented(
    c: Comparison, pooled: Measurement, obs: Observations, s: ModelRolloutStatus, alpha: float
) -> Measurement:
    """A comparison with ``segments``: its pooled measurement, judged in every segment too."""
    if c.segments is None or pooled.outcome != "value":
        return pooled
    strata = {}
    for v in c.segments.values:
        key = segments.segment_key(c.name, v)
        d = obs.comparisons.get(key)
        if d is None or d.stable is None or d.candidate is None:
            # Never a pass without every segment's counts (the handler measures them with the pool).
            held: Verdict = "inconclusive" if pooled.verdict == "pass" else pooled.verdict
            why = f"{c.name}: {c.segments.label} {v} not measured; {pooled.message}"
            return pooled.model_copy(update={"verdict": held, "message": why})
        closed = [(_to_data(c, e.stable), _to_data(c, e.candidate)) for e in s.epochs.get(key, [])]
        strata[v] = [*closed, (d.stable, d.candidate)]
    spec = segments.SegmentsSpec(c.segments, margin=c.margin or 0.0, better=c.better, alpha=alpha)
    res = segments.evaluate(spec, strata)
    f = segments.finding(spec, res)
    verdict = segments.combine(pooled.verdict, f.verdict)
    pooled_text = pooled.message.removeprefix(f"{c.name}: ")
    message = f"{c.name}: {f.message}; pooled: {pooled_text}"
    details = {**(pooled.details or {}), **f.numbers}
    update = {"verdict": verdict, "message": message, "segments": segments.rows(res), "details": details}
    return pooled.model_copy(update=update)


def _to_data(c: Comparison, arm: ArmCounts) -> stats.ProportionData | stats.MeanData:
    if c.type == "proportion":
        return stats.ProportionData(min(arm.total, arm.n), arm.n)
    return stats.MeanData(arm.n, arm.total, arm.squares) if arm.n > 0 else stats.MeanData(0.0, 0.0, 0.0)


def _to_arm(d: stats.ProportionData | stats.MeanData) -> ArmCounts:
    if isinstance(d, stats.ProportionData):
        return ArmCounts(n=d.trials, total=d.successes)
    return ArmCounts(n=d.count, total=d.total, squares=d.sum_squares)


def _compare(
    c: Comparison, data: ComparisonData | None, closed: list[EpochCounts], alpha: float, weight: int = 50
) -> Measurement:
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
    if type(data.stable) is not type(data.candidate) or (
        isinstance(data.stable, stats.ProportionData) != (c.type == "proportion")
    ):
        return Measurement(
            name=c.name, kind="comparison", outcome="error", verdict="error",
            message=f"{c.name}: stable and candidate data differ in type",
        )  # fmt: skip
    strata = [(_to_data(c, e.stable), _to_data(c, e.candidate)) for e in closed]
    strata.append((data.stable, data.candidate))
    spec = sequential.SequentialSpec(
        alpha=alpha,
        better=c.better,
        test="nonInferiority" if c.test == "nonInferiority" else "superiority",
        margin=c.margin or 0.0,
        allocation=weight / 100.0,  # the split in force, for the running test's sample estimate
        names=ROLLOUT_NAMES,
    )
    f = sequential.judge(spec, strata)
    return Measurement(
        name=c.name,
        kind="comparison",
        variant="candidate",
        outcome="value",
        value=f.value,
        threshold=f"{c.test} margin {c.margin or 0.0:g}, alpha {alpha:.4g}"
        + (", advisory" if c.advisory else ""),
        verdict=f.verdict,
        message=f"{c.name}: {f.message}",
        details={**f.numbers, "epochs": float(len(strata))},
    )


def _required_not_passed(comparisons: list[Comparison], s: ModelRolloutStatus) -> list[str]:
    """Required (non-advisory) comparisons that have not shown what their test asks, with why."""
    last = {m.name: m for m in s.lastAnalysis if m.kind == "comparison"}
    out = []
    for c in comparisons:
        if c.advisory:
            continue
        m = last.get(c.name)
        if m is None:
            out.append(f"comparison {c.name} has no measurement yet")
        elif m.verdict != "pass" and c.name not in s.passedComparisons:
            more = (m.details or {}).get("moreSamplesNeeded")
            need = f"; about {more:,.0f} more samples needed at the current rate of evidence" if more else ""
            out.append(f"comparison {c.name} has not passed its {c.test} test ({m.verdict}){need}")
    return out


def _values(results: list[Measurement]) -> dict[str, float]:
    return {m.name: m.value for m in results if m.value is not None}


def _variant(v: object) -> str:
    svc = getattr(v, "service", "?")
    ver = getattr(v, "modelVersion", None)
    return f"{svc}" + (f" ({ver})" if ver else "")


def current_epoch(s: ModelRolloutStatus, observations: Observations | None) -> dict[str, EpochCounts]:
    """The counts of the epoch in progress, per comparison: what a weight change closes."""
    if observations is None or not measure_comparisons(s):
        return {}
    return {
        name: EpochCounts(weight=s.weight, stable=_to_arm(d.stable), candidate=_to_arm(d.candidate))
        for name, d in observations.comparisons.items()
        if d.problem is None and d.stable is not None and d.candidate is not None
    }


def _finish(
    s: ModelRolloutStatus,
    actions: list[Event],
    now: datetime,
    generation: int,
    phase: str,
    weight: int,
    reason: str,
    message: str,
    values: dict[str, float] | None = None,
) -> Decision:
    if s.shadowPercent:  # the mirror goes in the same route write; users never saw the candidate
        message = (
            f"{message} (during the shadow step: {s.shadowPercent}% of requests mirrored, "
            "candidate weight 0; no user saw its answers)"
            if phase == "RolledBack"
            else message
        )
        s.shadowPercent = None
    s.phase = phase  # type: ignore[assignment]
    s.weight = weight
    s.stepWeight = None
    s.heldSince = None
    s.candidateUnready = False
    s.message = message
    post.ended(s, reason, message, now, generation)
    if phase == "Promoted":
        replaced = s.stableService
        s.stableService = s.candidateService
        # A promotion below weight 100 (promote full) leaves the replaced baseline with traffic unless
        # it is zeroed in the same write as the candidate's 100.
        if replaced and replaced != s.stableService and replaced not in s.retiredServices:
            s.retiredServices = [*s.retiredServices, replaced][-4:]
    if reason in LIMIT_REASONS:
        actions.append(Event("Warning", reason, message))
    actions.append(Event("Warning" if phase != "Promoted" else "Normal", phase, message))
    _history(s, now, phase, reason, message, values)
    _conditions(s, now, generation, reason)
    return Decision(s, actions)


_history = steps.record


def _conditions(
    s: ModelRolloutStatus,
    now: datetime,
    generation: int,
    reason: str | None = None,
    *,
    progressing_reason: str | None = None,
    progressing_message: str | None = None,
) -> None:
    """Completed: finished either way. Promoted: True only on success, so `kubectl wait` can tell."""
    c: list[Condition] = s.conditions
    done = s.phase in TERMINAL_PHASES
    if progressing_reason:
        c = set_condition(
            c, "Progressing", "False", progressing_reason, progressing_message or "", now, generation
        )
    else:
        c = set_condition(c, "Progressing", "False" if done else "True", s.phase, s.message, now, generation)
    c = set_condition(c, "Completed", "True" if done else "False", s.phase, s.message, now, generation)
    if s.phase == "Promoted":
        c = set_condition(c, "Promoted", "True", reason or "Promoted", s.message, now, generation)
    elif s.phase in ("RolledBack", "Aborted"):
        c = set_condition(c, "Promoted", "False", reason or s.phase, s.message, now, generation)
    elif s.phase == post.PHASE:
        msg = "the candidate has 100%; promoted when the post-promotion bake (and holdout) pass"
        c = set_condition(c, "Promoted", "False", "Baking", msg, now, generation)
    elif s.phase != "Idle":
        c = set_condition(c, "Promoted", "False", "InProgress", "not promoted yet", now, generation)
    if s.phase == "RolledBack":
        c = set_condition(c, "Healthy", "False", reason or "RolledBack", s.message, now, generation)
    s.conditions = c
