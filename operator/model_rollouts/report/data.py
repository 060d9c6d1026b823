"""What a decision report shows, read from one ModelRollout or ModelExperiment object (a plain dict).

The spec gives thresholds and margins, the per-analysis numbers come from the series ConfigMaps
the operator archives every analysis to (``kube/series_store.py``) together with the last few in
``status.series``, ``status.history`` gives the decisions and ``metadata.annotations`` /
``status.handled`` who asked for them. Without the ConfigMaps (a saved object alone, or no right to
list them) the report covers the analyses ``status.series`` still holds, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

ROLLOUT, EXPERIMENT = "ModelRollout", "ModelExperiment"
ANNOTATION_PREFIX = "mlrollouts.io/"

#: History events that are decisions or interventions (weight steps are drawn as the weight line).
QUIET_EVENTS = {"WeightChanged", "WeightsChanged", "ResumeIgnored", "PromoteIgnored", "Valid"}
#: Reasons that a person (or a tool acting for one) caused, and how.
USER_REASONS = {
    "PromoteRequested": "annotation mlrollouts.io/promote",
    "PromoteFullRequested": "annotation mlrollouts.io/promote-full",
    "AbortRequested": "annotation mlrollouts.io/abort",
    "RetryRequested": "annotation mlrollouts.io/retry",
    "ResumeRequested": "annotation mlrollouts.io/resume",
    "SpecPaused": "spec.paused",
    "SpecResumed": "spec.paused",
    "StepsChanged": "spec.steps edited",
    "NewRevision": "spec changed (new revision)",
}


#: History events that open a rollout revision; the report starts at the last of them.
REVISION_STARTS = ("Started", "NewRevision")


class ReportError(ValueError):
    """The object cannot be reported on (names the field)."""


def parse_time(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    try:
        t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise ReportError(f"not an RFC 3339 time: {value!r}") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


@dataclass
class Decision:
    """One history entry, with who or what caused it."""

    time: datetime
    event: str
    reason: str
    phase: str
    weight: int | None
    message: str
    trigger: str
    marked: bool  # drawn as a vertical marker on the time axes


@dataclass
class Report:
    kind: str
    name: str
    namespace: str
    spec: dict[str, Any]
    status: dict[str, Any]
    annotations: dict[str, str]
    series: list[dict[str, Any]]
    decisions: list[Decision] = field(default_factory=list)
    #: How many analyses came from the archive (None: it was not read; see :attr:`archive_note`).
    archived: int | None = None
    archive_note: str = ""

    @property
    def phase(self) -> str:
        return str(self.status.get("phase") or "Pending")

    @property
    def title(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"

    def times(self) -> list[datetime]:
        return [parse_time(p["time"]) for p in self.series]

    def span(self) -> tuple[datetime, datetime] | None:
        """First and last time the report shows (analyses and decisions): every time axis uses it."""
        ts = self.times() + [d.time for d in self.decisions]
        return (min(ts), max(ts)) if ts else None

    def annotations_of_ours(self) -> dict[str, str]:
        return {k: v for k, v in sorted(self.annotations.items()) if k.startswith(ANNOTATION_PREFIX)}


def trigger_of(reason: str, message: str, kind: str) -> str:
    how = USER_REASONS.get(reason)
    if how is not None:
        return f"user: {how}"
    if reason == "Started":
        return "user: object created"
    if reason == "Retried":
        return "user: annotation mlrollouts.io/retry"
    if reason.startswith("Gate"):
        return "gate: " + (message.split(" ")[1] if message.startswith("gate ") else "webhook")
    return "operator: analysis" if reason not in ("InvalidSpec", "SpecValid") else "operator: validation"


def load(obj: dict[str, Any], archived: list[dict[str, Any]] | None = None, note: str = "") -> Report:
    """The report's data from a ModelRollout or ModelExperiment object and, when they could be read,
    the points archived for its current revision (``archived``; None: not read, ``note`` says why)."""
    if not isinstance(obj, dict):
        raise ReportError("the object must be a mapping (a Kubernetes object)")
    kind = obj.get("kind")
    if kind not in (ROLLOUT, EXPERIMENT):
        raise ReportError(f"kind: expected {ROLLOUT} or {EXPERIMENT}, got {kind!r}")
    meta = obj.get("metadata") or {}
    if not meta.get("name"):
        raise ReportError("metadata.name is missing")
    status = obj.get("status") or {}
    series = status.get("series") or []
    if not isinstance(series, list):
        raise ReportError("status.series must be a list")
    for i, p in enumerate(series):
        if not isinstance(p, dict) or "time" not in p:
            raise ReportError(f"status.series[{i}].time is missing")
    r = Report(
        kind=kind,
        name=str(meta["name"]),
        namespace=str(meta.get("namespace") or "default"),
        spec=obj.get("spec") or {},
        status=status,
        annotations={str(k): str(v) for k, v in (meta.get("annotations") or {}).items()},
        series=_merged(archived or [], series),
        archived=None if archived is None else len(archived),
        archive_note=note,
    )
    # The report covers the current revision: its series (status.series restarts with each revision)
    # and the decisions since it started (status.history spans revisions).
    marks = [parse_time(x) for x in (status.get("revisionStartedAt"), status.get("startedAt")) if x]
    marks += [parse_time(p["time"]) for p in r.series[:1]]
    since = min(marks) if marks else None
    history = status.get("history") or []
    # A promotion and the next revision's start can share a second: position, not time, separates them.
    starts = [i for i, h in enumerate(history) if h.get("event") in REVISION_STARTS]
    first = starts[-1] if starts and kind != EXPERIMENT else 0
    for i, h in enumerate(history):
        if "time" not in h:
            raise ReportError(f"status.history[{i}].time is missing")
        if i < first or (since is not None and parse_time(h["time"]) < since):
            continue
        reason, event = str(h.get("reason") or ""), str(h.get("event") or "")
        r.decisions.append(
            Decision(
                time=parse_time(h["time"]),
                event=event,
                reason=reason,
                phase=str(h.get("phase") or ""),
                weight=h.get("weight"),
                message=str(h.get("message") or ""),
                trigger=trigger_of(reason, str(h.get("message") or ""), kind),
                marked=event not in QUIET_EVENTS,
            )
        )
    return r


def _merged(archived: list[dict[str, Any]], window: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per analysis time, oldest first; status's copy wins over the archive's."""
    out: dict[datetime, dict[str, Any]] = {}
    for i, p in enumerate(archived):
        if not isinstance(p, dict) or "time" not in p:
            raise ReportError(f"archived series point {i}: time is missing")
        out[parse_time(p["time"])] = p
    for p in window:
        out[parse_time(p["time"])] = p
    return [out[t] for t in sorted(out)]


