"""The ModelExperiment state machine: a pure function (spec, status, observations, now) -> (status, actions).

No I/O happens here. The handler measures every variant's primary metric (cumulative since the
experiment started) and guardrails only when :func:`analysis_due` says so, calls :func:`reconcile`,
then applies the result: the route first (the weights :func:`route_weights` gives for the new
status), then the status, then Events. Every transition is explained in status.

Pacing lives in status: an analysis is due at ``(lastAnalysisTime or startedAt) + interval``.
A restart, retry, conflict or second replica never adds an analysis, and observations handed in
before that time are ignored.

Rules, in the order they are applied at each analysis:

1. Guardrails run per active variant, also while paused (they protect users, not the experiment).
   A variant *fails* when a guardrail reaches ``failureLimit`` consecutive breaches, when a
   measurement has no data under ``analysis.noData: fail`` (at once, not counted toward
   ``failureLimit``), or when it has had no data for ``analysis.noDataTimeout`` (default 10m)
   under ``onNoDataTimeout: drop`` (the default). A failing non-control variant is dropped: weight 0,
   ``active: false``; its weight goes to the other active variants (fixed: proportionally to their
   weights, which keeps every pair's ratio and so the pooled comparisons honest; thompson: the
   bandit excludes it). A failing control leaves no safe variant: with ``onFailure: rollback`` the
   experiment is RolledBack with all traffic to the control; with ``keep`` it only warns.
2. The shared assessment (:func:`model_rollouts.analysis.assess.assess`): no data, NaN and failed
   measurements never pass and are never zero. Any of them on an active variant holds the analysis
   (no SRM check, no decision, no allocation change). Failed measurements count toward
   ``analysis.errorLimit`` consecutive analyses; reaching it applies ``onErrorLimit`` (rollback:
   RolledBack, all traffic to the control; hold: ``Healthy=False``, reason ErrorLimitReached).
3. Sample-ratio mismatch, for fixed splits (fixed allocation, or a Thompson confirmation phase):
   the counts each active variant received since the split came into effect, against the weights in
   force. Counting starts at the first analysis *after* the split was written (so the start-up
   transient, e.g. from a route that still sent 100% to the control, is not counted) and restarts
   whenever the split changes. The test is anytime-valid (see
   :func:`model_rollouts.analysis.srm.p_value`); below ``stoppingRules.srmAlpha`` the experiment
   pauses (weights unchanged) until the ``mlrollouts.io/resume`` annotation is set, which also
   restarts the count.
4. The decision, once every active variant has ``minSamplesPerVariant`` samples (fixedHorizon: the
   planned sample size, since that test is valid at one look only): every active non-control variant
   is compared with the control, p-values are Holm-adjusted across variants (frequentist methods);
   the winner is the best variant that is significantly better (bayesian: probability to be best of
   at least ``successCriteria.probabilityToBeBest``). Futility (sequential/bayesian intervals that
   exclude an improvement of the MDE for every variant) and the sample cap or ``maxDuration`` stop
   the experiment without a winner. Without a winner no variant is ever promoted.
   Under Thompson allocation the bandit's data are pooled over changing weights, which misleads
   under a drift common to all arms (Simpson's paradox). So the bandit phase never declares a
   winner: its leader enters a *confirmation* phase, a fixed 50/50 split between the leader and the
   control, and wins only if the test on the confirmation's own samples says so.
5. Conclusion: ``onSuccess: promoteWinner`` sends all traffic to the winner, or back to the control
   when there is none (decision ``noWinner`` or ``futile``): a null result is not a failure, so the
   phase is Concluded. ``onSuccess: keep`` concludes without moving traffic.

Terminal is terminal: Concluded, RolledBack and Aborted are left only by a new revision or a new
value of the ``mlrollouts.io/retry`` annotation. A problem found after the end (an invalid spec, a
missing route) is a condition, never a phase, and never moves traffic.

The revision is what is compared: the variants (names, services, control, fixed weights) and the
primary metric. A change restarts the experiment from scratch (a weight edit too: samples pooled
across two splits would mislead under drift). Services of variants that left the spec are set to 0
in the same route write (``status.retiredServices``), so the route always sums to 100.

State lives in status fields, so a restart of the operator resumes exactly where it stood:
``revision``, ``handled`` (the annotation values already acted on; values present when an
experiment or a new revision starts are recorded and not acted on), ``srmBaseline``/``srmSince``,
``confirmation``, ``lastAnalysisTime``, ``consecutiveErrors`` and each variant's ``noDataSince``.
``history`` is a bounded, purely informational log: nothing is ever read back from it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from model_rollouts.analysis import model_judges, sequential, srm, stats, threshold
from model_rollouts.analysis.assess import MODEL_JUDGE_KINDS, Assessment, Policy, assess
from model_rollouts.analysis.comparison import EXPERIMENT_NAMES
from model_rollouts.analysis.vocabulary import Result
from model_rollouts.api.common import (
    Condition,
    Measurement,
    VariantVerdict,
    action_annotations,
    dump,
    get_condition,
    parse_duration,
    set_condition,
)
from model_rollouts.api.experiment import (
    TERMINAL_PHASES,
    Confirmation,
    ModelExperimentSpec,
    ModelExperimentStatus,
    Variant,
    VariantStatus,
)

# The same annotations as ModelRollout (the kubectl plugin sets them on either kind).
from model_rollouts.api.rollout import ANNOTATION_ABORT, ANNOTATION_RESUME, ANNOTATION_RETRY
from model_rollouts.engine import bandit, series
from model_rollouts.engine import status as status_
from model_rollouts.engine.actions import Event
from model_rollouts.engine.status import EPOCH

HISTORY_LIMIT = status_.HISTORY_LIMIT
#: SRM is never tested before each active variant has this many samples since the split changed.
SRM_MIN_SAMPLES = 20
#: Reasons on the Progressing condition.
SRM_REASON = "SampleRatioMismatch"
#: The terminal phase each decision ends in (a finished experiment that went Invalid returns to it).
FINISHED_PHASE = {
    "promoted": "Concluded",
    "winnerKept": "Concluded",
    "noWinner": "Concluded",
    "futile": "Concluded",
    "rolledBack": "RolledBack",
    "errorLimit": "RolledBack",
    "aborted": "Aborted",
}
#: The split of a Thompson confirmation phase: leader and control, 50/50.
CONFIRMATION_WEIGHT = 50

Data = stats.ProportionData | stats.MeanData


@dataclass(frozen=True)
class VariantObservation:
    """What was measured for one variant at one analysis.

    ``primary``: the primary metric's sums, cumulative since ``status.startedAt`` (its trials/count is
    also the traffic count for SRM); or ``problem``: why it could not be measured (``noData``,
    ``nan`` or ``error`` outcome). ``guardrails``: one Result per guardrail name, for active variants.
    """

    primary: Data | None = None
    problem: Result | None = None
    guardrails: dict[str, Result] = field(default_factory=dict)
    requests: float | None = None  # from analysis.requests, when set and measured


@dataclass(frozen=True)
class Observations:
    variants: dict[str, VariantObservation] = field(default_factory=dict)
    #: Per non-control variant, its model judges' observations against the control (``model_judges.key``).
    judges: dict[str, dict[str, model_judges.JudgeData]] = field(default_factory=dict)
    #: Per variant: does its Service have a ready endpoint? None (or absent): unknown, nothing changes.
    ready: dict[str, bool | None] = field(default_factory=dict)


#: The engine's actions besides its status. The weights are not an action: the route carries
#: ``route_weights(spec, status)`` of the status decided (the one source of weights).
Action = Event


@dataclass
class Decision:
    status: ModelExperimentStatus
    actions: list[Action]


# --------------------------------------------------------------------------- spec helpers


def control_of(spec: ModelExperimentSpec) -> Variant:
    return next(v for v in spec.variants if v.control)


def validate(spec: ModelExperimentSpec) -> str | None:
    """What the CRD's CEL rules check, for when they were not applied, plus what only we can judge.

    Every rule here names a spec that could never decide or could not be run. Returns a message
    naming the field, or None.
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
    seen = set()
    for i, g in enumerate(spec.guardrails):
        if g.name in seen:
            return f"spec.guardrails[{i}].name: {g.name!r} is used by another guardrail; names must be unique"
        seen.add(g.name)
    if any(v.weight is not None for v in spec.variants):
        for i, v in enumerate(spec.variants):
            if v.weight is None or v.weight <= 0:
                return (
                    f"spec.variants[{i}].weight: {v.name} would get no traffic and the experiment could "
                    "never decide; give every variant a weight above 0, or none for an equal split"
                )
        total = sum(v.weight or 0 for v in spec.variants)
        if total != 100:
            return f"spec.variants[].weight: weights must sum to 100 when set (they sum to {total})"
    pm = spec.primaryMetric
    needed = ("successes", "trials") if pm.type == "proportion" else ("sum", "count", "sumSquares")
    for f in needed:
        if not getattr(pm, f):
            return f"spec.primaryMetric.{f}: a {pm.type} metric needs the {', '.join(needed)} queries"
    mde = spec.successCriteria.minimumDetectableEffect
    if pm.type == "proportion" and not 0 < mde < 1:
        return (
            f"spec.successCriteria.minimumDetectableEffect: {mde:g} is outside (0, 1), the range of a "
            "difference of two rates: the experiment could never decide"
        )
    sr = spec.stoppingRules
    if sr.maxSamplesPerVariant is not None and sr.maxSamplesPerVariant < sr.minSamplesPerVariant:
        return (
            f"spec.stoppingRules.maxSamplesPerVariant: {sr.maxSamplesPerVariant} is below "
            f"minSamplesPerVariant {sr.minSamplesPerVariant}"
        )
    max_duration = parse_duration(sr.maxDuration)
    if max_duration <= 0:
        return "spec.stoppingRules.maxDuration: must be above 0 (the experiment could never decide)"
    interval = parse_duration(spec.analysis.interval)
    if max_duration < interval:
        return (
            f"spec.stoppingRules.maxDuration: {sr.maxDuration} is shorter than one analysis interval "
            f"({spec.analysis.interval}): the experiment could never decide"
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
    for f in ("interval", "window", "noDataTimeout"):
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
    """What is compared: the variants (names, services, control, fixed weights) and the primary metric.

    A change restarts the experiment from scratch. Guardrails and stopping rules are not part of it:
    they change how the experiment runs, not what its samples mean. Fixed weights are (a sample pooled
    across two splits misleads under drift); an unset weight is left out, so revisions of specs
    without weights are what they were before weights counted.
    """
    variants: list[dict[str, Any]] = []
    for v in spec.variants:
        item: dict[str, Any] = {"name": v.name, "service": v.service, "control": v.control}
        if v.weight is not None:
            item["weight"] = v.weight
        variants.append(item)
    return status_.digest({"variants": variants, "primaryMetric": dump(spec.primaryMetric)})


def needs_measurement(spec: ModelExperimentSpec, status: ModelExperimentStatus) -> bool:
    """Metrics are read only for a started, not finished experiment of the current revision."""
    return (
        status.startedAt is not None
        and status.phase not in (*TERMINAL_PHASES, "Invalid", "Pending")
        and status.revision == revision_of(spec)
        and [v.name for v in status.variants] == [v.name for v in spec.variants]
    )


def next_analysis(spec: ModelExperimentSpec, status: ModelExperimentStatus) -> datetime | None:
    """When the next analysis is due (from status alone), or None when none is wanted."""
    if not needs_measurement(spec, status):
        return None
    last = status.lastAnalysisTime or status.startedAt
    assert last is not None  # needs_measurement: started
    return last + timedelta(seconds=parse_duration(spec.analysis.interval))


def next_due(spec: ModelExperimentSpec, status: ModelExperimentStatus) -> datetime | None:
    """When the engine next wants a tick: the next analysis, at once (EPOCH) when something is to
    start (a new experiment, a new revision, a retry), or None (finished, or paused before the start)."""
    rev = revision_of(spec)
    if status.phase in TERMINAL_PHASES:
        return EPOCH if status.revision != rev else None
    if status.startedAt is None:
        return None if spec.paused else EPOCH
    if status.phase == "Invalid" or status.revision != rev:
        return EPOCH
    return next_analysis(spec, status)


def analysis_due(spec: ModelExperimentSpec, status: ModelExperimentStatus, now: datetime) -> bool:
    """Measure now? Only for a running experiment, and only one interval after the last analysis
    (or the start): pacing lives in status, so restarts, retries and replicas add no analysis."""
    due = next_analysis(spec, status)
    return due is not None and now >= due


def _services(spec: ModelExperimentSpec, status: ModelExperimentStatus) -> dict[str, str]:
    """Variant name -> Service: as recorded in status when it started, else from the spec."""
    out = {v.name: v.service for v in spec.variants}
    for v in status.variants:
        if v.service:
            out[v.name] = v.service
    return out


def route_weights(spec: ModelExperimentSpec, status: ModelExperimentStatus) -> dict[str, int] | None:
    """The weights per Service the route must carry for this status (retired Services at 0), or None
    when this status asks for none (not started, Invalid)."""
    if not status.variants or status.startedAt is None or status.phase in ("Invalid", "Pending"):
        return None
    names = _services(spec, status)
    out = dict.fromkeys(status.retiredServices, 0)
    for v in status.variants:
        if v.name in names:
            out[names[v.name]] = v.weight
    return out


def _to_control(spec: ModelExperimentSpec, status: ModelExperimentStatus) -> dict[str, int]:
    names = _services(spec, status)
    control = control_of(spec).name
    if control not in {v.name for v in status.variants}:
        return {v.service: 100 if v.control else 0 for v in spec.variants}
    out = dict.fromkeys(status.retiredServices, 0)
    for v in status.variants:
        if v.name in names:
            out[names[v.name]] = 100 if v.name == control else 0
    return out


def deletion_weights(spec: ModelExperimentSpec, status: ModelExperimentStatus) -> dict[str, int] | None:
    """What the route gets when the object is deleted: all traffic to the control while the experiment
    runs (or is paused or invalid after it started); nothing after the end, so traffic stays on the
    winner (or wherever the end left it)."""
    if status.startedAt is None or not status.variants or status.phase in (*TERMINAL_PHASES, "Pending"):
        return None
    if status.decision in FINISHED_PHASE:  # finished, then went Invalid: still finished
        return None
    return _to_control(spec, status)


def guard_weights(spec: ModelExperimentSpec, status: ModelExperimentStatus) -> dict[str, int] | None:
    """After RolledBack or Aborted, no variant but the control gets traffic again in this revision:
    the weights a slow guard re-asserts if the route drifts. After Concluded the operator lets go."""
    if status.phase not in ("RolledBack", "Aborted") or not status.variants:
        return None
    return _to_control(spec, status)


def active(spec: Mapping[str, Any], status: Mapping[str, Any], annotations: Mapping[str, str]) -> bool:
    """Does the object need the fast timer? Yes unless it is finished, its revision unchanged and no
    new retry annotation is waiting (a finished object costs nothing but a slow guard)."""
    if status.get("phase") not in TERMINAL_PHASES:
        return True
    retry = action_annotations(annotations).get(ANNOTATION_RETRY)
    if retry and retry != (status.get("handled") or {}).get("retry"):
        return True
    try:
        parsed = ModelExperimentSpec.model_validate(dict(spec))
    except ValidationError:
        return False
    return revision_of(parsed) != status.get("revision")


# --------------------------------------------------------------------------- entry points


def invalid(status: ModelExperimentStatus, message: str, now: datetime, generation: int) -> Decision:
    """Valid=False: the spec cannot be acted on; traffic is left exactly as it is.

    A finished experiment keeps its phase (a problem after the end is a condition, not a phase)."""
    if status.phase in TERMINAL_PHASES:
        return _finished(status, message, {}, now, generation)
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
    """One decision; an analysis made in it is also appended to the bounded status.series."""
    d = _reconcile(
        spec,
        status,
        now=now,
        generation=generation,
        annotations=action_annotations(annotations),
        observations=observations,
    )
    status_.bound_texts(d.status)
    if series.analysed_now(status, d.status, now, observations is not None):
        series.append(d.status.series, series.experiment_point(d.status, now))
    return d


def _reconcile(
    spec: ModelExperimentSpec,
    status: ModelExperimentStatus,
    *,
    now: datetime,
    generation: int,
    annotations: dict[str, str] | None = None,
    observations: Observations | None = None,
) -> Decision:
    ann = annotations or {}
    problem = validate(spec)
    rev = revision_of(spec)
    status = _valid_again(status, rev, problem, now, generation)
    if status.phase in TERMINAL_PHASES:
        retry = ann.get(ANNOTATION_RETRY)
        wants_retry = bool(retry) and retry != status.handled.retry
        if problem or (status.revision == rev and not wants_retry):
            return _finished(status, problem, ann, now, generation)
        reason = "NewRevision" if status.revision != rev else "Retried"
        return _start(spec, status.model_copy(deep=True), [], ann, rev, now, generation, reason)
    if problem:
        return invalid(status, problem, now, generation)
    s = status.model_copy(deep=True)
    actions: list[Action] = []
    s.observedGeneration = generation
    s.conditions = status_.spec_valid(s.conditions, now, generation)
    # The route write that made this status current carried the 0s of retired Services.
    s.retiredServices = []

    names = [v.name for v in spec.variants]
    if s.startedAt is None or s.revision != rev or [v.name for v in s.variants] != names:
        if s.startedAt is None and spec.paused:
            if s.phase != "Paused":
                _history(s, now, "Paused", "SpecPaused", "created paused: not started")
            s.phase, s.message = "Paused", "paused by spec.paused before it started: no traffic moved"
            _conditions(s, now, generation, "SpecPaused")
            return Decision(s, actions)
        reason = "Started" if s.startedAt is None else "NewRevision"
        return _start(spec, s, actions, ann, rev, now, generation, reason)

    if s.phase == "Invalid":
        s.phase = "Running"
        _history(s, now, "Valid", "SpecValid", "spec is valid again; resuming")
    done = _user_actions(spec, s, actions, ann, now, generation)
    if done is None and observations is not None and analysis_due(spec, s, now):
        done = _analyse(spec, s, actions, observations, now, generation)
    return done or _run_or_hold(spec, s, actions, now, generation)


def _valid_again(
    status: ModelExperimentStatus, rev: str, problem: str | None, now: datetime, generation: int
) -> ModelExperimentStatus:
    """An experiment that had finished before the spec (or its route, Secret...) became unusable
    still has: back to its terminal phase once the spec is valid again."""
    finished = FINISHED_PHASE.get(status.decision or "")
    if status.phase != "Invalid" or not finished or status.revision != rev or problem:
        return status
    s = status.model_copy(deep=True)
    s.phase = finished  # type: ignore[assignment]
    s.message = s.decisionReason or s.message
    msg = f"spec is valid again; the experiment had finished: {finished} again, traffic left as it is"
    _history(s, now, "Valid", "SpecValid", msg)
    _conditions(s, now, generation, finished)
    return s


def _user_actions(
    spec: ModelExperimentSpec,
    s: ModelExperimentStatus,
    actions: list[Action],
    ann: dict[str, str],
    now: datetime,
    generation: int,
) -> Decision | None:
    """Retry (recorded only, while running), abort and resume annotations: each new value acts once."""
    retry = ann.get(ANNOTATION_RETRY)
    if retry and retry != s.handled.retry:
        s.handled.retry = retry
    abort = ann.get(ANNOTATION_ABORT)
    if abort and abort != s.handled.abort:
        s.handled.abort = abort
        msg = f"aborted by annotation {ANNOTATION_ABORT}={abort}: all traffic back to the control"
        return _finish(
            spec,
            s,
            actions,
            now,
            generation,
            Outcome("Aborted", "aborted", "AbortRequested", msg, to_control=True),
        )
    resume = ann.get(ANNOTATION_RESUME)
    if resume and resume != s.handled.resume:
        s.handled.resume = resume
        if _srm_held(s):
            msg = (
                f"resumed by annotation {ANNOTATION_RESUME}={resume} after a sample-ratio mismatch; "
                "the SRM count restarts at the next analysis"
            )
            s.conditions = set_condition(s.conditions, SRM_REASON, "False", "Resumed", msg, now, generation)
            _split_changed(s, now)
            s.phase = "Running"
            actions.append(Event("Normal", "Resumed", msg))
            _history(s, now, "Resumed", "ResumeRequested", msg)
    return None


def _run_or_hold(
    spec: ModelExperimentSpec, s: ModelExperimentStatus, actions: list[Action], now: datetime, generation: int
) -> Decision:
    """Pausing: by spec, or held by a sample-ratio mismatch until resumed; else Running."""
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


def _finished(
    status: ModelExperimentStatus, problem: str | None, ann: dict[str, str], now: datetime, generation: int
) -> Decision:
    """A finished experiment stays finished: no traffic moves; a problem is a condition only."""
    s = status.model_copy(deep=True)
    actions: list[Action] = []
    s.observedGeneration = generation
    s.retiredServices = []
    old = get_condition(s.conditions, "Valid")
    if problem:
        msg = f"{problem} (the experiment has finished: phase and traffic are left as they are)"
        if old is None or old.status != "False" or old.message != msg:
            actions.append(Event("Warning", "InvalidSpec", msg))
        s.conditions = set_condition(s.conditions, "Valid", "False", "InvalidSpec", msg, now, generation)
        retry = ann.get(ANNOTATION_RETRY)
        if retry and retry != s.handled.retry:
            s.handled.retry = retry
            actions.append(
                Event("Warning", "RetryRejected", f"{ANNOTATION_RETRY}={retry} not acted on: {problem}")
            )
    else:
        s.conditions = status_.spec_valid(s.conditions, now, generation)
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
    reason: str,
) -> Decision:
    """Start (or, for a new revision or a retry, restart from scratch): fresh counts, the configured split.

    Services of the previous status that the new spec no longer has are set to 0 in the same route
    write (``retiredServices``), so the route always sums to 100.
    """
    weights = fixed_weights(spec)
    spec_services = {v.service for v in spec.variants}
    retired = sorted(
        {v.service for v in s.variants if v.service and v.service not in spec_services and v.weight > 0}
    )
    msg = _start_message(spec, s, ann, rev, reason, weights)
    if retired:
        msg += f"; removed Service(s) {', '.join(retired)} set to 0"
    # Annotations present when this revision starts were meant for an earlier one: recorded, not acted on.
    handled = s.handled.model_copy(
        update={
            "abort": ann.get(ANNOTATION_ABORT, s.handled.abort),
            "resume": ann.get(ANNOTATION_RESUME, s.handled.resume),
            "retry": ann.get(ANNOTATION_RETRY, s.handled.retry),
        }
    )
    s = ModelExperimentStatus(
        phase="Running",
        message=msg,
        observedGeneration=generation,
        revision=rev,
        startedAt=now,
        variants=[
            VariantStatus(name=v.name, service=v.service, weight=weights[v.name]) for v in spec.variants
        ],
        conditions=_start_conditions(s.conditions, now, generation),
        history=s.history,
        handled=handled,
        reconcileErrors=s.reconcileErrors,
        lastReconcileErrorTime=s.lastReconcileErrorTime,
        retiredServices=retired,
        srmBaseline={},
        srmSince=now,
    )
    actions.append(Event("Normal", reason, msg))
    _history(s, now, reason, reason, msg, {k: float(w) for k, w in weights.items()})
    _conditions(s, now, generation, "Running")
    return Decision(s, actions)


