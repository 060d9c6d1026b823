"""The shared assessment (analysis/assess.py) through each engine's public ``reconcile``, for both kinds.

Failure limit, error limit (rollback and hold), ``noData`` (hold and fail) and the Healthy condition
are implemented once; every test here runs against a ModelRollout and a ModelExperiment alike. Then:
telemetry, the plugin and the report read a comparison with the same counts the same way for both.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from model_rollouts import telemetry
from model_rollouts.analysis import comparison
from model_rollouts.analysis.stats import ProportionData
from model_rollouts.api.common import Condition, dump, get_condition
from model_rollouts.api.experiment import ModelExperimentSpec, ModelExperimentStatus
from model_rollouts.api.rollout import ModelRolloutSpec, ModelRolloutStatus
from model_rollouts.cli import view
from model_rollouts.engine import experiment as xeng
from model_rollouts.engine import rollout as reng
from model_rollouts.engine.actions import Event
from model_rollouts.metrics.provider import Result
from model_rollouts.report import document
from model_rollouts.report.data import load

T0 = datetime(2026, 3, 1, tzinfo=UTC)
GUARD = {"query": "q", "max": 0.05, "failureLimit": 2}
#: What the candidate's guardrail measures in one analysis.
MEASURED = {
    "pass": Result("value", 0.01),
    "breach": Result("value", 0.2),
    "noData": Result("noData"),
    "nan": Result("nan", message="0/0"),
    "error": Result("error", message="timeout"),
}


class Kind:
    """What a test reads of either kind."""

    status: ModelRolloutStatus | ModelExperimentStatus
    events: list[str]
    #: The key of the candidate's guardrail in status.guardrailFailures.
    failure_key = "errors"

    @property
    def phase(self) -> str:
        return self.status.phase

    @property
    def running(self) -> bool:
        return self.status.phase in ("Progressing", "Running", "Paused")

    @property
    def failures(self) -> int:
        return self.status.guardrailFailures.get(self.failure_key, 0)

    @property
    def errors(self) -> int:
        return self.status.consecutiveErrors

    @property
    def message(self) -> str:
        return self.status.message or ""

    def healthy(self) -> Condition:
        c = get_condition(self.status.conditions, "Healthy")
        assert c is not None
        return c

    def analyse(self, outcome: str) -> None:
        """One analysis in which the candidate's guardrail measures ``outcome`` (see MEASURED)."""
        raise NotImplementedError

    @property
    def candidate_weight(self) -> int:
        raise NotImplementedError


class Rollout(Kind):
    """A rollout at weight 20 before a step to 100: every tick is one analysis of the candidate."""

    kind = "rollout"

    def __init__(self, **analysis: Any) -> None:
        self.spec = ModelRolloutSpec.model_validate(
            {
                "stable": {"service": "v1"},
                "candidate": {"service": "v2"},
                "trafficRouting": {"gatewayAPI": {"httpRoute": "r"}},
                "steps": [{"setWeight": 20}, {"setWeight": 100}],
                "progressDeadline": "1h",
                "analysis": {
                    "interval": "10s",
                    "prometheus": {"address": "http://prom:9090"},
                    "guardrails": [{"name": "errors", **GUARD}],
                    **analysis,
                },
            }
        )
        self.status, self.now, self.events = ModelRolloutStatus(), T0, list[str]()
        self._reconcile(None)  # started: weight 20
        assert self.status.weight == 20

    def _reconcile(self, obs: reng.Observations | None) -> None:
        d = reng.reconcile(self.spec, self.status, now=self.now, generation=1, observations=obs)
        self.status = d.status
        self.events += [a.reason for a in d.actions]
        self.now += timedelta(seconds=10)

    def analyse(self, outcome: str) -> None:
        assert reng.needs_measurement(self.spec, self.status, self.now)
        self._reconcile(reng.Observations(guardrails={"errors": MEASURED[outcome]}))

    @property
    def candidate_weight(self) -> int:
        return self.status.weight


