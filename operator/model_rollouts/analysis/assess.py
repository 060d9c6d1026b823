"""One analysis's findings -> what the engine must do, the same rules for both kinds.

- Failure limit: a guardrail breach adds one to its consecutive-breach counter, a pass resets it, no
  data or an error leaves it; a counter at the guardrail's ``failureLimit`` fails its arm.
- ``noData`` has one meaning everywhere: a measurement with no data or NaN is never a pass and never
  zero. Under ``noData: hold`` it holds (nothing advances, promotes or is decided); under
  ``noData: fail`` it fails its arm at once.
- Error limit: a failed measurement (provider unreachable, timeout, bad query) always holds and counts
  toward ``errorLimit`` consecutive analyses; it never fails by itself. Reaching the limit applies
  ``onErrorLimit`` (rollback, or hold with ``Healthy=False``).
- A fresh comparison that fails (the candidate is worse) is reported; the engine decides what it means.
- A model judge (prediction shift, calibration): a fresh fail is reported (``stopped``) like a failing
  comparison; a fresh inconclusive one (too few samples, not enough evidence yet) holds, like missing
  data: nothing advances, promotes or is decided on it, and it is never a pass.
- Healthy: ErrorLimitReached (False) > an engine-specific failing reason (False) > a failed arm or,
  where ``breach_unhealthy``, any breach (False, GuardrailBreached) > missing data (Unknown,
  MeasurementError or NoData) > AnalysisPassing (True).

The two kinds differ only where their designs do, and that is declared in :class:`Policy`: a rollout's
breach below ``failureLimit`` holds its steps but keeps Healthy True until the limit; an experiment's
breach does not hold the decision but makes Healthy False at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from model_rollouts.api.common import AnalysisBase, Guardrail, Measurement

HealthStatus = Literal["True", "False", "Unknown"]
#: The measurement kinds of the model judges (analysis/model_judges.py).
MODEL_JUDGE_KINDS = ("predictionShift", "calibration")


@dataclass(frozen=True)
class Health:
    status: HealthStatus
    reason: str
    message: str


@dataclass(frozen=True)
class Policy:
    analysis: AnalysisBase
    guardrails: Sequence[Guardrail]
    #: Failure counters keyed ``arm/guardrail`` (several measured arms) or ``guardrail`` (one).
    per_arm: bool
    #: A breach below failureLimit holds progress (rollout) or not (experiment).
    breach_holds: bool
    #: A breach below failureLimit makes Healthy False (experiment) or not yet (rollout).
    breach_unhealthy: bool

    def key(self, arm: str, guardrail: str) -> str:
        return f"{arm}/{guardrail}" if self.per_arm else guardrail


@dataclass(frozen=True)
class Breach:
    arm: str
    measurement: Measurement
    count: int
    limit: int

    @property
    def at_limit(self) -> bool:
        return self.count >= self.limit

    def text(self) -> str:
        if self.at_limit:
            reached = f"{self.count} consecutive breach(es) reached failureLimit {self.limit}"
            return f"{self.measurement.message}; {reached}"
        return f"{self.measurement.message} ({self.count} of failureLimit {self.limit})"


@dataclass
class Assessment:
    policy: Policy
    #: The measurements of this analysis, per arm (carried ones included, never counted).
    by_arm: Mapping[str, Sequence[Measurement]]
    failures: dict[str, int]
    consecutive_errors: int
    breaches: list[Breach] = field(default_factory=list)
    #: Per arm, its first no-data measurement when ``noData: fail``.
    no_data_fail: dict[str, Measurement] = field(default_factory=dict)
    #: The first fresh comparison that failed.
    worse: Measurement | None = None
    #: The first fresh model judge (prediction shift, calibration) that failed.
    stopped: Measurement | None = None

    @property
    def fresh(self) -> list[Measurement]:
        return [m for ms in self.by_arm.values() for m in ms if not m.carried]

    def missing(self, arms: Sequence[str] | None = None) -> list[Measurement]:
        """No data, NaN or a failed measurement (of ``arms``, default all)."""
        return [
            m
            for arm, ms in self.by_arm.items()
            if arms is None or arm in arms
            for m in ms
            if not m.carried and m.verdict in ("noData", "error")
        ]

    def undecided_judges(self, arms: Sequence[str] | None = None) -> list[Measurement]:
        """Fresh model-judge measurements that are inconclusive (of ``arms``, default all): they hold."""
        return [
            m
            for arm, ms in self.by_arm.items()
            if arms is None or arm in arms
            for m in ms
            if not m.carried and m.kind in MODEL_JUDGE_KINDS and m.verdict == "inconclusive"
        ]

    @property
    def error(self) -> bool:
        return any(m.verdict == "error" for m in self.fresh)

    def breached(self) -> list[Breach]:
        """The guardrails that breached in this analysis."""
        return [b for b in self.breaches if b.measurement.verdict == "fail"]

    def at_limit(self, arm: str) -> list[Breach]:
        return [b for b in self.breaches if b.arm == arm and b.at_limit]

    def failed(self) -> dict[str, list[str]]:
        """Arms that fail now, with why: a guardrail at failureLimit, or no data under noData: fail."""
        out: dict[str, list[str]] = {}
        for arm in self.by_arm:
            why = [b.text() for b in self.at_limit(arm)]
            if arm in self.no_data_fail:
                why.append(f"{self.no_data_fail[arm].message} (analysis.noData is fail)")
            if why:
                out[arm] = why
        return out

    # -- error limit

    @property
    def error_limit_reached(self) -> bool:
        return self.consecutive_errors >= self.policy.analysis.errorLimit

    @property
    def error_limit_first(self) -> bool:
        """Reached at this analysis (warn once, not at every analysis after it)."""
        return self.consecutive_errors == self.policy.analysis.errorLimit

    def error_limit_message(self) -> str:
        errors = "; ".join(m.message for m in self.fresh if m.verdict == "error")
        return (
            f"{self.consecutive_errors} consecutive analyses with failed measurements reached "
            f"analysis.errorLimit {self.policy.analysis.errorLimit}: {errors}"
        )

    def error_limit_hold_message(self) -> str:
        return f"{self.error_limit_message()}; holding (onErrorLimit hold)"

    # -- holds and health

    def hold_reasons(self, arms: Sequence[str] | None = None) -> list[str]:
        """Why nothing may advance, promote or be decided on this analysis (empty: nothing holds)."""
        out = [m.message for m in self.missing(arms)]
        out += [m.message for m in self.undecided_judges(arms)]
        if self.policy.breach_holds:
            out += [b.text() for b in self.breached() if arms is None or b.arm in arms]
        return out

    def health(
        self, failed: Mapping[str, list[str]] | None = None, failing: tuple[str, str] | None = None
    ) -> Health:
        """The Healthy condition. ``failed``: failing arms (default :meth:`failed`); ``failing``: an
        engine's own (reason, message) for a failure it tolerates (e.g. a failing control it keeps)."""
        failed = self.failed() if failed is None else failed
        if self.error_limit_reached:
            return Health("False", "ErrorLimitReached", self.error_limit_hold_message())
        if failing is not None:
            return Health("False", *failing)
        breaches = [
            b.measurement.message for b in self.breached() if self.policy.breach_unhealthy or b.at_limit
        ]
        if breaches or failed:
            why = "; ".join(f"{n}: {'; '.join(w)}" for n, w in failed.items())
            return Health("False", "GuardrailBreached", "; ".join(breaches) or why)
        missing = self.missing()
        if missing:
            reason = "MeasurementError" if self.error else "NoData"
            return Health("Unknown", reason, "; ".join(m.message for m in missing))
        passing = "; ".join(m.message for m in self.fresh) or "no guardrails configured"
        return Health("True", "AnalysisPassing", passing)


