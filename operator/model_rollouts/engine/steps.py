"""The ModelRollout step runner: one walk over ``spec.steps`` per tick (pure, no I/O).

:func:`run` is what :func:`model_rollouts.engine.rollout.reconcile` does once the analysis of
this tick is known: spec.paused, the resume and promote annotations, then the walk (setWeight,
pause, analysis and shadow steps, manual gates, ``maxWeightStep``, the promotion evidence gate, the
webhook gates), then the progress deadline. At most one weight change per tick.

A **shadow step** (``shadow: {percent, duration}``) keeps the candidate's weight at 0 and sets
``status.shadowPercent``: the route mirrors that share of live requests to the candidate (its answers
are dropped), and the analysis measures the candidate on them as at any weight (see
:func:`exposure`). Starting it starts an epoch; after ``duration`` and a passing analysis it ends
(``shadowPercent`` unset, the mirror removed in the same route write as the next weight).

It changes the status in place and says in a :class:`StepOutcome` how the tick ends: a terminal
phase to enter (the rollout engine applies it), or the reason the Progressing condition gets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from model_rollouts.api.common import get_condition, parse_duration
from model_rollouts.api.notification import Gate, GateState
from model_rollouts.api.rollout import (
    ANNOTATION_PROMOTE,
    ANNOTATION_PROMOTE_FULL,
    ANNOTATION_RESUME,
    EpochCounts,
    ModelRolloutSpec,
    ModelRolloutStatus,
    Step,
)
from model_rollouts.engine import status as status_
from model_rollouts.engine.actions import Event

#: Closed epochs kept per comparison (each weight change closes one).
EPOCH_LIMIT = 60


@dataclass(frozen=True)
class GateAnswer:
    """What a gate said when the handler asked it: open (a 2xx) or not, and a fixed, sanitised text."""

    open: bool
    message: str
    #: Not asked: still answering another object's request. Holds, but is not a closed gate.
    busy: bool = False


@dataclass(frozen=True)
class StepContext:
    """What the walk needs besides the status: the spec, the tick, and what the analysis found."""

    spec: ModelRolloutSpec
    now: datetime
    annotations: Mapping[str, str]
    #: Why nothing may advance at this tick (from the analysis); the walk adds its own.
    hold_reasons: list[str]
    #: An analysis ran at this tick and nothing held it.
    analysed: bool
    #: None: readiness unknown (no EndpointSlices visible).
    candidate_ready: bool | None
    #: Required comparisons that have not shown what their test asks (the promotion gate), with why.
    missing_evidence: list[str]
    #: Values recorded with a promotion (the last analysis).
    values: dict[str, float]
    #: The current epoch's counts per comparison: closed (kept) when the weight changes.
    epoch: dict[str, EpochCounts]
    #: The answers of the gates asked for this tick.
    answers: Mapping[str, GateAnswer]
    #: Gates (by name) the walk needs answered; it appends to this list.
    asks: list[str]


@dataclass(frozen=True)
class Finish:
    """A terminal phase to enter, with the weight it leaves and why."""

    phase: str
    weight: int
    reason: str
    message: str
    values: dict[str, float] | None = None


@dataclass
class StepOutcome:
    """How the tick ends: Events to emit, and a terminal phase or the Progressing condition's reason."""

    events: list[Event]
    finish: Finish | None = None
    #: (reason, message) for Progressing=False when a hold is to be shown there; else by phase.
    progressing: tuple[str, str] | None = None


@dataclass
class _Walk:
    """What one walk learns on its way: why it holds, and whether a gate or the evidence holds it."""

    events: list[Event]
    holds: list[str]
    ok: bool = False
    promote_step: int | None = None
    gate_hold: str | None = None
    gate_reason: str = "GateClosed"
    waiting_evidence: list[str] = field(default_factory=list)
    evidence_only: bool = False


def exposure(s: ModelRolloutStatus) -> int:
    """The candidate's share of live requests that the analysis sees: its weight, or during a shadow
    step (weight 0) the share mirrored to it."""
    return s.weight or (s.shadowPercent or 0)