def _start_message(
    spec: ModelExperimentSpec,
    s: ModelExperimentStatus,
    ann: dict[str, str],
    rev: str,
    reason: str,
    weights: dict[str, int],
) -> str:
    """Why it (re)starts and with which split: Started, Retried or NewRevision."""
    split = ", ".join(f"{v.name} ({v.service}) {weights[v.name]}%" for v in spec.variants)
    if reason == "Started":
        return f"started: {split}; {spec.allocation.strategy} allocation, control {control_of(spec).name}"
    if reason == "Retried":
        return (
            f"retried by annotation {ANNOTATION_RETRY}={ann.get(ANNOTATION_RETRY)} after {s.phase}: "
            f"restarting the experiment from scratch with {split}"
        )
    before = ", ".join(f"{v.name} {v.weight}%" for v in s.variants)
    return (
        f"variants, their weights or the primary metric changed (revision {s.revision or 'unrecorded'} "
        f"-> {rev}; was {before or 'nothing'}): restarting the experiment from scratch with {split}"
    )


def _start_conditions(conditions: list[Condition], now: datetime, generation: int) -> list[Condition]:
    """Valid, and SRM and Healthy not known yet."""
    c = status_.spec_valid(conditions, now, generation)
    c = set_condition(
        c,
        SRM_REASON,
        "Unknown",
        "NotChecked",
        "no samples yet: counting starts at the first analysis, once the split is in effect",
        now,
        generation,
    )
    return set_condition(c, "Healthy", "Unknown", "NotMeasured", "not measured yet", now, generation)


