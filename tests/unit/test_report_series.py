"""status.series: one bounded point per analysis, with what the decision report plots."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from model_rollouts.analysis.stats import ProportionData
from model_rollouts.api.common import dump
from model_rollouts.api.experiment import ModelExperimentSpec, ModelExperimentStatus
from model_rollouts.api.rollout import ModelRolloutSpec, ModelRolloutStatus, RolloutSeriesPoint
from model_rollouts.engine import experiment as xeng
from model_rollouts.engine import rollout as eng
from model_rollouts.engine import series
from model_rollouts.metrics.provider import Result

T0 = datetime(2026, 3, 1, tzinfo=UTC)
ETCD_LIMIT = 1536 * 1024


def rollout_spec(**analysis: Any) -> ModelRolloutSpec:
    return ModelRolloutSpec.model_validate(
        {
            "stable": {"service": "v1"},
            "candidate": {"service": "v2"},
            "trafficRouting": {"gatewayAPI": {"httpRoute": "r"}},
            "steps": [{"setWeight": 20}, {"analysis": {"duration": "30s"}}, {"setWeight": 50}],
            "analysis": {
                "interval": "10s",
                "prometheus": {"address": "http://prom:9090"},
                "guardrails": [{"name": "errors", "query": "q", "max": 0.05, "failureLimit": 2}],
                "comparisons": [{"name": "accuracy", "successes": "s", "trials": "t", "margin": 0.02}],
                **analysis,
            },
        }
    )


def rollout_obs(n: int, error_rate: float, stable_p: float = 0.9, cand_p: float = 0.9) -> eng.Observations:
    return eng.Observations(
        guardrails={"errors": Result("value", error_rate)},
        comparisons={
            "accuracy": eng.ComparisonData(
                stable=ProportionData(stable_p * n, n), candidate=ProportionData(cand_p * n, n)
            )
        },
    )


def drive_rollout(
    spec: ModelRolloutSpec, errors: list[float], n_step: int = 4000, ticks: int = 200
) -> tuple[ModelRolloutStatus, list[tuple[datetime, int, float]]]:
    """One reconcile per interval; returns the status and (time, weight after, error rate) per analysis."""
    status, now, seen = ModelRolloutStatus(), T0, []
    i = 0
    for _ in range(ticks):
        obs = None
        if eng.needs_measurement(spec, status, now):
            rate = errors[min(i, len(errors) - 1)]
            obs = rollout_obs(n_step * (i + 1), rate)
            i += 1
        status = eng.reconcile(spec, status, now=now, generation=1, observations=obs).status
        if obs is not None and status.lastAnalysisTime == now:
            seen.append((now, status.weight, obs.guardrails["errors"].value or 0.0))
        if status.phase in ("Promoted", "RolledBack"):
            break
        now += timedelta(seconds=10)
    return status, seen


def test_rollout_series_has_one_point_per_analysis_with_weight_guardrail_and_interval() -> None:
    status, seen = drive_rollout(rollout_spec(), [0.01, 0.02, 0.015])
    assert status.phase == "Promoted"
    assert [(p.time, p.weight) for p in status.series] == [(t, w) for t, w, _ in seen]
    assert status.series[-1].weight == 100 and status.series[-1].phase == "Promoted"
    for p, (_, _, rate) in zip(status.series, seen, strict=True):
        g = next(v for v in p.values if v.kind == "guardrail")
        assert (g.name, g.variant, g.verdict, g.value) == ("errors", "candidate", "pass", rate)
    measured = [v for p in status.series for v in p.values if v.kind == "comparison"]
    assert measured, "comparisons were measured below weight 100"
    for c in measured:
        assert c.ciLow is not None and c.ciHigh is not None and c.value is not None
        assert c.ciLow <= c.value <= c.ciHigh
    # The interval narrows as counts grow (a confidence sequence on more data).
    widths = [c.ciHigh - c.ciLow for c in measured if c.ciHigh is not None and c.ciLow is not None]
    assert widths[-1] < widths[0]


def test_rollout_series_ends_with_the_breach_that_rolled_back_at_weight_zero() -> None:
    status, seen = drive_rollout(rollout_spec(), [0.01, 0.2, 0.3])
    assert status.phase == "RolledBack"
    last = status.series[-1]
    assert last.weight == 0 and last.phase == "RolledBack"
    g = next(v for v in last.values if v.kind == "guardrail")
    assert g.verdict == "fail" and g.value == 0.3
    assert len(status.series) == len(seen)


def test_series_keeps_the_last_5_points_oldest_dropped() -> None:
    pts: list[Any] = []
    for i in range(300):
        point = RolloutSeriesPoint(time=T0 + timedelta(seconds=i), weight=i % 100, step=0, phase="P")
        series.append(pts, point)
    assert len(pts) == series.SERIES_LIMIT == 5
    assert pts[0].time == T0 + timedelta(seconds=300 - 5) and pts[-1].time == T0 + timedelta(seconds=299)


def experiment_spec(n_variants: int, n_guardrails: int, min_samples: int = 100000) -> ModelExperimentSpec:
    return ModelExperimentSpec.model_validate(
        {
            "variants": [{"name": "control", "service": "svc-0", "control": True}]
            + [{"name": f"variant-{i}", "service": f"svc-{i}"} for i in range(1, n_variants)],
            "trafficRouting": {"gatewayAPI": {"httpRoute": "model"}},
            "primaryMetric": {"name": "ctr", "type": "proportion", "successes": "s", "trials": "t"},
            "guardrails": [
                {"name": f"guardrail-number-{g}", "query": "q", "max": 0.5} for g in range(n_guardrails)
            ],
            "successCriteria": {"minimumDetectableEffect": 0.05, "alpha": 0.05},
            "stoppingRules": {"minSamplesPerVariant": min_samples, "maxSamplesPerVariant": 10**9},
            "analysis": {"interval": "5s", "prometheus": {"address": "http://prom:9090"}},
        }
    )


def experiment_obs(spec: ModelExperimentSpec, i: int, rates: dict[str, float]) -> xeng.Observations:
    n = 300.0 * (i + 1)
    return xeng.Observations(
        variants={
            v.name: xeng.VariantObservation(
                primary=ProportionData(round(rates.get(v.name, 0.1) * n), n),
                guardrails={g.name: Result("value", 0.0123456789 + i * 1e-7) for g in spec.guardrails},
            )
            for v in spec.variants
        }
    )


def drive_experiment(spec: ModelExperimentSpec, ticks: int, rates: dict[str, float]) -> ModelExperimentStatus:
    status, now = ModelExperimentStatus(), T0
    for i in range(ticks):
        status = xeng.reconcile(
            spec, status, now=now, generation=1, observations=experiment_obs(spec, i, rates) if i else None
        ).status
        now += timedelta(seconds=5)
    return status


def test_experiment_points_carry_each_variants_numbers_srm_and_guardrails() -> None:
    spec = experiment_spec(3, 1, min_samples=1000)
    status = drive_experiment(spec, 12, {"control": 0.10, "variant-1": 0.11, "variant-2": 0.10})
    assert status.phase == "Running"
    assert len(status.series) == series.SERIES_LIMIT  # the window: the last 5 of 11 analyses
    last = status.series[-1]
    by = {v.name: v for v in last.variants}
    assert set(by) == {"control", "variant-1", "variant-2"}
    assert sum(v.weight for v in last.variants) == 100
    now_status = {v.name: v for v in status.variants}
    for name in ("variant-1", "variant-2"):
        v = by[name]
        assert v.estimate == float(f"{now_status[name].estimate:.5g}")
        assert v.adjustedPValue is not None and 0 <= v.adjustedPValue <= 1
        assert v.ciLow is not None and v.ciHigh is not None and v.difference is not None
        assert v.ciLow <= v.difference <= v.ciHigh
    assert by["control"].difference is None and by["control"].estimate is not None
    # Holm: the adjusted p-values are what the status says now.
    assert by["variant-1"].adjustedPValue == float(f"{now_status['variant-1'].adjustedPValue:.5g}")
    assert last.srm == "SplitMatches" and last.srmPValue == float(f"{status.srmPValue:.5g}")
    early = drive_experiment(spec, 4, {"control": 0.10, "variant-1": 0.11, "variant-2": 0.10})
    assert [p.srm for p in early.series][:2] == ["CountingStarted", "NotEnoughSamples"]
    assert [(g.variant, g.name) for g in last.values] == [
        (v, "guardrail-number-0") for v in ("control", "variant-1", "variant-2")
    ]


def test_status_stays_far_below_the_etcd_limit_at_the_largest_spec() -> None:
    """10 variants x 20 guardrails, 150 analyses: the series is cut by bytes, not only by count, and
    the newest point is kept even when it alone is larger than the byte bound."""
    spec = experiment_spec(10, 20)
    status = drive_experiment(spec, 150, {"control": 0.1})
    sizes = [series.point_bytes(p) for p in status.series]
    assert len(status.series) < series.SERIES_LIMIT  # the byte bound applied
    assert len(status.series) >= 1
    assert sum(sizes) <= max(series.SERIES_MAX_BYTES, sizes[-1])
    assert status.series[-1].time == T0 + timedelta(seconds=5 * 149)  # the newest kept
    whole = len(json.dumps(dump(status)))
    assert whole < ETCD_LIMIT / 16, whole


def test_status_size_does_not_grow_with_the_length_of_a_run() -> None:
    """The object's status after 500 analyses is no larger than after 20 (the window, not the run)."""
    spec = experiment_spec(3, 2, min_samples=10**8)
    rates = {"control": 0.1, "variant-1": 0.1, "variant-2": 0.1}
    short, long = drive_experiment(spec, 21, rates), drive_experiment(spec, 501, rates)
    assert long.phase == short.phase == "Running"
    assert len(long.series) == series.SERIES_LIMIT
    assert long.series[-1].time == T0 + timedelta(seconds=5 * 500)
    size_short, size_long = len(json.dumps(dump(short))), len(json.dumps(dump(long)))
    assert size_long <= size_short * 1.1 + 512, (size_short, size_long)
    assert size_long < 32 * 1024
