"""Hypothesis over schema-valid rollout specs and observation sequences: the engine never crashes and
its promises hold whatever a tenant writes and whatever Prometheus answers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_rollouts.analysis.stats import ProportionData
from model_rollouts.api.rollout import (
    ANNOTATION_ABORT,
    ANNOTATION_RESUME,
    ModelRolloutSpec,
    ModelRolloutStatus,
)
from model_rollouts.engine import rollout as eng
from model_rollouts.metrics.provider import Result

T0 = datetime(2026, 1, 1, tzinfo=UTC)
HISTORY_MAX = 30

step = st.one_of(
    st.builds(lambda w: {"setWeight": w}, st.integers(0, 100)),
    st.just({"pause": {"duration": "20s"}}),
    st.just({"pause": {}}),
    st.just({"analysis": {"duration": "30s"}}),
)


@st.composite
def specs(draw: st.DrawFn) -> ModelRolloutSpec:
    analysis: dict[str, Any] = {
        "interval": "10s",
        "prometheus": {"address": "http://prom:9090"},
        "noData": draw(st.sampled_from(["hold", "fail"])),
        "errorLimit": draw(st.integers(1, 5)),
        "onErrorLimit": draw(st.sampled_from(["rollback", "hold"])),
        "onInconclusive": draw(st.sampled_from(["rollback", "hold", "promote"])),
        "guardrails": [
            {"name": "errors", "query": "q", "max": 0.05, "failureLimit": draw(st.integers(1, 3))}
        ],
    }
    if draw(st.booleans()):
        analysis["comparisons"] = [
            {"name": "ctr", "successes": "s", "trials": "t", "margin": 0.05, "advisory": draw(st.booleans())}
        ]
    extra: dict[str, Any] = {}
    if draw(st.booleans()):
        extra["maxWeightStep"] = draw(st.integers(1, 100))
    if draw(st.booleans()):
        extra["progressDeadline"] = "2m"
    return ModelRolloutSpec.model_validate(
        {
            "stable": {"service": "v1"},
            "candidate": {"service": "v2"},
            "trafficRouting": {"gatewayAPI": {"httpRoute": "r"}},
            "steps": draw(st.lists(step, min_size=1, max_size=8)),
            "analysis": analysis,
            **extra,
        }
    )


guardrail_result = st.one_of(
    st.builds(lambda v: Result("value", v), st.floats(0, 0.04)),
    st.builds(lambda v: Result("value", v), st.floats(0.06, 1.0)),
    st.just(Result("noData")),
    st.just(Result("nan")),
    st.just(Result("error", message="query failed: ConnectionError")),
)
tick = st.tuples(
    guardrail_result,
    st.one_of(
        st.none(),
        st.tuples(st.integers(0, 500), st.integers(0, 500), st.integers(0, 500), st.integers(0, 500)),
    ),
    st.sampled_from([None, None, None, "resume", "abort"]),
    st.sampled_from([5, 10, 10, 30]),
)


def comparison(counts: tuple[int, int, int, int] | None) -> dict[str, eng.ComparisonData]:
    if counts is None:
        return {"ctr": eng.ComparisonData(problem=Result("noData"))}
    a, b, c, d = counts
    return {
        "ctr": eng.ComparisonData(
            stable=ProportionData(min(a, b), max(a, b)), candidate=ProportionData(min(c, d), max(c, d))
        )
    }


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs(), ticks=st.lists(tick, min_size=1, max_size=40))
def test_the_rollout_engine_keeps_its_promises_on_any_input(spec: ModelRolloutSpec, ticks: list[Any]) -> None:
    status, now = ModelRolloutStatus(), T0
    annotations: dict[str, str] = {}
    rolled_back = False
    breaches = 0  # consecutive breaching measurements of the guardrail
    for n, (guard, counts, action, advance) in enumerate(ticks):
        if action == "resume":
            annotations[ANNOTATION_RESUME] = str(n)
        elif action == "abort":
            annotations[ANNOTATION_ABORT] = str(n)
        obs = None
        if eng.needs_measurement(spec, status, now):
            obs = eng.Observations(guardrails={"errors": guard}, comparisons=comparison(counts))
        d = eng.reconcile(
            spec, status, now=now, generation=1, annotations=dict(annotations), observations=obs
        )
        status = d.status
        assert 0 <= status.weight <= 100
        assert len(status.history) <= HISTORY_MAX
        if rolled_back:
            assert status.phase == "RolledBack" and status.weight == 0, "a rolled-back candidate got traffic"
        rolled_back = rolled_back or status.phase == "RolledBack"
        if obs is not None:
            breached = guard.ok and guard.value is not None and guard.value > 0.05
            breaches = breaches + 1 if breached else 0
        if status.phase == "Promoted" and obs is not None:
            assert breaches == 0, "promoted on a breaching guardrail measurement"
        if status.phase == "Promoted" and spec.analysis.onInconclusive != "promote":
            for c in spec.analysis.comparisons:
                if not c.advisory:
                    last = [m for m in status.lastAnalysis if m.name == c.name]
                    assert last and last[-1].verdict == "pass", ("promoted without proof", last)
        now += timedelta(seconds=advance)


def test_a_breach_measured_at_the_last_step_blocks_promotion() -> None:
    spec = ModelRolloutSpec.model_validate(
        {
            "stable": {"service": "v1"},
            "candidate": {"service": "v2"},
            "trafficRouting": {"gatewayAPI": {"httpRoute": "r"}},
            "steps": [{"pause": {"duration": "20s"}}, {"setWeight": 1}],
            "analysis": {
                "interval": "10s",
                "prometheus": {"address": "http://prom:9090"},
                "guardrails": [{"name": "errors", "query": "q", "max": 0.05, "failureLimit": 2}],
            },
        }
    )
    status, now = ModelRolloutStatus(), T0
    seq = [
        (Result("noData"), 30),
        (Result("nan"), 10),
        (Result("value", 0.0004), 10),
        (Result("value", 0.16), 10),
    ]
    for r, advance in seq:
        obs = eng.Observations(guardrails={"errors": r}) if eng.needs_measurement(spec, status, now) else None
        status = eng.reconcile(spec, status, now=now, generation=1, observations=obs).status
        now += timedelta(seconds=advance)
    assert status.phase != "Promoted", [m.message for m in status.lastAnalysis]


@st.composite
def experiment_specs(draw: st.DrawFn) -> Any:
    from model_rollouts.api.experiment import ModelExperimentSpec

    n = draw(st.integers(2, 4))
    variants = [{"name": "control", "service": "svc-0", "control": True}] + [
        {"name": f"v{i}", "service": f"svc-{i}"} for i in range(1, n)
    ]
    allocation: dict[str, Any] = {"strategy": draw(st.sampled_from(["fixed", "thompson"]))}
    return ModelExperimentSpec.model_validate(
        {
            "variants": variants,
            "trafficRouting": {"gatewayAPI": {"httpRoute": "model"}},
            "allocation": allocation,
            "primaryMetric": {"name": "ctr", "type": "proportion", "successes": "s", "trials": "t"},
            "guardrails": [
                {"name": "errors", "query": "q", "max": 0.05, "failureLimit": draw(st.integers(1, 3))}
            ],
            "successCriteria": {
                "minimumDetectableEffect": 0.05,
                "method": draw(st.sampled_from(["sequential", "fixedHorizon", "bayesian"])),
            },
            "stoppingRules": {"minSamplesPerVariant": draw(st.sampled_from([10, 100, 1000]))},
            "analysis": {"interval": "5s", "window": "30s", "prometheus": {"address": "http://prom:9090"}},
        }
    )


variant_tick = st.tuples(
    st.integers(0, 300),  # new trials
    st.floats(0.0, 1.0),  # success share of them
    guardrail_result,
    st.booleans(),  # a measurement problem instead of counts
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=experiment_specs(), ticks=st.lists(st.lists(variant_tick, min_size=4, max_size=4), max_size=30))
def test_the_experiment_engine_keeps_its_promises_on_any_input(spec: Any, ticks: list[Any]) -> None:
    from model_rollouts.api.experiment import ModelExperimentStatus
    from model_rollouts.engine import experiment as xeng

    status, now = ModelExperimentStatus(), T0
    counts = {v.name: [0.0, 0.0] for v in spec.variants}
    dropped: set[str] = set()
    rolled_back = False
    for per_variant in [[(0, 0.0, Result("value", 0.0), False)] * 4, *ticks]:
        obs = None
        if xeng.analysis_due(spec, status, now):
            out = {}
            for v, (trials, share, guard, problem) in zip(spec.variants, per_variant, strict=False):
                counts[v.name][0] += trials
                counts[v.name][1] += int(trials * share)
                data = ProportionData(counts[v.name][1], counts[v.name][0])
                out[v.name] = xeng.VariantObservation(
                    primary=None if problem else data,
                    problem=Result("noData") if problem else None,
                    guardrails={"errors": guard},
                )
            obs = xeng.Observations(variants=out)
        status = xeng.reconcile(spec, status, now=now, generation=1, observations=obs).status
        weights = xeng.route_weights(spec, status)
        if weights is not None:
            assert all(0 <= w <= 100 for w in weights.values()) and sum(weights.values()) == 100, weights
        assert len(status.history) <= HISTORY_MAX
        by_name = {v.name: v for v in status.variants}
        for name in dropped:
            assert by_name[name].weight == 0, f"dropped variant {name} got traffic again"
        dropped |= {v.name for v in status.variants if not v.active and v.name != "control"}
        if rolled_back:
            assert status.phase == "RolledBack" and by_name["control"].weight == 100
        rolled_back = rolled_back or status.phase == "RolledBack"
        now += timedelta(seconds=5)