@dataclass(frozen=True)
class Outcome:
    """How an experiment ends: the terminal phase and decision, why, and where traffic goes.

    Traffic: all to ``winner``; else all to the control when ``to_control``; unchanged when
    ``move`` is False (or there is neither).
    """

    phase: str
    decision: str
    reason: str
    message: str
    winner: str | None = None
    values: dict[str, float] | None = None
    to_control: bool = False
    move: bool = True


def _finish(
    spec: ModelExperimentSpec,
    s: ModelExperimentStatus,
    actions: list[Action],
    now: datetime,
    generation: int,
    outcome: Outcome,
) -> Decision:
    """Enter the terminal phase ``outcome`` names and move traffic as it says."""
    o = outcome
    target = o.winner if o.winner is not None else (control_of(spec).name if o.to_control else None)
    if o.move and target is not None:
        for v in s.variants:
            v.weight = 100 if v.name == target else 0
    s.phase = o.phase  # type: ignore[assignment]
    s.decision = o.decision
    s.winner = o.winner
    s.decisionReason = o.message
    s.message = o.message
    warn = o.phase in ("RolledBack", "Aborted")
    actions.append(Event("Warning" if warn else "Normal", o.reason, o.message))
    _history(s, now, o.phase, o.reason, o.message, o.values)
    _conditions(s, now, generation, o.reason)
    return Decision(s, actions)