def run(s: ModelRolloutStatus, ctx: StepContext) -> StepOutcome:
    """Pausing, the annotations, then the steps while nothing blocks, then the progress deadline."""
    w = _Walk(events=[], holds=list(ctx.hold_reasons))
    if _paused_by_spec(ctx, s, w):
        return StepOutcome(w.events)
    _early_annotations(ctx, s, w)
    _readiness(ctx, s, w)
    # Steps: advance while nothing blocks; at most one weight change per analysis.
    w.ok = not w.holds and (ctx.analysed or exposure(s) == 0)
    finish = _walk(ctx, s, w)
    if finish is not None:
        return StepOutcome(w.events, finish=finish)
    out = _deadline(ctx, s, w)
    if s.candidateUnready and "no ready endpoints" not in (s.message or ""):  # e.g. waiting at a gate
        s.message = f"{s.message}; candidate {ctx.spec.candidate.service} has no ready endpoints (weight 0)"
    return out


def _readiness(ctx: StepContext, s: ModelRolloutStatus, w: _Walk) -> None:
    """An unready candidate gets 0 on the route (``candidateUnready``) and holds at its step; once
    ready it gets the step's weight back. Unknown readiness (None) changes nothing."""
    cand = ctx.spec.candidate.service
    if ctx.candidate_ready is None and s.candidateUnready:
        w.holds.append(
            f"candidate {cand} had no ready endpoints at the last look (weight 0 until it is ready)"
        )
    elif ctx.candidate_ready is False:
        w.holds.append(f"candidate {cand} has no ready endpoints (weight 0 until it is ready)")
        if not s.candidateUnready:
            s.candidateUnready = True
            msg = f"candidate {cand} has no ready endpoints: weight {s.weight} -> 0 until it is ready"
            w.events.append(Event("Warning", "CandidateUnready", msg))
            record(s, ctx.now, "CandidateUnready", "CandidateUnready", msg)
    elif ctx.candidate_ready and s.candidateUnready:
        s.candidateUnready = False
        msg = f"candidate {cand} is ready again: weight 0 -> {s.weight} (step {s.currentStep})"
        w.events.append(Event("Normal", "CandidateReady", msg))
        record(s, ctx.now, "CandidateReady", "CandidateReady", msg)


def record(
    s: ModelRolloutStatus,
    now: datetime,
    event: str,
    reason: str,
    message: str,
    values: dict[str, float] | None = None,
) -> None:
    """A rollout's history entry: the transition with the weight and step it happened at."""
    status_.record(s, now, event, reason, message, values, weight=s.weight, step=s.currentStep)


def _paused_by_spec(ctx: StepContext, s: ModelRolloutStatus, w: _Walk) -> bool:
    if ctx.spec.paused:
        if s.phase != "Paused":
            w.events.append(Event("Normal", "Paused", "paused by spec.paused"))
            record(s, ctx.now, "Paused", "SpecPaused", "paused by spec.paused")
        s.phase, s.message, s.heldSince = "Paused", f"paused by spec.paused at weight {s.weight}", None
        return True
    if s.phase == "Paused" and not _at_manual_gate(ctx.spec, s):
        s.phase = "Progressing"
        w.events.append(Event("Normal", "Resumed", "spec.paused cleared"))
        record(s, ctx.now, "Resumed", "SpecResumed", "spec.paused cleared")
    return False


def _early_annotations(ctx: StepContext, s: ModelRolloutStatus, w: _Walk) -> None:
    """Resume and promote annotations that arrive where they cannot act are consumed without effect."""
    spec, now = ctx.spec, ctx.now
    # An early resume (no gate waiting) is consumed without effect: it never releases a later gate.
    resume = ctx.annotations.get(ANNOTATION_RESUME)
    if resume and resume != s.handled.resume and not _at_manual_gate(spec, s):
        s.handled.resume = resume
        msg = f"resume annotation {ANNOTATION_RESUME}={resume} ignored: no manual gate is waiting"
        w.events.append(Event("Normal", "ResumeIgnored", msg))
        record(s, now, "ResumeIgnored", "ResumeIgnored", msg)

    # Promote (one step) moves past the pause or analysis step that is current when it arrives; one
    # that arrives at any other step is consumed without effect, so it never skips a later step.
    promote = ctx.annotations.get(ANNOTATION_PROMOTE)
    if promote and promote != s.handled.promote:
        if _at_pause_or_analysis(spec, s):
            w.promote_step = s.currentStep
        else:
            s.handled.promote = promote
            msg = (
                f"promote annotation {ANNOTATION_PROMOTE}={promote} ignored: step {s.currentStep} is not a "
                f"pause or analysis step; {ANNOTATION_PROMOTE_FULL} skips to 100%"
            )
            w.events.append(Event("Normal", "PromoteIgnored", msg))
            record(s, now, "PromoteIgnored", "PromoteIgnored", msg)


