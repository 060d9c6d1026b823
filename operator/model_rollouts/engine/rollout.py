"""The ModelRollout state machine: a pure function (spec, status, observations, now) -> (status, actions).

No I/O happens here. The handler measures, calls :func:`reconcile`, then applies the actions
(weights, Events) and writes the returned status. Every transition is explained in status.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from model_rollouts.analysis import sequential, stats, threshold
from model_rollouts.analysis.assess import Policy, assess
from model_rollouts.analysis.comparison import ROLLOUT_NAMES
from model_rollouts.analysis.vocabulary import Result
from model_rollouts.api.common import (
    ArmCounts,
    Condition,
    Measurement,
    action_annotations,
    dump,
    get_condition,
    parse_duration,
    set_condition,
)
from model_rollouts.api.notification import Gate, GateState
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
from model_rollouts.engine import series
from model_rollouts.engine import status as status_
from model_rollouts.engine.actions import LIMIT_REASONS, Event

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Closed epochs kept per comparison (each weight change closes one).
EPOCH_LIMIT = 60


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


@dataclass(frozen=True)
class GateAnswer:
    """What a gate said when the handler asked it: open (a 2xx) or not, and a fixed, sanitised text."""

    open: bool
    message: str
    #: Not asked: still answering another object's request. Holds, but is not a closed gate.
    busy: bool = False


def revision_of(spec: ModelRolloutSpec) -> str:
    """A new revision starts when the candidate changes; the baseline is whatever is serving."""
    return hashlib.sha256(json.dumps(dump(spec.candidate), sort_keys=True).encode()).hexdigest()[:10]


def steps_hash(spec: ModelRolloutSpec) -> str:
    body = json.dumps([dump(st) for st in spec.steps], sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:10]


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
    """Metrics are read only while the candidate gets traffic in an active rollout, once per interval."""
    return (
        status.phase not in (*TERMINAL_PHASES, "Invalid")
        and status.weight > 0
        and status.revision == revision_of(spec)
        and analysis_due(spec, status, now)
    )


def measure_comparisons(status: ModelRolloutStatus) -> bool:
    """Comparisons need both arms: at weight 100 the stable arm gets no traffic."""
    return 0 < status.weight < 100


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
    out[stable] = 100 - status.weight
    out[spec.candidate.service] = status.weight
    return out


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
    if spec.revertOnDeletion or (status.phase not in (*TERMINAL_PHASES, "Pending") and status.weight > 0):
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
    if observations is not None and d.status.lastAnalysisTime == now != status.lastAnalysisTime:
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
    s = status.model_copy(deep=True)
    actions: list[Event] = []
    ann = annotations or {}
    s.observedGeneration = generation
    s.conditions = set_condition(s.conditions, "Valid", "True", "SpecValid", "spec accepted", now, generation)

    rev = revision_of(spec)
    if s.revision != rev:
        s = _new_revision(spec, s, rev, now, generation, ann, actions)
        if s.phase != "Progressing" or s.history[-1].reason == "NewRevision":
            _conditions(s, now, generation)
            return Decision(s, actions)

    if s.phase in TERMINAL_PHASES:
        retry = ann.get(ANNOTATION_RETRY)
        if retry and retry != s.handled.retry and s.phase in ("RolledBack", "Aborted"):
            s.handled.retry = retry
            msg = f"retry requested by annotation {ANNOTATION_RETRY}={retry}: steps restart from weight 0"
            _restart(spec, s, now)
            actions.append(Event("Normal", "RetryRequested", msg))
            _history(s, now, "Retry", "RetryRequested", msg)
        else:
            if retry:
                s.handled.retry = retry
            stable = s.stableService or spec.stable.service
            if s.phase == "Promoted" and spec.stable.service not in (stable, spec.candidate.service):
                s.message = (
                    f"promoted: {stable} is serving; spec.stable ({spec.stable.service}) is ignored until "
                    "the candidate changes"
                )
            _conditions(s, now, generation)
            return Decision(s, actions)
    if s.phase == "Invalid":  # the spec became valid again: carry on where it stood
        s.phase = "Progressing"
        _history(s, now, "Valid", "SpecValid", "spec is valid again; resuming")

    sh = steps_hash(spec)
    if s.stepsHash != sh:
        if s.stepsHash is not None:
            msg = f"spec.steps changed: restarting the steps from step 0 at weight {s.weight}"
            actions.append(Event("Normal", "StepsChanged", msg))
            _history(s, now, "StepsChanged", "StepsChanged", msg)
            s.currentStep, s.stepStartedAt, s.stepWeight = 0, now, None
        s.stepsHash = sh

    # User actions, by annotation: each new value acts once.
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

    # Measurements: guardrails at every interval, comparisons against stable within the epoch.
    hold_reasons: list[str] = []
    measured = observations is not None and s.weight > 0
    if measured:
        assert observations is not None
        ended, hold_reasons = _measure(spec, s, observations, actions, now, generation)
        if ended is not None:
            return ended
    elif s.weight > 0 and s.lastAnalysisTime is None:
        hold_reasons.append("waiting for the first analysis at this weight")
    analysed_here = measured and not hold_reasons
    if not measured and s.weight > 0:
        # Between analyses nothing moves; the next analysis is due at lastAnalysisTime + interval.
        _conditions(s, now, generation)
        return Decision(s, actions)

    # Pausing.
    if spec.paused:
        if s.phase != "Paused":
            actions.append(Event("Normal", "Paused", "paused by spec.paused"))
            _history(s, now, "Paused", "SpecPaused", "paused by spec.paused")
        s.phase, s.message, s.heldSince = "Paused", f"paused by spec.paused at weight {s.weight}", None
        _conditions(s, now, generation)
        return Decision(s, actions)
    if s.phase == "Paused" and not _at_manual_gate(spec, s):
        s.phase = "Progressing"
        actions.append(Event("Normal", "Resumed", "spec.paused cleared"))
        _history(s, now, "Resumed", "SpecResumed", "spec.paused cleared")

    # An early resume (no gate waiting) is consumed without effect: it never releases a later gate.
    resume = ann.get(ANNOTATION_RESUME)
    if resume and resume != s.handled.resume and not _at_manual_gate(spec, s):
        s.handled.resume = resume
        msg = f"resume annotation {ANNOTATION_RESUME}={resume} ignored: no manual gate is waiting"
        actions.append(Event("Normal", "ResumeIgnored", msg))
        _history(s, now, "ResumeIgnored", "ResumeIgnored", msg)

    # Promote (one step) moves past the pause or analysis step that is current when it arrives; one
    # that arrives at any other step is consumed without effect, so it never skips a later step.
    promote = ann.get(ANNOTATION_PROMOTE)
    promote_step: int | None = None
    if promote and promote != s.handled.promote:
        if _at_pause_or_analysis(spec, s):
            promote_step = s.currentStep
        else:
            s.handled.promote = promote
            msg = (
                f"promote annotation {ANNOTATION_PROMOTE}={promote} ignored: step {s.currentStep} is not a "
                f"pause or analysis step; {ANNOTATION_PROMOTE_FULL} skips to 100%"
            )
            actions.append(Event("Normal", "PromoteIgnored", msg))
            _history(s, now, "PromoteIgnored", "PromoteIgnored", msg)

    if observations is not None and observations.candidate_ready is False:
        hold_reasons.append(f"candidate {spec.candidate.service} has no ready endpoints")

    # Steps: advance while nothing blocks; at most one weight change per analysis.
    gate_ok = not hold_reasons and (analysed_here or s.weight == 0)
    gate_hold: str | None = None
    gate_reason = "GateClosed"
    waiting_evidence: list[str] = []
    evidence_only = False
    while True:
        if s.currentStep >= len(spec.steps):
            target = 100
        else:
            step = spec.steps[s.currentStep]
            if step.setWeight is None:
                if promote_step == s.currentStep and promote:
                    s.handled.promote = promote
                    promote_step = None
                    kind = (
                        "manual gate"
                        if step.pause and step.pause.duration is None
                        else ("pause" if step.pause else "analysis")
                    )
                    msg = (
                        f"{kind} step {s.currentStep} skipped by annotation {ANNOTATION_PROMOTE}={promote}; "
                        "later steps are analysed as usual"
                    )
                    actions.append(Event("Normal", "PromoteRequested", msg))
                    _history(s, now, "StepSkipped", "PromoteRequested", msg)
                    if s.phase == "Paused":
                        s.phase = "Progressing"
                    _advance(s, now)
                    continue
                if step.pause is not None and step.pause.duration is None:
                    if resume and resume != s.handled.resume:
                        s.handled.resume = resume
                        actions.append(
                            Event("Normal", "Resumed", f"resumed by annotation {ANNOTATION_RESUME}={resume}")
                        )
                        _history(
                            s,
                            now,
                            "Resumed",
                            "ResumeRequested",
                            f"manual gate at step {s.currentStep} released",
                        )
                        s.phase = "Progressing"
                        _advance(s, now)
                        continue
                    if s.phase != "Paused":
                        actions.append(Event("Normal", "Paused", f"manual gate at step {s.currentStep}"))
                        _history(
                            s, now, "Paused", "ManualGate", f"waiting at step {s.currentStep} for a resume"
                        )
                    s.phase, s.heldSince = "Paused", None
                    s.message = (
                        f"waiting at step {s.currentStep} (weight {s.weight}) for "
                        f"`kubectl annotate mro ... {ANNOTATION_RESUME}=<token>`"
                    )
                    break
                spec_duration = (
                    step.pause.duration if step.pause else (step.analysis and step.analysis.duration)
                )
                duration = parse_duration(spec_duration or "0s")
                elapsed = (now - (s.stepStartedAt or now)).total_seconds()
                kind = "pause" if step.pause else "analysis"
                if elapsed < duration:
                    s.message = (
                        f"step {s.currentStep}: {kind} at weight {s.weight}, {duration - elapsed:.0f}s left"
                    )
                    if hold_reasons:
                        s.message += f" ({'; '.join(hold_reasons)})"
                    break
                if not gate_ok:
                    why = "; ".join(hold_reasons)
                    s.message = f"holding at weight {s.weight} after {kind} step {s.currentStep}: {why}"
                    break
                _advance(s, now)
                continue
            target = step.setWeight
        if s.weight == target:
            if s.currentStep >= len(spec.steps):
                if not gate_ok:
                    s.message = f"holding at weight 100 before promotion: {'; '.join(hold_reasons)}"
                    break
                return _finish(
                    s, actions, now, generation, "Promoted", 100, "AnalysisPassed",
                    "all steps completed with passing analysis", _values(s.lastAnalysis),
                )  # fmt: skip
            _advance(s, now)
            continue
        if s.weight > 0 and not gate_ok:
            s.message = f"holding at weight {s.weight} (step {s.currentStep}): {'; '.join(hold_reasons)}"
            break
        nxt = target
        if spec.maxWeightStep and abs(target - s.weight) > spec.maxWeightStep:
            nxt = s.weight + spec.maxWeightStep * (1 if target > s.weight else -1)
        if nxt == 100:
            # The promotion gate comes before the final increase: every required comparison must
            # have shown what its test asks (fail closed), unless the deadline policy says promote.
            waiting_evidence = _required_not_passed(spec.analysis.comparisons, s)
            # Only a measured-but-undecided comparison is "inconclusive"; missing data is a
            # progress problem (onProgressDeadline), never evidence.
            evidence_only = not hold_reasons
            if waiting_evidence and not _deadline_promotes(spec, s, now):
                s.message = f"holding at weight {s.weight} before full traffic: " + "; ".join(
                    waiting_evidence
                )
                hold_reasons += waiting_evidence
                break
        where = (
            f"step {s.currentStep}: setWeight {target}"
            if s.currentStep < len(spec.steps)
            else "all steps done"
        )
        hold = _gates_closed(spec, s, actions, now, nxt, *gates)
        if hold.why:
            gate_hold = s.message = f"holding at weight {s.weight} before weight {nxt}: {hold.why}"
            gate_reason = "GateBusy" if hold.busy else "GateClosed"
            hold_reasons += hold.overdue  # past maxHold, a gate's hold counts towards progressDeadline
            break
        split = f" (split by maxWeightStep {spec.maxWeightStep})" if nxt != target else ""
        _set_weight(s, actions, now, nxt, where + split, observations)
        s.stepWeight = nxt if nxt != target else None
        if nxt == target and s.currentStep < len(spec.steps):
            _advance(s, now)
        break

    # Deadlines: a hold without progress ends by the user's policy.
    if hold_reasons and s.phase != "Paused":
        s.heldSince = s.heldSince or now
        held = (now - s.heldSince).total_seconds()
        deadline = parse_duration(spec.progressDeadline)
        if held >= deadline:
            why = f"held {held:.0f}s (progressDeadline {spec.progressDeadline}): {'; '.join(hold_reasons)}"
            inconclusive = bool(waiting_evidence) and evidence_only
            policy = spec.analysis.onInconclusive if inconclusive else spec.onProgressDeadline
            reason = "Inconclusive" if inconclusive else "ProgressDeadlineExceeded"
            if policy == "rollback":
                return _finish(s, actions, now, generation, "RolledBack", 0, reason, why)
            progressing = get_condition(s.conditions, "Progressing")
            if progressing is None or progressing.reason != reason:
                actions.append(Event("Warning", reason, why + "; holding"))
                _history(s, now, reason, reason, why)
            s.phase = "Paused" if s.phase == "Paused" else "Progressing"
            _conditions(s, now, generation, progressing_reason=reason, progressing_message=why)
            return Decision(s, actions)
    else:
        s.heldSince = None

    s.phase = "Paused" if s.phase == "Paused" else "Progressing"
    if gate_hold:  # like a manual pause: a deliberate hold, not counted towards progressDeadline
        _conditions(s, now, generation, progressing_reason=gate_reason, progressing_message=gate_hold)
    else:
        _conditions(s, now, generation)
    return Decision(s, actions)


def gates_before(spec: ModelRolloutSpec, weight: int, nxt: int) -> list[Gate]:
    """The gates a move from ``weight`` to ``nxt`` must pass."""
    return [
        g
        for g in spec.gates
        if (g.type == "confirm-promotion" and nxt == 100 > weight)
        or (g.type == "confirm-rollout" and nxt > weight)
    ]


@dataclass
class GateHold:
    """Why the gates before a move hold it ('' if they all answered 2xx)."""

    why: str = ""
    #: Every holding gate was busy with another object's request (not closed).
    busy: bool = False
    #: Holds longer than the gate's maxHold: they count towards progressDeadline.
    overdue: list[str] = field(default_factory=list)


def _gates_closed(
    spec: ModelRolloutSpec,
    s: ModelRolloutStatus,
    actions: list[Event],
    now: datetime,
    nxt: int,
    answers: Mapping[str, GateAnswer],
    asks: list[str],
) -> GateHold:
    """Why the gates before this move hold it; records each answer.

    A gate that is busy (still answering another object's request) holds like a closed one but is
    not recorded as closed: no GateClosed Event or notification. A gate's hold is exempt from
    progressDeadline for its ``maxHold``; after that it is named in ``overdue``.
    """
    closed: list[str] = []
    busy: list[bool] = []
    overdue: list[str] = []
    for g in gates_before(spec, s.weight, nxt):
        a = answers.get(g.name)
        if a is None:
            asks.append(g.name)
            closed.append(f"gate {g.name} ({g.type}) has not been asked yet")
            busy.append(False)
            continue
        old = next((x for x in s.gates if x.name == g.name), None)
        was_closed = old is not None and not old.open and not old.busy
        if a.open:
            state = GateState(name=g.name, open=True, message=a.message[:1024], lastAskedTime=now)
            s.gates = [*(x for x in s.gates if x.name != g.name), state]
            if was_closed:
                msg = f"gate {g.name} ({g.type}, provider {g.provider}) opened: {a.message}"
                actions.append(Event("Normal", "GateOpened", msg))
                _history(s, now, "GateOpened", "GateOpened", msg)
            continue
        since = old.heldSince if old is not None and not old.open and old.heldSince is not None else now
        state = GateState(
            name=g.name,
            open=False,
            message=a.message[:1024],
            lastAskedTime=now,
            busy=True if a.busy else None,
            heldSince=since,
        )
        s.gates = [*(x for x in s.gates if x.name != g.name), state]
        held = (now - since).total_seconds()
        if held >= parse_duration(g.maxHold):
            overdue.append(f"gate {g.name} has held for {held:.0f}s, more than its maxHold {g.maxHold}")
        busy.append(a.busy)
        if a.busy:
            closed.append(
                f"gate {g.name} ({g.type}, provider {g.provider}) is busy with another request; "
                "asked again at the next analysis"
            )
            continue
        why = (
            f"gate {g.name} ({g.type}, provider {g.provider}) is closed: {a.message}; "
            "asked again at the next analysis"
        )
        closed.append(why)
        if not was_closed:
            actions.append(Event("Warning", "GateClosed", why))
            _history(s, now, "GateClosed", "GateClosed", why)
    return GateHold("; ".join(closed), bool(busy) and all(busy), overdue)


def _stable(spec: ModelRolloutSpec, s: ModelRolloutStatus) -> str:
    return s.stableService or spec.stable.service


def _at_manual_gate(spec: ModelRolloutSpec, s: ModelRolloutStatus) -> bool:
    if s.currentStep >= len(spec.steps):
        return False
    st = spec.steps[s.currentStep]
    return st.pause is not None and st.pause.duration is None


def _at_pause_or_analysis(spec: ModelRolloutSpec, s: ModelRolloutStatus) -> bool:
    return s.currentStep < len(spec.steps) and spec.steps[s.currentStep].setWeight is None


def _deadline_promotes(spec: ModelRolloutSpec, s: ModelRolloutStatus, now: datetime) -> bool:
    if spec.analysis.onInconclusive != "promote" or s.heldSince is None:
        return False
    return (now - s.heldSince).total_seconds() >= parse_duration(spec.progressDeadline)


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
    keep = (serving, spec.candidate.service)
    # After a promotion everything but the serving version was set to 0 in its last write.
    previous = [] if s.phase == "Promoted" else [*s.retiredServices, s.candidateService or ""]
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
    s.guardrailFailures = {}
    s.consecutiveErrors = 0
    s.lastAnalysis = []
    s.lastAnalysisTime = None
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
        out.append(
            _compare(
                c,
                obs.comparisons.get(c.name),
                s.epochs.get(c.name, []),
                spec.analysis.alpha / max(m, 1),
                s.weight,
            )
        )
    return out


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


def _advance(s: ModelRolloutStatus, now: datetime) -> None:
    s.currentStep += 1
    s.stepStartedAt = now
    s.stepWeight = None


def close_epoch(s: ModelRolloutStatus, observations: Observations | None, now: datetime) -> None:
    """A weight change ends the epoch: its counts join the closed ones, and a new epoch starts now."""
    if observations is not None and 0 < s.weight < 100:
        for name, d in observations.comparisons.items():
            if d.problem is None and d.stable is not None and d.candidate is not None:
                epochs = s.epochs.setdefault(name, [])
                epochs.append(
                    EpochCounts(weight=s.weight, stable=_to_arm(d.stable), candidate=_to_arm(d.candidate))
                )
                del epochs[:-EPOCH_LIMIT]
    s.epochStartedAt = now


def _set_weight(
    s: ModelRolloutStatus,
    actions: list[Event],
    now: datetime,
    weight: int,
    why: str,
    observations: Observations | None,
) -> None:
    msg = f"weight {s.weight} -> {weight}: {why}"
    close_epoch(s, observations, now)
    s.weight = weight
    s.message = msg
    s.heldSince = None
    actions.append(Event("Normal", "WeightChanged", msg))
    _history(s, now, "WeightChanged", "StepAdvanced", msg)


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
    s.phase = phase  # type: ignore[assignment]
    s.weight = weight
    s.stepWeight = None
    s.heldSince = None
    s.message = message
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


def _history(
    s: ModelRolloutStatus,
    now: datetime,
    event: str,
    reason: str,
    message: str,
    values: dict[str, float] | None = None,
) -> None:
    status_.record(s, now, event, reason, message, values, weight=s.weight, step=s.currentStep)


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
    elif s.phase != "Idle":
        c = set_condition(c, "Promoted", "False", "InProgress", "not promoted yet", now, generation)
    if s.phase == "RolledBack":
        c = set_condition(c, "Healthy", "False", reason or "RolledBack", s.message, now, generation)
    s.conditions = c