# --------------------------------------------------------------------------- analysis


def _primary_problem(metric: str, variant: str, p: Result) -> Measurement:
    what = (
        "measurement failed"
        if p.outcome == "error"
        else ("no data" if p.outcome == "noData" else "not a number")
    )
    return Measurement(
        name=metric,
        kind="comparison",
        variant=variant,
        outcome=p.outcome if p.outcome in ("noData", "error", "nan") else "error",
        verdict="error" if p.outcome == "error" else "noData",
        message=f"{metric} of {variant}: {what}" + (f" ({p.message})" if p.message else ""),
    )


def _policy(spec: ModelExperimentSpec) -> Policy:
    """Every active variant is an arm; a breach makes Healthy False at once but holds no decision."""
    return Policy(spec.analysis, spec.guardrails, per_arm=True, breach_holds=False, breach_unhealthy=True)


@dataclass
class _Analysis:
    """One analysis in progress: what the steps of :func:`_analyse` share."""

    spec: ModelExperimentSpec
    s: ModelExperimentStatus
    actions: list[Action]
    now: datetime
    generation: int
    a: Assessment
    #: Each variant's primary-metric data (cumulative).
    data: dict[str, Data]

    @property
    def control(self) -> str:
        return control_of(self.spec).name

    def variant(self, name: str) -> VariantStatus:
        return next(v for v in self.s.variants if v.name == name)

    def guard_values(self) -> dict[str, float]:
        guard = [m for m in self.a.fresh if m.kind == "guardrail"]
        return {f"{m.variant}/{m.name}": m.value for m in guard if m.value is not None}

    def roll_back(
        self, decision: str, reason: str, message: str, values: dict[str, float] | None
    ) -> Decision:
        """RolledBack, all traffic to the control."""
        self.s.lastAnalysis = [m for ms in self.a.by_arm.values() for m in ms]
        outcome = Outcome("RolledBack", decision, reason, message, values=values, to_control=True)
        return _finish(self.spec, self.s, self.actions, self.now, self.generation, outcome)


def _analyse(
    spec: ModelExperimentSpec,
    s: ModelExperimentStatus,
    actions: list[Action],
    obs: Observations,
    now: datetime,
    generation: int,
) -> Decision | None:
    """One analysis: guardrails and the shared assessment, SRM, decision, allocation. A Decision when
    it ends."""
    s.lastAnalysisTime = now
    prev_healthy = get_condition(s.conditions, "Healthy")
    data, per_variant = _observe(spec, s, obs)
    _readiness(spec, s, actions, obs.ready, data, now, generation)
    a = assess(_policy(spec), per_variant, s.guardrailFailures, s.consecutiveErrors)
    s.guardrailFailures, s.consecutiveErrors = a.failures, a.consecutive_errors
    x = _Analysis(spec, s, actions, now, generation, a, data)
    # 1. Which variants fail: the assessment's, or no data for noDataTimeout under onNoDataTimeout: drop.
    failed = _failed(x)
    ended = _control_failure(x, failed, prev_healthy) or _drop(x, failed)
    # 2. The error limit; any missing measurement of an active variant holds.
    ended = ended or _error_limit(x)
    if ended is not None:
        return ended
    active = {v.name for v in s.variants if v.active}
    active_names = [v.name for v in spec.variants if v.name in active]
    if x.variant(x.control).unready:
        s.lastAnalysis = [m for ms in per_variant.values() for m in ms]
        s.message = f"holding: the control {x.control} has no ready endpoints (it is never set to 0)"
        return None
    if holding := a.missing(active_names) + a.undecided_judges(active_names):
        s.lastAnalysis = [m for ms in per_variant.values() for m in ms]
        return _hold(x, holding)
    # 3. Sample-ratio mismatch.
    _srm(spec, s, actions, active_names, now, generation)
    return _decide_and_allocate(x, active_names)