def _walk(ctx: StepContext, s: ModelRolloutStatus, w: _Walk) -> Finish | None:
    """Advance through the steps while nothing blocks; stops at the first hold or weight change."""
    spec = ctx.spec
    while True:
        if _shadow(ctx, s, w):
            return None  # the mirror starts with this tick's route write; analysed from the next
        if s.currentStep >= len(spec.steps):
            target = 100
        else:
            step = spec.steps[s.currentStep]
            if step.setWeight is None:
                if _timed_or_gated_step(ctx, s, w, step):
                    continue
                return None
            target = step.setWeight
        if s.weight == target:
            if s.currentStep >= len(spec.steps):
                if not w.ok:
                    s.message = f"holding at weight 100 before promotion: {'; '.join(w.holds)}"
                    return None
                return Finish(
                    "Promoted", 100, "AnalysisPassed", "all steps completed with passing analysis", ctx.values
                )
            _advance(s, ctx.now)
            continue
        _move(ctx, s, w, target)
        return None


def _timed_or_gated_step(ctx: StepContext, s: ModelRolloutStatus, w: _Walk, step: Step) -> bool:
    """A pause or analysis step: True when the walk moves past it, False when it holds there."""
    if w.promote_step == s.currentStep:
        _skip_by_promote(ctx, s, w, step)
        return True
    if step.pause is not None and step.pause.duration is None:
        return _manual_gate(ctx, s, w)
    spec_duration = (
        step.pause.duration
        if step.pause
        else (step.shadow.duration if step.shadow else (step.analysis and step.analysis.duration))
    )
    duration = parse_duration(spec_duration or "0s")
    elapsed = (ctx.now - (s.stepStartedAt or ctx.now)).total_seconds()
    kind = "pause" if step.pause else ("shadow" if step.shadow else "analysis")
    if elapsed < duration:
        where = f"weight {s.weight}"
        if step.shadow:
            where += f", {s.shadowPercent}% of requests mirrored to {ctx.spec.candidate.service}"
        s.message = f"step {s.currentStep}: {kind} at {where}, {duration - elapsed:.0f}s left"
        if w.holds:
            s.message += f" ({'; '.join(w.holds)})"
        return False
    if not w.ok:
        why = "; ".join(w.holds)
        s.message = f"holding at weight {s.weight} after {kind} step {s.currentStep}: {why}"
        return False
    _advance(s, ctx.now)
    return True


def _skip_by_promote(ctx: StepContext, s: ModelRolloutStatus, w: _Walk, step: Step) -> None:
    promote = ctx.annotations[ANNOTATION_PROMOTE]
    s.handled.promote = promote
    w.promote_step = None
    gate = step.pause and step.pause.duration is None
    kind = "manual gate" if gate else ("pause" if step.pause else ("shadow" if step.shadow else "analysis"))
    msg = (
        f"{kind} step {s.currentStep} skipped by annotation {ANNOTATION_PROMOTE}={promote}; "
        "later steps are analysed as usual"
    )
    w.events.append(Event("Normal", "PromoteRequested", msg))
    record(s, ctx.now, "StepSkipped", "PromoteRequested", msg)
    if s.phase == "Paused":
        s.phase = "Progressing"
    _advance(s, ctx.now)


def _shadow(ctx: StepContext, s: ModelRolloutStatus, w: _Walk) -> bool:
    """Start the current step's shadow (True: the walk stops here this tick), or end a shadow the
    walk has moved past. Each opens an epoch: the shadow's comparison counts are a stratum of their own."""
    steps = ctx.spec.steps
    step = steps[s.currentStep] if s.currentStep < len(steps) else None
    want = step.shadow.percent if step is not None and step.shadow is not None else None
    if want == s.shadowPercent:
        return False
    cand = ctx.spec.candidate.service
    if s.shadowPercent is not None:
        msg = (
            f"shadow ended: {s.shadowPercent}% of requests no longer mirrored to {cand} "
            f"(weight {s.weight}, step {s.currentStep})"
        )
        w.events.append(Event("Normal", "ShadowEnded", msg))
        record(s, ctx.now, "ShadowEnded", "ShadowEnded", msg)
        close_epoch(s, ctx.epoch, ctx.now)
        ctx.epoch.clear()  # closed here: a weight set in this same tick must not close it again
        s.shadowPercent = None
        s.message = msg
    if want is None:
        return False
    assert step is not None and step.shadow is not None
    msg = (
        f"step {s.currentStep}: shadow: {want}% of requests mirrored to {cand} for {step.shadow.duration}; "
        "users get only the stable's answers (candidate weight 0)"
    )
    close_epoch(s, ctx.epoch, ctx.now)
    s.shadowPercent, s.message, s.heldSince = want, msg, None
    s.stepStartedAt = ctx.now
    w.events.append(Event("Normal", "ShadowStarted", msg))
    record(s, ctx.now, "ShadowStarted", "StepAdvanced", msg)
    return True