class Experiment(Kind):
    """A two-variant experiment far from its decision: every tick is one analysis of both variants,
    the control always measuring well, the variant ``v1`` as the test says."""

    kind = "experiment"
    failure_key = "v1/errors"

    def __init__(self, **analysis: Any) -> None:
        self.spec = ModelExperimentSpec.model_validate(
            {
                "variants": [
                    {"name": "control", "service": "svc-a", "control": True},
                    {"name": "v1", "service": "svc-b"},
                ],
                "trafficRouting": {"gatewayAPI": {"httpRoute": "model"}},
                "primaryMetric": {"name": "ctr", "type": "proportion", "successes": "s", "trials": "t"},
                "guardrails": [{"name": "errors", **GUARD}],
                "successCriteria": {"minimumDetectableEffect": 0.05, "alpha": 0.05},
                "stoppingRules": {"minSamplesPerVariant": 10000},
                "analysis": {
                    "interval": "10s",
                    "window": "30s",
                    "prometheus": {"address": "http://prom:9090"},
                    **analysis,
                },
            }
        )
        self.status, self.now, self.events = ModelExperimentStatus(), T0, list[str]()
        self._reconcile(None)  # started: 50/50
        assert self.candidate_weight == 50

    def _reconcile(self, obs: xeng.Observations | None) -> None:
        d = xeng.reconcile(self.spec, self.status, now=self.now, generation=1, observations=obs)
        self.status = d.status
        self.events += [a.reason for a in d.actions if isinstance(a, Event)]
        self.now += timedelta(seconds=10)

    def analyse(self, outcome: str) -> None:
        assert xeng.analysis_due(self.spec, self.status, self.now)
        counts = ProportionData(5, 10)  # far below any decision
        guard = {"control": MEASURED["pass"], "v1": MEASURED[outcome]}
        variants = {
            n: xeng.VariantObservation(primary=counts, guardrails={"errors": r}) for n, r in guard.items()
        }
        self._reconcile(xeng.Observations(variants=variants))

    @property
    def candidate_weight(self) -> int:
        return next(v.weight for v in self.status.variants if v.name == "v1")


KINDS = [pytest.param(Rollout, id="rollout"), pytest.param(Experiment, id="experiment")]


@pytest.mark.parametrize("kind", KINDS)
def test_failure_limit_counts_consecutive_breaches_and_then_rolls_back(kind: type[Kind]) -> None:
    k = kind()
    k.analyse("breach")
    assert k.running and k.failures == 1
    k.analyse("pass")  # a pass resets the count
    assert k.running and k.failures == 0
    k.analyse("breach")
    k.analyse("noData")  # no data neither counts nor resets
    assert k.running and k.failures == 1
    k.analyse("breach")  # the second consecutive breach reaches failureLimit 2
    assert k.phase == "RolledBack" and k.candidate_weight == 0 and k.failures == 2
    assert k.healthy().status == "False" and k.healthy().reason == "GuardrailFailed"
    assert any("failureLimit 2" in h.message for h in k.status.history)  # why, in the history


@pytest.mark.parametrize("kind", KINDS)
def test_error_limit_rollback_after_consecutive_failed_measurements(kind: type[Kind]) -> None:
    k = kind(errorLimit=3)
    k.analyse("error")
    k.analyse("error")
    assert k.running and k.errors == 2
    k.analyse("pass")  # an outage shorter than the limit: reset, nothing else
    assert k.running and k.errors == 0 and "ErrorLimitReached" not in k.events
    for _ in range(3):
        k.analyse("error")
    assert k.phase == "RolledBack" and k.candidate_weight == 0
    assert "ErrorLimitReached" in k.events
    assert k.healthy().status == "False" and k.healthy().reason == "ErrorLimitReached"
    assert "analysis.errorLimit 3" in k.healthy().message