def _observe(
    spec: ModelExperimentSpec, s: ModelExperimentStatus, obs: Observations
) -> tuple[dict[str, Data], dict[str, list[Measurement]]]:
    """Each variant's primary data, and the measurements of every active variant (its arm)."""
    by_name = {v.name: v for v in s.variants}
    data: dict[str, Data] = {}
    per_variant: dict[str, list[Measurement]] = {}
    for v in spec.variants:
        o = obs.variants.get(v.name)
        vs = by_name[v.name]
        if o is not None and o.requests is not None:
            vs.requests = o.requests
        if o is not None and o.primary is not None and o.problem is None:
            data[v.name] = o.primary
            vs.n = _n(o.primary)
        if vs.active:
            per_variant[v.name] = _variant_measurements(spec, v.name, o, v.name in data)
            if not v.control:
                an = spec.analysis
                judged = obs.judges.get(v.name, {})
                alpha = spec.successCriteria.alpha
                per_variant[v.name] += model_judges.measurements(
                    an.predictionShift, an.calibration, alpha, judged, s.lastAnalysis, v.name
                )
    return data, per_variant


def _variant_measurements(
    spec: ModelExperimentSpec, name: str, o: VariantObservation | None, has_primary: bool
) -> list[Measurement]:
    ms: list[Measurement] = []
    if not has_primary:
        p = o.problem if o is not None and o.problem is not None else threshold.NOT_MEASURED
        ms.append(_primary_problem(spec.primaryMetric.name, name, p))
    for g in spec.guardrails:
        m = threshold.measure(g, o.guardrails.get(g.name) if o is not None else None, name)
        ms.append(m.model_copy(update={"message": f"{name}: {m.message}"}))
    return ms


def _failed(x: _Analysis) -> dict[str, list[str]]:
    """The variants that fail now, with why: the assessment's (failureLimit, noData: fail), or no
    data for analysis.noDataTimeout under onNoDataTimeout: drop."""
    an = x.spec.analysis
    timeout = parse_duration(an.noDataTimeout)
    shared = x.a.failed()
    out: dict[str, list[str]] = {}
    for name, ms in x.a.by_arm.items():
        vs = x.variant(name)
        why = list(shared.get(name, []))
        why += [
            m.message for m in ms if m.kind in MODEL_JUDGE_KINDS and m.verdict == "fail" and not m.carried
        ]
        if any(m.verdict == "noData" for m in ms):
            vs.noDataSince = vs.noDataSince or x.now
            silent = (x.now - vs.noDataSince).total_seconds()
            if an.onNoDataTimeout == "drop" and silent >= timeout and name not in x.a.no_data_fail:
                why.append(
                    f"no data for {silent:.0f}s, analysis.noDataTimeout {an.noDataTimeout} "
                    f"(onNoDataTimeout drop): {'; '.join(m.message for m in x.a.missing([name]))}"
                )
        else:
            vs.noDataSince = None
        if why:
            out[name] = why
    return out


def _control_failure(
    x: _Analysis, failed: dict[str, list[str]], prev_healthy: Condition | None
) -> Decision | None:
    """A failing control leaves no safe variant: roll back (onFailure rollback) or warn and keep.
    Sets the Healthy condition of this analysis."""
    ctrl, s = x.control, x.s
    failing: tuple[str, str] | None = None
    if ctrl in failed:
        why_c = f"the control {ctrl} fails: " + "; ".join(failed[ctrl])
        if x.spec.onFailure == "rollback":
            for vst in s.variants:
                vst.active = vst.name == ctrl
            msg = f"{why_c}: no variant is safe, all traffic to the control (onFailure rollback)"
            return x.roll_back("rolledBack", "GuardrailFailed", msg, x.guard_values())
        failing = ("ControlFailing", f"{why_c}; onFailure is keep: traffic unchanged")
        # Warn when the control starts failing, not at every failing analysis after it.
        if prev_healthy is None or prev_healthy.reason != "ControlFailing":
            x.actions.append(Event("Warning", "ControlGuardrailFailed", failing[1]))
            _history(s, x.now, "GuardrailFailed", "ControlGuardrailFailed", failing[1], x.guard_values())
    h = x.a.health(failed, failing)
    s.conditions = set_condition(s.conditions, "Healthy", h.status, h.reason, h.message, x.now, x.generation)
    return None


def _drop(x: _Analysis, failed: dict[str, list[str]]) -> Decision | None:
    """Failing non-control variants leave (weight 0); rolled back when none but the control is left."""
    ctrl, s = x.control, x.s
    dropped = [n for n in failed if n != ctrl]
    for name in dropped:
        vs = x.variant(name)
        vs.active = False
        vs.verdict = "dropped"
        vs.reason = "; ".join(failed[name])
        msg = f"variant {name} dropped (weight {vs.weight} -> 0): " + "; ".join(failed[name])
        x.actions.append(Event("Warning", "VariantDropped", msg))
        _history(s, x.now, "VariantDropped", "VariantFailed", msg, x.guard_values())
    if not dropped:
        return None
    active = {v.name for v in s.variants if v.active}
    if not active - {ctrl}:
        msg = (
            f"the leader {dropped[0]} under confirmation was dropped: all traffic to the control"
            if s.confirmation is not None
            else "every non-control variant was dropped: all traffic to the control"
        )
        return x.roll_back("rolledBack", "GuardrailFailed", msg, x.guard_values())
    if x.spec.allocation.strategy == "fixed":
        new = fixed_weights(x.spec, _serving(x.spec, s))
        because = f"redistributed after dropping {', '.join(dropped)}"
    else:
        new = _thompson(x.spec, s, x.data, x.generation, x.now)
        because = f"bandit excludes {', '.join(dropped)}"
    _set_weights(x.spec, s, x.actions, x.now, new, because, event=False)
    return None


def _error_limit(x: _Analysis) -> Decision | None:
    """At analysis.errorLimit: roll back (onErrorLimit rollback) or hold, warning once."""
    if not x.a.error_limit_reached:
        return None
    msg = x.a.error_limit_message()
    if x.spec.analysis.onErrorLimit == "rollback":
        why = f"{msg}; all traffic to the control (onErrorLimit rollback)"
        return x.roll_back("errorLimit", "ErrorLimitReached", why, None)
    if x.a.error_limit_first:
        x.actions.append(Event("Warning", "ErrorLimitReached", x.a.error_limit_hold_message()))
        _history(x.s, x.now, "ErrorLimitReached", "ErrorLimitReached", msg)
    return None


def _hold(x: _Analysis, holding: list[Measurement]) -> Decision | None:
    """Missing measurements hold the analysis; the deadline still holds (missing evidence never makes
    a winner)."""
    kind = (
        "measurement error"
        if any(m.verdict == "error" for m in holding)
        else "no data"
        if any(m.verdict == "noData" for m in holding)
        else "model judges undecided"
    )
    x.s.message = f"holding ({kind}): " + "; ".join(m.message for m in holding)
    elapsed = (x.now - x.s.startedAt).total_seconds() if x.s.startedAt else 0.0
    if elapsed < parse_duration(x.spec.stoppingRules.maxDuration):
        return None
    msg = f"no winner: maxDuration {x.spec.stoppingRules.maxDuration} elapsed while {x.s.message}"
    return _null(x.spec, x.s, x.actions, x.now, x.generation, "noWinner", "NoWinner", msg, {})