def _manual_gate(ctx: StepContext, s: ModelRolloutStatus, w: _Walk) -> bool:
    """A pause without duration: released by a new resume annotation (True), else it waits."""
    resume = ctx.annotations.get(ANNOTATION_RESUME)
    if resume and resume != s.handled.resume:
        s.handled.resume = resume
        w.events.append(Event("Normal", "Resumed", f"resumed by annotation {ANNOTATION_RESUME}={resume}"))
        record(s, ctx.now, "Resumed", "ResumeRequested", f"manual gate at step {s.currentStep} released")
        s.phase = "Progressing"
        _advance(s, ctx.now)
        return True
    if s.phase != "Paused":
        w.events.append(Event("Normal", "Paused", f"manual gate at step {s.currentStep}"))
        record(s, ctx.now, "Paused", "ManualGate", f"waiting at step {s.currentStep} for a resume")
    s.phase, s.heldSince = "Paused", None
    s.message = (
        f"waiting at step {s.currentStep} (weight {s.weight}) for "
        f"`kubectl annotate mro ... {ANNOTATION_RESUME}=<token>`"
    )
    return False


def _move(ctx: StepContext, s: ModelRolloutStatus, w: _Walk, target: int) -> None:
    """Towards ``target``, by at most maxWeightStep, past the evidence gate and the webhook gates."""
    spec = ctx.spec
    if s.weight > 0 and not w.ok:
        s.message = f"holding at weight {s.weight} (step {s.currentStep}): {'; '.join(w.holds)}"
        return
    nxt = target
    if spec.maxWeightStep and abs(target - s.weight) > spec.maxWeightStep:
        nxt = s.weight + spec.maxWeightStep * (1 if target > s.weight else -1)
    if nxt == 100:
        # The promotion gate comes before the final increase: every required comparison must
        # have shown what its test asks (fail closed), unless the deadline policy says promote.
        w.waiting_evidence = ctx.missing_evidence
        # Only a measured-but-undecided comparison is "inconclusive"; missing data is a
        # progress problem (onProgressDeadline), never evidence.
        w.evidence_only = not w.holds
        if w.waiting_evidence and not _deadline_promotes(spec, s, ctx.now):
            s.message = f"holding at weight {s.weight} before full traffic: " + "; ".join(w.waiting_evidence)
            w.holds += w.waiting_evidence
            return
    where = (
        f"step {s.currentStep}: setWeight {target}" if s.currentStep < len(spec.steps) else "all steps done"
    )
    hold = _gates_closed(ctx, s, w.events, nxt)
    if hold.why:
        w.gate_hold = s.message = f"holding at weight {s.weight} before weight {nxt}: {hold.why}"
        w.gate_reason = "GateBusy" if hold.busy else "GateClosed"
        w.holds += hold.overdue  # past maxHold, a gate's hold counts towards progressDeadline
        return
    split = f" (split by maxWeightStep {spec.maxWeightStep})" if nxt != target else ""
    _set_weight(ctx, s, w.events, nxt, where + split)
    s.stepWeight = nxt if nxt != target else None
    if nxt == target and s.currentStep < len(spec.steps):
        _advance(s, ctx.now)