def rollout_weights(r: Report) -> list[tuple[datetime, int]]:
    """Candidate weight over time: every analysis and every recorded weight change, in time order."""
    pts = [(parse_time(p["time"]), int(p.get("weight") or 0)) for p in r.series]
    pts += [(d.time, d.weight) for d in r.decisions if d.weight is not None]
    pts.sort(key=lambda x: x[0])
    return pts


def experiment_variants(r: Report) -> list[str]:
    """Variant names, control first, in spec order (then any only seen in the series)."""
    names = [str(v.get("name")) for v in r.spec.get("variants") or []]
    control = next((str(v["name"]) for v in r.spec.get("variants") or [] if v.get("control")), None)
    for p in r.series:
        for v in p.get("variants") or []:
            if v.get("name") not in names:
                names.append(str(v.get("name")))
    if control in names:
        names.remove(control)
        names.insert(0, control)
    return names


def control_of(r: Report) -> str | None:
    return next((str(v["name"]) for v in r.spec.get("variants") or [] if v.get("control")), None)


def series_of(r: Report, variant: str, key: str) -> tuple[list[datetime], list[float | None]]:
    """One number of one experiment variant at every analysis (None where it was not measured)."""
    ts, ys = [], []
    for p in r.series:
        v = next((v for v in p.get("variants") or [] if v.get("name") == variant), None)
        ts.append(parse_time(p["time"]))
        ys.append(None if v is None or v.get(key) is None else float(v[key]))
    return ts, ys


def values_of(
    r: Report, kind: str, name: str, variant: str | None = None
) -> tuple[list[datetime], list[dict[str, Any] | None]]:
    """A guardrail's or comparison's entry at every analysis (None where absent)."""

    def match(m: dict[str, Any]) -> bool:
        return m.get("kind") == kind and m.get("name") == name and variant in (None, m.get("variant"))

    ts, vs = [], []
    for p in r.series:
        m = next((m for m in p.get("values") or [] if match(m)), None)
        ts.append(parse_time(p["time"]))
        vs.append(m)
    return ts, vs