def _decide_and_allocate(x: _Analysis, active_names: list[str]) -> Decision | None:
    spec, s, actions, data = x.spec, x.s, x.actions, x.data
    # 4. The decision, on the confirmation's own samples during a Thompson confirmation.
    cmp_data = _confirmation_data(s, data) if s.confirmation is not None else data
    comparisons = _compare_all(spec, s, cmp_data, active_names)
    s.lastAnalysis = [m for m in x.a.fresh if m.kind in ("guardrail", *MODEL_JUDGE_KINDS)] + comparisons
    _sample_size(spec, s, cmp_data, active_names)
    if spec.paused or _srm_held(s):
        return None
    ended = _decide(spec, s, actions, cmp_data, data, active_names, x.now, x.generation)
    if ended is not None:
        return ended
    # 5. Allocation (the bandit phase only: a confirmation holds its fixed split).
    if spec.allocation.strategy == "thompson" and s.confirmation is None:
        new = _thompson(spec, s, data, x.generation, x.now)
        if new != _weights(s):
            analysis = s.message
            _set_weights(spec, s, actions, x.now, new, "thompson sampling update", event=False, record=False)
            s.message = f"{analysis}; {s.message}"
    return None


def _serving(spec: ModelExperimentSpec, s: ModelExperimentStatus) -> set[str]:
    """The variants that get traffic: the active ones, but a non-control one without ready endpoints."""
    ctrl = control_of(spec).name
    return {v.name for v in s.variants if v.active and (v.name == ctrl or not v.unready)}


def _readiness(
    spec: ModelExperimentSpec,
    s: ModelExperimentStatus,
    actions: list[Action],
    ready: Mapping[str, bool | None],
    data: dict[str, Data],
    now: datetime,
    generation: int,
) -> None:
    """A non-control variant whose Service has no ready endpoint gets 0, its share spread the way a
    dropped variant's is (fixed split, bandit, or to the control in a confirmation); it gets its share
    back when ready again. A dead control is flagged (the analysis then holds), never zeroed. Unknown
    readiness (None) changes nothing."""
    ctrl = control_of(spec).name
    moved: list[str] = []
    for v in s.variants:
        r = ready.get(v.name)
        if r is None or not v.active or r != v.unready:
            continue
        v.unready = not r
        svc = v.service or v.name
        if v.name == ctrl:
            msg = (
                f"the control {ctrl} ({svc}) has no ready endpoints: holding, no decision (the control is "
                "never set to 0)"
                if v.unready
                else f"the control {ctrl} ({svc}) is ready again"
            )
        else:
            moved.append(v.name)
            msg = (
                f"variant {v.name} ({svc}) has no ready endpoints: weight {v.weight} -> 0 until it is ready"
                if v.unready
                else f"variant {v.name} ({svc}) is ready again: it gets its share back"
            )
        reason = ("ControlUnready" if v.name == ctrl else "ArmUnready") if v.unready else "ArmReady"
        actions.append(Event("Warning" if v.unready else "Normal", reason, msg))
        _history(s, now, reason, reason, msg)
    if moved:
        _set_weights(
            spec, s, actions, now, _serving_weights(spec, s, data, generation, now), "readiness", event=False
        )
    _ready_condition(s, ctrl, now, generation)


def _serving_weights(
    spec: ModelExperimentSpec, s: ModelExperimentStatus, data: dict[str, Data], generation: int, now: datetime
) -> dict[str, int]:
    """The split over the serving variants (:func:`_serving`)."""
    serving = _serving(spec, s)
    if s.confirmation is not None:
        ctrl, leader = control_of(spec).name, s.confirmation.variant
        out = {v.name: 0 for v in s.variants}
        out[leader] = CONFIRMATION_WEIGHT if leader in serving else 0
        out[ctrl] = 100 - out[leader]
        return out
    if spec.allocation.strategy == "fixed":
        return fixed_weights(spec, serving)
    return _thompson(spec, s, data, generation, now)


def _ready_condition(s: ModelExperimentStatus, ctrl: str, now: datetime, generation: int) -> None:
    """ArmsReady: False naming the variants without ready endpoints; True again when none is left."""
    unready = [v.name for v in s.variants if v.active and v.unready]
    if unready:
        reason = "ControlUnready" if ctrl in unready else "ArmUnready"
        msg = f"no ready endpoints: {', '.join(unready)} (weight 0 but the control's)"
        s.conditions = set_condition(s.conditions, "ArmsReady", "False", reason, msg, now, generation)
    elif get_condition(s.conditions, "ArmsReady") is not None:
        msg = "every active variant has a ready endpoint"
        s.conditions = set_condition(s.conditions, "ArmsReady", "True", "AllReady", msg, now, generation)


def _confirmation_data(s: ModelExperimentStatus, data: dict[str, Data]) -> dict[str, Data]:
    """The samples since the confirmation started (cumulative counts minus its baseline)."""
    assert s.confirmation is not None
    out: dict[str, Data] = {}
    for n, d in data.items():
        base = s.confirmation.baseline.get(n)
        if base is None or not isinstance(d, stats.ProportionData):
            continue
        trials = max(0.0, d.trials - base[1])
        succ = min(trials, max(0.0, d.successes - base[0]))
        out[n] = stats.ProportionData(succ, trials)
    return out