def _deadline(ctx: StepContext, s: ModelRolloutStatus, w: _Walk) -> StepOutcome:
    """Deadlines: a hold without progress ends by the user's policy."""
    spec, now = ctx.spec, ctx.now
    if w.holds and s.phase != "Paused":
        s.heldSince = s.heldSince or now
        held = (now - s.heldSince).total_seconds()
        if held >= parse_duration(spec.progressDeadline):
            why = f"held {held:.0f}s (progressDeadline {spec.progressDeadline}): {'; '.join(w.holds)}"
            inconclusive = bool(w.waiting_evidence) and w.evidence_only
            policy = spec.analysis.onInconclusive if inconclusive else spec.onProgressDeadline
            reason = "Inconclusive" if inconclusive else "ProgressDeadlineExceeded"
            if policy == "rollback":
                return StepOutcome(w.events, finish=Finish("RolledBack", 0, reason, why))
            progressing = get_condition(s.conditions, "Progressing")
            if progressing is None or progressing.reason != reason:
                w.events.append(Event("Warning", reason, why + "; holding"))
                record(s, now, reason, reason, why)
            s.phase = "Paused" if s.phase == "Paused" else "Progressing"
            return StepOutcome(w.events, progressing=(reason, why))
    else:
        s.heldSince = None

    s.phase = "Paused" if s.phase == "Paused" else "Progressing"
    if w.gate_hold:  # like a manual pause: a deliberate hold, not counted towards progressDeadline
        return StepOutcome(w.events, progressing=(w.gate_reason, w.gate_hold))
    return StepOutcome(w.events)


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


def _gates_closed(ctx: StepContext, s: ModelRolloutStatus, events: list[Event], nxt: int) -> GateHold:
    """Why the gates before this move hold it; records each answer.

    A gate that is busy (still answering another object's request) holds like a closed one but is
    not recorded as closed: no GateClosed Event or notification. A gate's hold is exempt from
    progressDeadline for its ``maxHold``; after that it is named in ``overdue``.
    """
    closed: list[str] = []
    busy: list[bool] = []
    overdue: list[str] = []
    for g in gates_before(ctx.spec, s.weight, nxt):
        a = ctx.answers.get(g.name)
        if a is None:
            ctx.asks.append(g.name)
            closed.append(f"gate {g.name} ({g.type}) has not been asked yet")
            busy.append(False)
            continue
        old = next((x for x in s.gates if x.name == g.name), None)
        was_closed = old is not None and not old.open and not old.busy
        if a.open:
            _gate_open(ctx.now, s, events, g, a, was_closed)
            continue
        since = old.heldSince if old is not None and not old.open and old.heldSince is not None else ctx.now
        state = GateState(
            name=g.name,
            open=False,
            message=a.message[:1024],
            lastAskedTime=ctx.now,
            busy=True if a.busy else None,
            heldSince=since,
        )
        s.gates = [*(x for x in s.gates if x.name != g.name), state]
        held = (ctx.now - since).total_seconds()
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
            events.append(Event("Warning", "GateClosed", why))
            record(s, ctx.now, "GateClosed", "GateClosed", why)
    return GateHold("; ".join(closed), bool(busy) and all(busy), overdue)


def _gate_open(
    now: datetime, s: ModelRolloutStatus, events: list[Event], g: Gate, a: GateAnswer, was_closed: bool
) -> None:
    state = GateState(name=g.name, open=True, message=a.message[:1024], lastAskedTime=now)
    s.gates = [*(x for x in s.gates if x.name != g.name), state]
    if was_closed:
        msg = f"gate {g.name} ({g.type}, provider {g.provider}) opened: {a.message}"
        events.append(Event("Normal", "GateOpened", msg))
        record(s, now, "GateOpened", "GateOpened", msg)


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


def _advance(s: ModelRolloutStatus, now: datetime) -> None:
    s.currentStep += 1
    s.stepStartedAt = now
    s.stepWeight = None


def close_epoch(s: ModelRolloutStatus, epoch: Mapping[str, EpochCounts], now: datetime) -> None:
    """A weight change ends the epoch: its counts join the closed ones, and a new epoch starts now."""
    for name, counts in epoch.items():
        epochs = s.epochs.setdefault(name, [])
        epochs.append(counts)
        del epochs[:-EPOCH_LIMIT]
    s.epochStartedAt = now


def _set_weight(ctx: StepContext, s: ModelRolloutStatus, events: list[Event], weight: int, why: str) -> None:
    msg = f"weight {s.weight} -> {weight}: {why}"
    close_epoch(s, ctx.epoch, ctx.now)
    s.weight = weight
    s.message = msg
    s.heldSince = None
    events.append(Event("Normal", "WeightChanged", msg))
    record(s, ctx.now, "WeightChanged", "StepAdvanced", msg)