@pytest.mark.parametrize("kind", KINDS)
def test_error_limit_hold_keeps_the_weights_and_warns_once(kind: type[Kind]) -> None:
    k = kind(errorLimit=2, onErrorLimit="hold")
    before = k.candidate_weight
    for _ in range(5):
        k.analyse("error")
    assert k.running and k.candidate_weight == before and k.errors == 5
    assert k.events.count("ErrorLimitReached") == 1
    h = k.healthy()
    assert (h.status, h.reason) == ("False", "ErrorLimitReached") and "onErrorLimit hold" in h.message
    k.analyse("pass")  # measurements are back: the count resets and health returns
    assert k.errors == 0 and k.healthy().reason == "AnalysisPassing"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("outcome", "reason"), [("noData", "NoData"), ("nan", "NoData"), ("error", "MeasurementError")]
)
def test_missing_data_holds_under_no_data_hold(kind: type[Kind], outcome: str, reason: str) -> None:
    k = kind(errorLimit=50)
    before = k.candidate_weight
    for _ in range(4):
        k.analyse(outcome)
    # nothing advances (the rollout would be at 100 and promoted otherwise) and nothing is decided
    assert k.running and k.candidate_weight == before and "holding" in k.message
    h = k.healthy()
    assert (h.status, h.reason) == ("Unknown", reason) and "errors" in h.message


@pytest.mark.parametrize("kind", KINDS)
def test_no_data_under_no_data_fail_rolls_back_at_once(kind: type[Kind]) -> None:
    k = kind(noData="fail")
    k.analyse("noData")
    assert k.phase == "RolledBack" and k.candidate_weight == 0
    assert k.healthy().status == "False"
    assert any("noData is fail" in h.message for h in k.status.history)


@pytest.mark.parametrize("kind", KINDS)
def test_no_data_fail_policy_never_fails_on_a_failed_measurement(kind: type[Kind]) -> None:
    k = kind(noData="fail", errorLimit=5)
    k.analyse("error")
    assert k.running and k.healthy().reason == "MeasurementError"


@pytest.mark.parametrize("kind", KINDS)
def test_healthy_is_true_when_every_measurement_passes(kind: type[Kind]) -> None:
    k = kind()
    k.analyse("pass")
    h = k.healthy()
    assert (h.status, h.reason) == ("True", "AnalysisPassing") and "errors = 0.01" in h.message


# --------------------------------------------------------------------------- comparisons, either kind

STABLE, CANDIDATE = ProportionData(300, 1000), ProportionData(90, 250)


def _rollout_object() -> dict[str, Any]:
    spec = ModelRolloutSpec.model_validate(
        {
            "stable": {"service": "v1"},
            "candidate": {"service": "v2"},
            "trafficRouting": {"gatewayAPI": {"httpRoute": "r"}},
            "steps": [{"setWeight": 20}, {"pause": {}}],
            "analysis": {
                "interval": "10s",
                "prometheus": {"address": "http://prom:9090"},
                "comparisons": [{"name": "ctr", "successes": "s", "trials": "t", "margin": 0.05}],
            },
        }
    )
    st = reng.reconcile(spec, ModelRolloutStatus(), now=T0, generation=1).status
    obs = reng.Observations(comparisons={"ctr": reng.ComparisonData(STABLE, CANDIDATE)})
    st = reng.reconcile(spec, st, now=T0 + timedelta(seconds=10), generation=1, observations=obs).status
    return _object("ModelRollout", spec, st)


def _experiment_object() -> dict[str, Any]:
    spec = ModelExperimentSpec.model_validate(
        {
            "variants": [
                {"name": "control", "service": "a", "control": True},
                {"name": "v1", "service": "b"},
            ],
            "trafficRouting": {"gatewayAPI": {"httpRoute": "model"}},
            "primaryMetric": {"name": "ctr", "type": "proportion", "successes": "s", "trials": "t"},
            "successCriteria": {"minimumDetectableEffect": 0.05, "alpha": 0.05},
            "stoppingRules": {"minSamplesPerVariant": 100000},
            "analysis": {"interval": "10s", "window": "30s", "prometheus": {"address": "http://prom:9090"}},
        }
    )
    st = xeng.reconcile(spec, ModelExperimentStatus(), now=T0, generation=1).status
    variants = {
        "control": xeng.VariantObservation(primary=STABLE),
        "v1": xeng.VariantObservation(primary=CANDIDATE),
    }
    obs = xeng.Observations(variants=variants)
    st = xeng.reconcile(spec, st, now=T0 + timedelta(seconds=10), generation=1, observations=obs).status
    return _object("ModelExperiment", spec, st)