def _srm(
    spec: ModelExperimentSpec,
    s: ModelExperimentStatus,
    actions: list[Action],
    active: list[str],
    now: datetime,
    generation: int,
) -> None:
    if spec.allocation.strategy != "fixed" and s.confirmation is None:
        s.srmPValue = None
        s.conditions = set_condition(
            s.conditions,
            SRM_REASON,
            "Unknown",
            "NotCheckedForThompson",
            "SRM is checked for fixed splits only: while the bandit explores the weights change every "
            "interval (its confirmation phase, a fixed split, is checked)",
            now,
            generation,
        )
        return
    if _srm_held(s):
        return
    by_name = {v.name: v for v in s.variants}
    weights = [float(by_name[n].weight) for n in active]
    split = ", ".join(f"{n} {w:.0f}%" for n, w in zip(active, weights, strict=True))
    if not s.srmBaseline:
        # Count only once the split is in effect: from the first analysis after it was written.
        if s.srmSince is not None and now <= s.srmSince:
            return
        s.srmBaseline = {v.name: _traffic(v) for v in s.variants}
        s.srmSince = now
        s.srmPValue = None
        s.conditions = set_condition(
            s.conditions,
            SRM_REASON,
            "Unknown",
            "CountingStarted",
            f"the split ({split}) is in effect: counting samples from this analysis on "
            "(the transient before it is not counted)",
            now,
            generation,
        )
        return
    base = s.srmBaseline
    counts = [max(0.0, _traffic(by_name[n]) - base.get(n, 0.0)) for n in active]
    need = max(SRM_MIN_SAMPLES, spec.stoppingRules.minSamplesPerVariant / 2)
    # The capped boundary needs a horizon fixed in advance, in the units counted: the sample cap when
    # the primary metric's samples are counted; none (the mixture alone) for analysis.requests.
    cap = spec.stoppingRules.maxSamplesPerVariant
    judge_spec = srm.SrmSpec(
        alpha=spec.stoppingRules.srmAlpha,
        names=tuple(active),
        weights=tuple(weights),
        horizon=float(cap * len(active)) if cap and not spec.analysis.requests else None,
        previous=s.srmPValue,
    )
    if min(counts, default=0) < need:
        s.conditions = set_condition(
            s.conditions,
            SRM_REASON,
            "Unknown",
            "NotEnoughSamples",
            f"waiting for {need:.0f} samples per active variant since the split came into effect "
            f"({srm.samples_text(judge_spec, counts)})",
            now,
            generation,
        )
        return
    f = srm.judge(judge_spec, counts)
    s.srmPValue = f.value
    if f.verdict == "fail":
        s.conditions = set_condition(s.conditions, SRM_REASON, "True", SRM_REASON, f.message, now, generation)
        actions.append(Event("Warning", SRM_REASON, f.message))
        _history(s, now, "Paused", SRM_REASON, f.message, f.numbers)
    else:
        s.conditions = set_condition(
            s.conditions, SRM_REASON, "False", "SplitMatches", f.message, now, generation
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
    results: dict[str, stats.ComparisonResult] = {}
    specs: dict[str, sequential.SequentialSpec] = {}
    for n in treatments:
        specs[n] = sequential.SequentialSpec(
            alpha=sc.alpha,
            better=pm.better,
            allocation=_allocation(s, ctrl, n),
            method=sc.method,
            mde=sc.minimumDetectableEffect,
            max_samples=spec.stoppingRules.maxSamplesPerVariant if sc.method == "sequential" else None,
            labels=(ctrl, n),
            names=EXPERIMENT_NAMES,
        )
        if type(cdata) is type(data[n]):
            results[n] = sequential.compare(specs[n], [(cdata, data[n])])
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
        verdict, note = _variant_verdict(spec, r, adjusted.get(n), ptb.get(n), len(treatments))
        vs.verdict = verdict
        vs.reason = r.reason + note
        details = sequential.numbers(specs[n], r)
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


def _variant_verdict(
    spec: ModelExperimentSpec, r: stats.ComparisonResult, adjusted: float | None, p_best: float | None, m: int
) -> tuple[VariantVerdict, str]:
    """A variant against the control: better, worse or inconclusive (on its Holm-adjusted p-value for
    the frequentist methods, of ``m`` comparisons), and a note saying on what."""
    sc = spec.successCriteria
    verdict: VariantVerdict
    if adjusted is not None:
        better = _in_better_direction(r.difference, spec.primaryMetric.better)
        verdict = ("better" if better else "worse") if adjusted < sc.alpha else "inconclusive"
        note = f"; Holm-adjusted p = {adjusted:.3g} (alpha {sc.alpha:g}, {m} comparison(s))"
    else:
        verdict = "better" if r.verdict == "pass" else "worse" if r.verdict == "fail" else "inconclusive"
        note = f"; P(best) = {p_best:.3g}" if p_best is not None else ""
    if verdict == "inconclusive" and r.more_samples_needed is not None:
        note += f"; about {r.more_samples_needed:.0f} more samples (both arms) to decide"
    return verdict, note


def _allocation(s: ModelExperimentStatus, control: str, treatment: str) -> float:
    """The treatment's share of the two arms' traffic at the split in force (0.5 when unknown)."""
    w = {v.name: v.weight for v in s.variants}
    c, t = w.get(control, 0), w.get(treatment, 0)
    return t / (c + t) if c > 0 and t > 0 else 0.5


def _design(spec: ModelExperimentSpec) -> stats.Design | None:
    """The design of the test that really runs: the capped sequential boundary only with a sample cap,
    else the uncapped mixture test; None for bayesian (it has no planned size)."""
    sc = spec.successCriteria
    if sc.method == "fixedHorizon":
        return "fixedHorizon"
    if sc.method == "sequential":
        return "sequential" if spec.stoppingRules.maxSamplesPerVariant else "mixture"
    return None


def _sample_size(
    spec: ModelExperimentSpec, s: ModelExperimentStatus, data: dict[str, Data], active: list[str]
) -> None:
    """Samples the smaller arm of each comparison needs for ``power`` at the MDE, for the design that
    really runs and at the split in force (alpha split over the comparisons, conservatively); the
    largest over the comparisons. None when it cannot be planned (bayesian, too little data)."""
    sc = spec.successCriteria
    design = _design(spec)
    if design is None:
        s.sampleSizePerVariant = None
        return
    ctrl = control_of(spec).name
    treatments = [n for n in active if n != ctrl]
    alpha = sc.alpha / max(1, len(treatments))
    mde = sc.minimumDetectableEffect
    cdata = data.get(ctrl)
    sizes: list[int] = []
    try:
        if isinstance(cdata, stats.ProportionData):
            if cdata.trials < stats.MIN_SAMPLES_PER_ARM:
                return
            base = min(max(cdata.successes / cdata.trials, 0.001), 0.999)
            delta = mde if spec.primaryMetric.better == "higher" else -mde
            if not 0 < base + delta < 1:
                delta = -delta
            for t in treatments:
                plan = stats.sample_plan_proportions(
                    base,
                    delta,
                    alpha=alpha,
                    power=sc.power,
                    allocation=_allocation(s, ctrl, t),
                    design=design,
                )
                sizes.append(plan.smaller_arm)
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
            for t in treatments:
                plan = stats.sample_plan_means(
                    sd, mde, alpha=alpha, power=sc.power, allocation=_allocation(s, ctrl, t), design=design
                )
                sizes.append(plan.smaller_arm)
    except ValueError:
        return
    if sizes:
        s.sampleSizePerVariant = max(sizes)


@dataclass(frozen=True)
class _Look:
    """What one decision looks at: samples per active variant and where the stopping rules stand."""

    least: float  # samples of the active variant with the fewest
    need: int  # samples per variant a decision needs
    at_cap: bool  # every active variant reached maxSamplesPerVariant
    timed_out: bool  # maxDuration elapsed
    exploring: bool  # the bandit phase of a Thompson experiment (before a confirmation)
    samples: str  # the counts, for messages
    values: dict[str, float]  # recorded with the decision
    treatments: list[str]  # the active variants other than the control


def _look(
    spec: ModelExperimentSpec,
    s: ModelExperimentStatus,
    data: dict[str, Data],
    active: list[str],
    now: datetime,
) -> _Look:
    sr = spec.stoppingRules
    ns = {n: (_n(data[n]) if n in data else 0.0) for n in active}
    least = min(ns.values())
    phase_note = ""
    if s.confirmation is not None:
        since = s.confirmation.since.strftime("%Y-%m-%dT%H:%M:%SZ")
        phase_note = f" (confirmation of {s.confirmation.variant}: samples since {since})"
    elapsed = (now - s.startedAt).total_seconds() if s.startedAt else 0.0
    need = sr.minSamplesPerVariant
    if spec.successCriteria.method == "fixedHorizon" and s.sampleSizePerVariant:
        need = max(need, s.sampleSizePerVariant)
    ctrl = control_of(spec).name
    return _Look(
        least=least,
        need=need,
        at_cap=sr.maxSamplesPerVariant is not None and least >= sr.maxSamplesPerVariant,
        timed_out=elapsed >= parse_duration(sr.maxDuration),
        exploring=spec.allocation.strategy == "thompson" and s.confirmation is None,
        samples=", ".join(f"{n} n={ns[n]:.0f}" for n in active) + phase_note,
        values=_decision_values(s, active, ns),
        treatments=[n for n in active if n != ctrl],
    )


def _decide(
    spec: ModelExperimentSpec,
    s: ModelExperimentStatus,
    actions: list[Action],
    data: dict[str, Data],
    raw: dict[str, Data],
    active: list[str],
    now: datetime,
    generation: int,
) -> Decision | None:
    """``data``: the samples the test uses (a confirmation's own); ``raw``: cumulative since the start."""
    look = _look(spec, s, data, active, now)
    stopping = look.at_cap or look.timed_out
    if look.least < look.need and not stopping:
        extra = look.need > spec.stoppingRules.minSamplesPerVariant
        s.message = f"collecting samples: {look.samples}; a decision needs {look.need} per variant" + (
            " (planned sample size of the fixed-horizon test)" if extra else ""
        )
        return None
    winner = _winner(spec, s, look.treatments)
    if winner is not None and look.exploring:
        if not stopping:
            _confirm(spec, s, actions, winner, raw, now)
            return None
        winner = None  # no time or samples left to confirm the bandit's leader: no winner
    outcome = _won(spec, s, winner, look) if winner is not None else _no_winner(spec, s, look)
    if outcome is None:
        s.message = f"analysing: no decision yet ({_summary(s, look.treatments)}; {look.samples})"
        return None
    return _finish(spec, s, actions, now, generation, outcome)


def _won(spec: ModelExperimentSpec, s: ModelExperimentStatus, winner: str, look: _Look) -> Outcome:
    """The winner found: promoted (all traffic to it) or kept (traffic unchanged), by onSuccess."""
    sc, pm = spec.successCriteria, spec.primaryMetric
    ctrl = control_of(spec).name
    by_name = {v.name: v for v in s.variants}
    w = by_name[winner]
    stat = (
        f"P(best) = {w.probabilityToBeBest:.3g} >= {sc.probabilityToBeBest:g}"
        if sc.method == "bayesian"
        else f"Holm-adjusted p = {w.adjustedPValue:.3g} < alpha {sc.alpha:g}"
    )
    detail = (
        f"{winner} {pm.name} = {w.estimate:.4g} vs {ctrl} (control) {by_name[ctrl].estimate:.4g} "
        f"(diff {(w.estimate or 0) - (by_name[ctrl].estimate or 0):+.4g}, "
        f"CI [{w.ciLow:+.4g}, {w.ciHigh:+.4g}], {stat}; {look.samples})"
    )
    if spec.onSuccess == "promoteWinner":
        msg = f"winner {winner}: {detail}; all traffic to {winner}"
        return Outcome("Concluded", "promoted", "WinnerPromoted", msg, winner=winner, values=look.values)
    msg = f"winner {winner}: {detail}; onSuccess is keep: traffic unchanged"
    return Outcome(
        "Concluded", "winnerKept", "WinnerFound", msg, winner=winner, values=look.values, move=False
    )


def _no_winner(spec: ModelExperimentSpec, s: ModelExperimentStatus, look: _Look) -> Outcome | None:
    """Futility, the sample cap, maxDuration or the fixed-horizon look end it without a winner."""
    sc, sr = spec.successCriteria, spec.stoppingRules
    ctrl = control_of(spec).name
    futile = _futile(spec, s, look.treatments)
    if futile:
        msg = (
            f"futile: no variant can beat the control {ctrl} by the MDE "
            f"{sc.minimumDetectableEffect:g} ({futile}; {look.samples})"
        )
        return _null_outcome(spec, "futile", "Futile", msg, look.values)
    one_look = sc.method == "fixedHorizon" and look.least >= look.need
    if not (look.at_cap or look.timed_out or one_look):
        return None
    why = (
        f"every active variant reached maxSamplesPerVariant {sr.maxSamplesPerVariant}"
        if look.at_cap
        else f"maxDuration {sr.maxDuration} elapsed"
        if look.timed_out
        else f"the fixed-horizon test at its planned {look.need} samples per variant ended"
    )
    msg = (
        f"no winner: {why} without a significant improvement over the control {ctrl} "
        f"({_summary(s, look.treatments)}; {look.samples})"
    )
    return _null_outcome(spec, "noWinner", "NoWinner", msg, look.values)


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
    """Concluded without a winner (see :func:`_null_outcome`)."""
    return _finish(spec, s, actions, now, generation, _null_outcome(spec, decision, reason, message, values))


def _null_outcome(
    spec: ModelExperimentSpec, decision: str, reason: str, message: str, values: dict[str, float]
) -> Outcome:
    """A null result is not a failure: Concluded, all traffic to the control (or kept, by onSuccess)."""
    if spec.onSuccess == "promoteWinner":
        message += "; all traffic to the control"
    else:
        message += "; onSuccess is keep: traffic unchanged"
    return Outcome(
        "Concluded",
        decision,
        reason,
        message,
        values=values,
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


def _decision_values(s: ModelExperimentStatus, active: list[str], ns: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for v in s.variants:
        if v.name not in active:
            continue
        out[f"{v.name}/n"] = ns.get(v.name, v.n)
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


def _confirm(
    spec: ModelExperimentSpec,
    s: ModelExperimentStatus,
    actions: list[Action],
    leader: str,
    raw: dict[str, Data],
    now: datetime,
) -> None:
    """Thompson: the bandit found a leader; confirm it against the control on a fixed 50/50 split.

    Only the samples after this point count for the decision, so the drift the bandit's pooled
    counts are exposed to cannot make the winner.
    """
    ctrl = control_of(spec).name
    by_name = {v.name: v for v in s.variants}
    lead = by_name[leader]
    why = (
        f"the bandit's leader {leader} ({_summary(s, [leader])}) is confirmed against the control "
        f"{ctrl} on a fixed {CONFIRMATION_WEIGHT}/{100 - CONFIRMATION_WEIGHT} split, with only the "
        "samples from now on"
    )
    baseline: dict[str, list[float]] = {}
    for n in (ctrl, leader):
        d = raw.get(n)
        if isinstance(d, stats.ProportionData):
            baseline[n] = [d.successes, d.trials]
    s.confirmation = Confirmation(variant=leader, since=now, baseline=baseline)
    for v in s.variants:
        if v.name not in (ctrl, leader) and v.active:
            v.active = False
            v.verdict = "notSelected"
            v.reason = f"thompson: {leader} leads and is being confirmed"
    weights = _serving_weights(spec, s, raw, 0, now)  # an unready leader waits at 0 until it is ready
    actions.append(Event("Normal", "ConfirmationStarted", why))
    _history(s, now, "ConfirmationStarted", "ConfirmationStarted", why, {f"{leader}/n": lead.n})
    _set_weights(spec, s, actions, now, weights, "confirmation split", event=False, record=False)
    s.message = why


def _thompson(
    spec: ModelExperimentSpec, s: ModelExperimentStatus, data: dict[str, Data], generation: int, now: datetime
) -> dict[str, int]:
    """Bandit weights; seeded from the generation and the analysis time, so the engine stays pure."""
    serving = _serving(spec, s)
    excluded = [v.name for v in s.variants if v.name not in serving]
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
    if event:
        actions.append(Event("Normal", "WeightsChanged", msg))
    if record:
        _history(s, now, "WeightsChanged", "WeightsChanged", msg, {k: float(w) for k, w in weights.items()})
    if spec.allocation.strategy == "fixed" or s.confirmation is not None:  # SRM runs on fixed splits
        _split_changed(s, now)


def _split_changed(s: ModelExperimentStatus, now: datetime) -> None:
    """The split changed now: SRM counts again from the first analysis after this one."""
    s.srmBaseline = {}
    s.srmSince = now
    s.srmPValue = None


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
    # Concluded: True only when the experiment reached its decision (a winner or a null result), so
    # `kubectl wait --for=condition=Concluded` tells a decided experiment from a rolled-back one.
    if s.phase == "Concluded":
        c = set_condition(c, "Concluded", "True", reason, s.message, now, generation)
    elif done:
        c = set_condition(c, "Concluded", "False", reason, s.message, now, generation)
    else:
        c = set_condition(c, "Concluded", "False", "InProgress", "no decision yet", now, generation)
    if s.phase == "RolledBack":
        c = set_condition(c, "Healthy", "False", reason, s.message, now, generation)
    s.conditions = c