def _counted(previous: Mapping[str, int], key: str, verdict: str) -> int:
    if verdict == "fail":
        return previous.get(key, 0) + 1
    return 0 if verdict == "pass" else previous.get(key, 0)


def assess(
    policy: Policy,
    by_arm: Mapping[str, Sequence[Measurement]],
    failures: Mapping[str, int],
    consecutive_errors: int,
) -> Assessment:
    """Count breaches and errors, and find what fails, for one analysis of the arms in ``by_arm``."""
    a = Assessment(policy, by_arm, dict(failures), consecutive_errors)
    limits = {g.name: g.failureLimit for g in policy.guardrails}
    for arm, ms in by_arm.items():
        for m in ms:
            if m.kind != "guardrail" or m.carried:
                continue
            key = policy.key(arm, m.name)
            a.failures[key] = _counted(a.failures, key, m.verdict)
            b = Breach(arm, m, a.failures[key], limits.get(m.name, 1))
            if m.verdict == "fail" or b.at_limit:  # a counter at the limit fails even without new data
                a.breaches.append(b)
        no_data = next((m for m in ms if not m.carried and m.verdict == "noData"), None)
        if no_data is not None and policy.analysis.noData == "fail":
            a.no_data_fail[arm] = no_data
    a.worse = next((m for m in a.fresh if m.kind == "comparison" and m.verdict == "fail"), None)
    a.stopped = next((m for m in a.fresh if m.kind in MODEL_JUDGE_KINDS and m.verdict == "fail"), None)
    a.consecutive_errors = consecutive_errors + 1 if a.error else 0
    return a
