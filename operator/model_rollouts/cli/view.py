"""What the plugin shows, derived from an object alone (pure: no I/O, ``now`` passed in).

A *view* is a plain JSON-ready dict: ``-o json|yaml`` prints it as it is, and :mod:`.render` draws
it with rich. Everything here is read from the object's spec and status (the operator's record);
the timing rules are the engine's own (:func:`model_rollouts.engine.rollout.next_due`).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

from model_rollouts.analysis import comparison

# The API models (pydantic) and the engines (scipy, for their statistics) are imported by the
# functions that read an object, so that `--help` and commands that never show one start quickly.

ROLLOUT, EXPERIMENT = "ModelRollout", "ModelExperiment"
#: Phases that end `status` with exit code 0 (success) and 1 (rolled back or aborted).
SUCCESS_PHASES = ("Promoted", "Idle", "Concluded")
FAILURE_PHASES = ("RolledBack", "Aborted")
#: Comparison numbers copied into the view besides the arms', in the order shown.
_NUMBERS = ("difference", "ciLow", "ciHigh", "pValue", "adjustedPValue", "probabilityToBeBest",
            "moreSamplesNeeded", "alpha")  # fmt: skip


def parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _iso(t: datetime | None) -> str | None:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if t else None


def _in(t: datetime | None, now: datetime) -> float | None:
    return None if t is None else round((t - now).total_seconds(), 1)


def human_seconds(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3720`` -> ``1h2m``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s" if s % 60 else f"{s // 60}m"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _when(t: datetime, now: datetime) -> str:
    return "due now" if t <= now else "in " + human_seconds((t - now).total_seconds())


def _finite(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    return {
        "kind": obj.get("kind"),
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
        "created": meta.get("creationTimestamp"),
        "generation": meta.get("generation"),
        "observedGeneration": status.get("observedGeneration"),
        "phase": status.get("phase") or "Pending",
        "message": status.get("message") or "",
    }


def _clean_status(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in (obj.get("status") or {}).items() if k != "kopf"}


def finished(obj: dict[str, Any]) -> bool:
    """The operator has nothing left to do: a terminal phase for the current generation, and no new
    revision or retry waiting (the engine's own test of whether an object needs its timer)."""
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    if (status.get("observedGeneration") or 0) < (meta.get("generation") or 0):
        return False
    from model_rollouts.engine import experiment as experiment_engine
    from model_rollouts.engine import rollout as rollout_engine

    engine: Any = rollout_engine if obj.get("kind") == ROLLOUT else experiment_engine
    return not engine.active(obj.get("spec") or {}, status, meta.get("annotations") or {})


def outcome(obj: dict[str, Any]) -> int | None:
    """Exit code of ``status``: 0 promoted/concluded, 1 rolled back/aborted, None still running."""
    if not finished(obj):
        return None
    phase = (obj.get("status") or {}).get("phase")
    return 0 if phase in SUCCESS_PHASES else 1 if phase in FAILURE_PHASES else None


def step_text(step: dict[str, Any]) -> str:
    if "setWeight" in step:
        return f"setWeight {step['setWeight']}"
    if "pause" in step:
        d = (step.get("pause") or {}).get("duration")
        return f"pause {d}" if d else "pause (until resumed)"
    if "analysis" in step:
        return f"analysis {(step.get('analysis') or {}).get('duration')}"
    if "shadow" in step:
        sh = step.get("shadow") or {}
        return f"shadow {sh.get('percent')}% {sh.get('duration')} (mirrored, weight 0)"
    return "?"


def _comparison(m: dict[str, Any], names: tuple[str, str]) -> dict[str, Any]:
    """One comparison measurement: baseline arm vs the candidate, difference, interval, verdict.

    Read through the one accessor (either kind, either version of the keys); the arms' numbers are
    under the shared keys and, for the plugin's JSON, also under the kind's ``names``."""
    d = m.get("details") or {}
    nums = comparison.numbers(d)
    arms = {k: nums[k] for k in comparison.ARM_KEYS}
    out: dict[str, Any] = {
        "name": m.get("name"),
        "arm": m.get("variant"),
        **comparison.with_names(arms, names),
    }
    for k in _NUMBERS:
        if k in d:
            out[k] = nums[k]
    if out.get("difference") is None and m.get("value") is not None:
        out["difference"] = _finite(m.get("value"))
    out.update(
        verdict=m.get("verdict"),
        threshold=m.get("threshold"),
        carried=bool(m.get("carried")),
        message=m.get("message"),
    )
    return out


def _guardrail(
    m: dict[str, Any], limits: dict[str, dict[str, Any]], failures: dict[str, int]
) -> dict[str, Any]:
    g = limits.get(str(m.get("name")), {})
    key = (
        str(m.get("name"))
        if m.get("variant") in (None, "candidate")
        else f"{m.get('variant')}/{m.get('name')}"
    )
    return {
        "name": m.get("name"),
        "variant": m.get("variant"),
        "value": _finite(m.get("value")),
        "min": g.get("min"),
        "max": g.get("max"),
        "threshold": m.get("threshold"),
        "verdict": m.get("verdict"),
        "failures": failures.get(key, failures.get(str(m.get("name")), 0)),
        "failureLimit": g.get("failureLimit", 1),
        "message": m.get("message"),
    }


def _conditions(status: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {k: c.get(k) for k in ("type", "status", "reason", "message", "lastTransitionTime")}
        for c in status.get("conditions") or []
    ]


def _samples_eta(more: float | None, n_so_far: float, since: datetime | None, now: datetime) -> str:
    """'about N more samples (both arms), ~T at the rate so far'."""
    if more is None:
        return ""
    text = f"about {more:,.0f} more samples (both arms)"
    if since is not None and n_so_far > 0:
        elapsed = (now - since).total_seconds()
        if elapsed > 0:
            text += f", ~{human_seconds(more / (n_so_far / elapsed))} at the rate so far"
    return text


# -- ModelRollout -------------------------------------------------------------------------------------


def plan_line(obj: dict[str, Any]) -> str | None:
    """The Planned condition in one line when a decision is unlikely in time (status.plan), else None."""
    st = obj.get("status") or {}
    c = next((c for c in st.get("conditions") or [] if c.get("type") == "Planned"), None)
    if c is None or c.get("status") != "False":
        return None
    return f"decision unlikely in time (Planned=False, {c.get('reason')}): {c.get('message') or ''}"


def rollout_view(obj: dict[str, Any], now: datetime | None = None) -> dict[str, Any]:
    from pydantic import ValidationError

    from model_rollouts.api.common import parse_duration
    from model_rollouts.api.rollout import TERMINAL_PHASES as ROLLOUT_TERMINAL
    from model_rollouts.api.rollout import ModelRolloutSpec, ModelRolloutStatus
    from model_rollouts.engine import rollout as rollout_engine

    now = now or datetime.now(UTC)
    raw_spec = obj.get("spec") or {}
    raw_status = _clean_status(obj)
    view = _meta(obj)
    phase = view["phase"]
    weight = int(raw_status.get("weight") or 0)
    current = int(raw_status.get("currentStep") or 0)
    steps = raw_spec.get("steps") or []
    stable = raw_status.get("stableService") or (raw_spec.get("stable") or {}).get("service")
    candidate = (raw_spec.get("candidate") or {}).get("service")
    if stable == candidate and phase == "Promoted":
        # Promotion made the candidate the serving stable; show the baseline it replaced.
        stable = (raw_spec.get("stable") or {}).get("service") or stable
    view.update(
        revision=raw_status.get("revision"),
        stable=stable,
        candidate=candidate,
        candidateVersion=(raw_spec.get("candidate") or {}).get("modelVersion"),
        weights={"stable": 100 - weight, "candidate": weight},
        currentStep=current,
        stepWeight=raw_status.get("stepWeight"),
        shadowPercent=raw_status.get("shadowPercent"),
        finished=finished(obj),
    )
    view["steps"] = [
        {
            "index": i,
            "step": step_text(s),
            "state": (
                "done"
                if i < current or phase == "Promoted"
                else "current"
                if i == current and phase not in ROLLOUT_TERMINAL
                else "pending"
            ),
        }
        for i, s in enumerate(steps)
    ]
    analysis = raw_spec.get("analysis") or {}
    limits = {g.get("name"): g for g in analysis.get("guardrails") or []}
    failures = raw_status.get("guardrailFailures") or {}
    last = raw_status.get("lastAnalysis") or []
    view["lastAnalysisTime"] = raw_status.get("lastAnalysisTime")
    view["guardrails"] = [_guardrail(m, limits, failures) for m in last if m.get("kind") == "guardrail"]
    specs = {c.get("name"): c for c in analysis.get("comparisons") or []}
    passed = set(raw_status.get("passedComparisons") or [])
    comparisons = []
    for m in last:
        if m.get("kind") != "comparison":
            continue
        c = _comparison(m, comparison.ROLLOUT_NAMES)
        cs = specs.get(m.get("name"), {})
        c.update(test=cs.get("test", "nonInferiority"), margin=cs.get("margin", 0.0),
                 advisory=bool(cs.get("advisory")), passed=m.get("name") in passed)  # fmt: skip
        if m.get("segments"):
            c["segmentLabel"] = (cs.get("segments") or {}).get("label", "segment")
            c["segments"] = [dict(r) for r in m["segments"]]
        comparisons.append(c)
    view["comparisons"] = comparisons
    view["conditions"] = _conditions(raw_status)
    view["history"] = (raw_status.get("history") or [])[-6:]
    view["plan"] = raw_status.get("plan") or []

    # What it waits for, from the engine's own rules.
    waiting: list[str] = []
    due: datetime | None = None
    try:
        spec = ModelRolloutSpec.model_validate(raw_spec)
        status = ModelRolloutStatus.model_validate(raw_status)
    except ValidationError:
        spec = status = None  # type: ignore[assignment]
    name = view["name"]
    if view["finished"]:
        waiting.append(f"nothing: {phase}")
        if phase in FAILURE_PHASES:
            waiting.append(f"`kubectl mlrollouts retry {name}` starts the steps over")
    elif phase == "Invalid":
        waiting.append(f"a valid spec: {view['message']}")
    elif spec is not None and status is not None:
        if (view["observedGeneration"] or 0) < (view["generation"] or 0):
            waiting.append(f"the operator to act on generation {view['generation']}")
        if spec.paused:
            waiting.append(
                f"spec.paused to be cleared (`kubectl mlrollouts resume {name}`); guardrails still run"
                if phase == "Paused"
                else "spec.paused takes effect at the next analysis"
            )
        step = spec.steps[current] if current < len(spec.steps) else None
        if step is not None and step.pause is not None and step.pause.duration is None:
            waiting.append(
                f"a resume at the manual gate of step {current} "
                f"(`kubectl mlrollouts resume {name}` or `promote {name}`; `promote --full` skips the rest)"
            )
        elif step is not None and (step.pause or step.analysis or step.shadow) and status.stepStartedAt:
            timed = step.pause or step.analysis or step.shadow
            d = parse_duration(timed.duration or "0s")  # type: ignore[union-attr]
            left = d - (now - status.stepStartedAt).total_seconds()
            if left > 0:
                waiting.append(
                    f"step {current} ({step_text(steps[current])}) to end: {human_seconds(left)} left "
                    f"(`kubectl mlrollouts promote {name}` ends it at the next analysis)"
                )
        pp = status.postPromotion
        if phase == "Baking" and pp is not None and pp.stageEndsAt is not None:
            stage = (
                "bake"
                if pp.stage == "Bake"
                else f"holdout ({pp.previousStable} keeps {100 - status.weight}%)"
            )
            waiting.append(f"the {stage} to end at {_iso(pp.stageEndsAt)} ({_when(pp.stageEndsAt, now)})")
        if status.weight > 0 or status.shadowPercent:
            due = rollout_engine.next_due(spec, status)
            if due is not None and due != rollout_engine.EPOCH:
                waiting.append(
                    f"the next analysis at {_iso(due)} ({_when(due, now)}; every {spec.analysis.interval})"
                )
        elif phase in ("Pending", "Progressing"):
            waiting.append("the first weight change (at the next tick)")
        n_so_far = {c["name"]: (c.get("baselineN") or 0) + (c.get("candidateN") or 0) for c in comparisons}
        baking = phase == "Baking"  # promoted to 100% already: nothing waits for comparisons
        for c in [] if baking else comparisons:
            cs = specs.get(c["name"], {})
            if c["passed"] or cs.get("advisory") or c["verdict"] == "pass":
                continue
            eta = _samples_eta(c.get("moreSamplesNeeded"), n_so_far[c["name"]], status.revisionStartedAt, now)
            waiting.append(
                f"comparison {c['name']} to pass its {c['test']} test before full traffic"
                + (f": {eta}" if eta else "")
            )
        for cmp in [] if baking else spec.analysis.comparisons:
            if any(x["name"] == cmp.name for x in comparisons) or cmp.advisory:
                continue
            waiting.append(f"comparison {cmp.name}: its first measurement")
        if line := plan_line(obj):
            waiting.append(line)
        if status.heldSince is not None:
            deadline = status.heldSince + timedelta(seconds=parse_duration(spec.progressDeadline))
            waiting.append(
                f"held since {_iso(status.heldSince)}; progressDeadline {spec.progressDeadline} "
                f"ends the hold at {_iso(deadline)} (onProgressDeadline {spec.onProgressDeadline}, "
                f"onInconclusive {spec.analysis.onInconclusive})"
            )
    view["nextAnalysisAt"] = _iso(due) if due and due != rollout_engine.EPOCH else None
    view["nextAnalysisIn"] = _in(due, now) if view["nextAnalysisAt"] else None
    view["waitingFor"] = waiting
    return view


# -- ModelExperiment ----------------------------------------------------------------------------------


def experiment_view(obj: dict[str, Any], now: datetime | None = None) -> dict[str, Any]:
    from pydantic import ValidationError

    from model_rollouts.api.common import parse_duration
    from model_rollouts.api.experiment import ModelExperimentSpec, ModelExperimentStatus
    from model_rollouts.engine import experiment as experiment_engine

    now = now or datetime.now(UTC)
    raw_spec = obj.get("spec") or {}
    raw_status = _clean_status(obj)
    view = _meta(obj)
    phase = view["phase"]
    view.update(
        revision=raw_status.get("revision"),
        finished=finished(obj),
        startedAt=raw_status.get("startedAt"),
        strategy=(raw_spec.get("allocation") or {}).get("strategy", "fixed"),
        method=(raw_spec.get("successCriteria") or {}).get("method", "sequential"),
        primaryMetric=(raw_spec.get("primaryMetric") or {}).get("name"),
        srmPValue=_finite(raw_status.get("srmPValue")),
        sampleSizePerVariant=raw_status.get("sampleSizePerVariant"),
        decision=raw_status.get("decision"),
        decisionReason=raw_status.get("decisionReason"),
        winner=raw_status.get("winner"),
        lastAnalysisTime=raw_status.get("lastAnalysisTime"),
    )
    controls = {v.get("name") for v in raw_spec.get("variants") or [] if v.get("control")}
    view["variants"] = [
        {
            "name": v.get("name"),
            "service": v.get("service"),
            "control": v.get("name") in controls,
            "weight": v.get("weight", 0),
            "active": v.get("active", True),
            "n": _finite(v.get("n")),
            "estimate": _finite(v.get("estimate")),
            "ciLow": _finite(v.get("ciLow")),
            "ciHigh": _finite(v.get("ciHigh")),
            "pValue": _finite(v.get("pValue")),
            "adjustedPValue": _finite(v.get("adjustedPValue")),
            "probabilityToBeBest": _finite(v.get("probabilityToBeBest")),
            "verdict": v.get("verdict"),
            "reason": v.get("reason"),
        }
        for v in raw_status.get("variants") or []
    ]
    view["weights"] = {v["name"]: v["weight"] for v in view["variants"]}
    last = raw_status.get("lastAnalysis") or []
    limits = {g.get("name"): g for g in raw_spec.get("guardrails") or []}
    failures = raw_status.get("guardrailFailures") or {}
    view["guardrails"] = [_guardrail(m, limits, failures) for m in last if m.get("kind") == "guardrail"]
    view["comparisons"] = [
        _comparison(m, comparison.EXPERIMENT_NAMES) for m in last if m.get("kind") == "comparison"
    ]
    view["conditions"] = _conditions(raw_status)
    view["history"] = (raw_status.get("history") or [])[-6:]

    waiting: list[str] = []
    due: datetime | None = None
    name = view["name"]
    try:
        spec = ModelExperimentSpec.model_validate(raw_spec)
        status = ModelExperimentStatus.model_validate(raw_status)
    except ValidationError:
        spec = status = None  # type: ignore[assignment]
    if view["finished"]:
        waiting.append(f"nothing: {phase}" + (f" (winner {view['winner']})" if view["winner"] else ""))
        if phase in FAILURE_PHASES:
            waiting.append(f"`kubectl mlrollouts retry {name}` starts the experiment over")
    elif phase == "Invalid":
        waiting.append(f"a valid spec: {view['message']}")
    elif spec is not None and status is not None:
        if spec.paused:
            waiting.append(f"spec.paused to be cleared (`kubectl mlrollouts resume {name}`)")
        elif phase == "Paused":
            waiting.append(f"a resume after the sample-ratio mismatch (`kubectl mlrollouts resume {name}`)")
        due = experiment_engine.next_due(spec, status)
        if due is not None and due != experiment_engine.EPOCH:
            waiting.append(
                f"the next analysis at {_iso(due)} ({_when(due, now)}; every {spec.analysis.interval})"
            )
        least = min((v["n"] or 0 for v in view["variants"] if v["active"]), default=0)
        need = spec.stoppingRules.minSamplesPerVariant
        if least < need:
            waiting.append(
                f"every active variant to reach minSamplesPerVariant {need} (the least has {least:,.0f})"
            )
        if status.sampleSizePerVariant:
            waiting.append(
                f"planned samples per variant for power {spec.successCriteria.power:g}: "
                f"{status.sampleSizePerVariant:,}"
            )
        started = status.startedAt
        total = sum(v["n"] or 0 for v in view["variants"])
        for c in view["comparisons"]:
            if c["verdict"] == "inconclusive" and c.get("moreSamplesNeeded"):
                eta = _samples_eta(c["moreSamplesNeeded"], total, started, now)
                waiting.append(f"{c['arm']} vs control to decide: {eta}")
        if started is not None:
            end = started + timedelta(seconds=parse_duration(spec.stoppingRules.maxDuration))
            waiting.append(f"at the latest maxDuration {spec.stoppingRules.maxDuration} at {_iso(end)}")
    view["nextAnalysisAt"] = _iso(due) if due and due != experiment_engine.EPOCH else None
    view["nextAnalysisIn"] = _in(due, now) if view["nextAnalysisAt"] else None
    view["waitingFor"] = waiting
    return view


def view_of(obj: dict[str, Any], now: datetime | None = None) -> dict[str, Any]:
    return rollout_view(obj, now) if obj.get("kind") == ROLLOUT else experiment_view(obj, now)


def list_row(obj: dict[str, Any], now: datetime | None = None) -> dict[str, Any]:
    """One line of ``list``: kind, name, phase, step, the split, age and the message."""
    now = now or datetime.now(UTC)
    row = _meta(obj)
    status = obj.get("status") or {}
    if obj.get("kind") == ROLLOUT:
        w = int(status.get("weight") or 0)
        steps = len((obj.get("spec") or {}).get("steps") or [])
        row["step"] = f"{status.get('currentStep', 0)}/{steps}"
        row["weights"] = {"stable": 100 - w, "candidate": w}
    else:
        row["step"] = status.get("winner") or ""
        row["weights"] = {v.get("name"): v.get("weight", 0) for v in status.get("variants") or []}
    created = parse_time(row.get("created"))
    row["age"] = human_seconds((now - created).total_seconds()) if created else ""
    return row