def _object(kind: str, spec: Any, status: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "metadata": {"name": "a", "namespace": "ml"},
        "spec": dump(spec),
        "status": dump(status),
    }


def _telemetry(obj: dict[str, Any]) -> dict[str, float]:
    values = telemetry.analysis_values(obj["kind"], obj["status"], obj["spec"])
    base = comparison.baseline_name(obj["spec"])
    cand = next(m["variant"] for m in obj["status"]["lastAnalysis"] if m["kind"] == "comparison")
    return {
        "baseline": values[telemetry.ESTIMATE][("ctr", base)],
        "candidate": values[telemetry.ESTIMATE][("ctr", cand)],
        "baselineN": values[telemetry.SAMPLES][("ctr", base)],
        "candidateN": values[telemetry.SAMPLES][("ctr", cand)],
        "difference": values[telemetry.DIFFERENCE][("ctr", cand)],
    }


def _view(obj: dict[str, Any]) -> dict[str, float]:
    v = view.rollout_view(obj, T0) if obj["kind"] == "ModelRollout" else view.experiment_view(obj)
    (c,) = v["comparisons"]
    return {k: c[k] for k in ("baseline", "candidate", "baselineN", "candidateN", "difference")}


def _report(obj: dict[str, Any]) -> list[str]:
    head, *rows = document.comparison_rows(load(obj))
    (row,) = rows
    return [
        row[head.index(col)] for col in ("candidate", "baseline", "n candidate", "n baseline", "difference")
    ]


def test_telemetry_view_and_report_read_a_comparison_the_same_for_both_kinds() -> None:
    rollout, experiment = _rollout_object(), _experiment_object()
    expected = {"baseline": 0.3, "candidate": 0.36, "baselineN": 1000.0, "candidateN": 250.0}
    for read in (_telemetry, _view):
        r, x = read(rollout), read(experiment)
        assert r == pytest.approx(x), read.__name__
        assert {k: r[k] for k in expected} == pytest.approx(expected)
        assert r["difference"] == pytest.approx(0.06)
    assert _report(rollout) == _report(experiment)


def test_new_status_writes_the_shared_keys_and_still_the_per_kind_ones() -> None:
    for obj, names in (
        (_rollout_object(), comparison.ROLLOUT_NAMES),
        (_experiment_object(), comparison.EXPERIMENT_NAMES),
    ):
        (m,) = [m for m in obj["status"]["lastAnalysis"] if m["kind"] == "comparison"]
        base, cand = names
        d = m["details"]
        assert d["baseline"] == d[base] and d["baselineN"] == d[f"{base}N"]
        assert d["candidate"] == d[cand] and d["candidateN"] == d[f"{cand}N"]


@pytest.mark.parametrize(
    "legacy",
    [
        {"stable": 0.3, "candidate": 0.36, "stableN": 1000, "candidateN": 250, "difference": 0.06},
        {"control": 0.3, "variant": 0.36, "controlN": 1000, "variantN": 250, "difference": 0.06},
    ],
    ids=["rollout", "experiment"],
)
def test_the_accessor_reads_details_written_by_the_previous_version(legacy: dict[str, float]) -> None:
    c = comparison.numbers(legacy)
    assert (c["baseline"], c["candidate"], c["baselineN"], c["candidateN"]) == (0.3, 0.36, 1000, 250)
    assert c["difference"] == 0.06 and c["ciLow"] is None
