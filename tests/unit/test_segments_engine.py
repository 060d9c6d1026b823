"""A ModelRollout comparison with ``segments``: spec validation, the engine's per-segment verdicts, the
handler's per-segment measurement (rendered {{ segment }}, pooled sum, no data is not zero)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from model_rollouts.analysis import segments
from model_rollouts.analysis.stats import ProportionData as P
from model_rollouts.api.rollout import Comparison
from model_rollouts.engine import rollout as eng
from model_rollouts.engine import steps
from model_rollouts.handlers import rollout as handler
from model_rollouts.metrics.provider import Result
from tests.unit.test_rollout_engine import Driver, ok, spec

REGIONS = ["north", "south", "east", "west"]
SUCC = 'sum(increase(fb{service="{{ service }}",region="{{ segment }}",feedback="pos"}[{{ window }}]))'
TRIALS = 'sum(increase(fb{service="{{ service }}",region="{{ segment }}"}[{{ window }}]))'


def comparison(**extra: Any) -> dict[str, Any]:
    return {
        "name": "fb",
        "successes": SUCC,
        "trials": TRIALS,
        "margin": 0.05,
        "segments": {"label": "region", "values": REGIONS, "minSamples": 100},
        **extra,
    }


def test_segments_need_non_inferiority_and_the_segment_placeholder() -> None:
    assert Comparison.model_validate(comparison()).segments is not None
    with pytest.raises(ValidationError, match="nonInferiority"):
        Comparison.model_validate(comparison(test="superiority"))
    with pytest.raises(ValidationError, match="segment"):
        Comparison.model_validate(
            comparison(trials='sum(increase(fb{service="{{ service }}"}[{{ window }}]))')
        )
    with pytest.raises(ValidationError):
        Comparison.model_validate(comparison(segments={"label": "region", "values": ['x"}', "y"]}))


def _obs(rates: dict[str, tuple[float, float]], n: int) -> eng.Observations:
    base = ok()
    comps: dict[str, eng.ComparisonData] = {}
    pooled_s, pooled_c = P(0, 0), P(0, 0)
    for region, (rs, rc) in rates.items():
        st, ca = P(round(rs * n), n), P(round(rc * n), n)
        comps[segments.segment_key("fb", region)] = eng.ComparisonData(stable=st, candidate=ca)
        pooled_s, pooled_c = segments.add(pooled_s, st), segments.add(pooled_c, ca)  # type: ignore[assignment]
    comps["fb"] = eng.ComparisonData(stable=pooled_s, candidate=pooled_c)
    return eng.Observations(guardrails=base.guardrails, comparisons=comps)


def _driver(**extra: Any) -> Driver:
    return Driver(
        spec(
            [{"setWeight": 50}, {"analysis": {"duration": "10s"}}, {"setWeight": 100}],
            analysis={"comparisons": [comparison(**extra)]},
        )
    )


def test_better_overall_but_harmed_in_one_segment_rolls_back_naming_it() -> None:
    d = _driver()
    d.tick()  # to 50%
    rates = {"north": (0.5, 0.7), "south": (0.5, 0.7), "east": (0.5, 0.7), "west": (0.5, 0.3)}
    st = d.status
    for _ in range(5):
        st = d.tick(_obs(rates, 3000))
        if st.phase == "RolledBack":
            break
    assert st.phase == "RolledBack"
    assert st.weight == 0
    assert "region west harmed beyond the margin" in (st.message or "")
    m = next(x for x in st.lastAnalysis if x.name == "fb")
    assert m.verdict == "fail"
    rows = {r.segment: r for r in m.segments or []}
    assert rows["west"].status == "fail" and rows["north"].status != "fail"
    assert "pooled:" in m.message and "candidate is better" not in m.message.split("pooled:")[0]


def _small_west(rates: dict[str, tuple[float, float]]) -> eng.Observations:
    obs = _obs(rates, 20000)
    # The west has only 50 samples per arm: too small to judge (minSamples 100).
    obs.comparisons[segments.segment_key("fb", "west")] = eng.ComparisonData(
        stable=P(25, 50), candidate=P(25, 50)
    )
    return obs


def test_equal_in_every_segment_promotes() -> None:
    d = _driver()
    d.tick()
    st = d.status
    for _ in range(10):
        st = d.tick(_obs({r: (0.5, 0.5) for r in REGIONS}, 20000))
        if st.phase == "Promoted":
            break
    assert st.phase == "Promoted", st.message
    m = next(x for x in st.lastAnalysis if x.name == "fb")
    assert all(r.status == "pass" for r in m.segments or [])


def test_a_too_small_segment_holds_by_default() -> None:
    d = _driver()
    d.tick()
    for _ in range(10):
        st = d.tick(_small_west({r: (0.5, 0.5) for r in REGIONS}))
    assert st.phase == "Progressing" and st.weight == 50
    m = next(x for x in st.lastAnalysis if x.name == "fb")
    assert m.verdict == "inconclusive"
    assert {r.segment: r.status for r in m.segments or []}["west"] == "tooSmall"
    assert "too small to judge: west (held until they reach minSamples)" in m.message


def test_a_too_small_segment_is_reported_and_ignored_when_asked() -> None:
    d = _driver(segments={"label": "region", "values": REGIONS, "minSamples": 100, "tooSmall": "ignore"})
    d.tick()
    rates = {r: (0.5, 0.5) for r in REGIONS}
    st = d.status
    for _ in range(10):
        st = d.tick(_small_west(rates))
        if st.phase == "Promoted":
            break
    assert st.phase == "Promoted", st.message
    m = next(x for x in st.lastAnalysis if x.name == "fb")
    rows = {r.segment: r for r in m.segments or []}
    assert rows["west"].status == "tooSmall"
    assert all(rows[r].status == "pass" for r in ("north", "south", "east"))
    assert "too small to judge: west" in m.message


def test_pooled_pass_is_held_while_a_segment_is_undecided() -> None:
    d = _driver()
    d.tick()
    rates = {"north": (0.5, 0.5), "south": (0.5, 0.5), "east": (0.5, 0.5), "west": (0.5, 0.47)}
    for _ in range(4):
        d.tick(_obs(rates, 20000))
    st = d.status
    m = next(x for x in st.lastAnalysis if x.name == "fb")
    assert st.phase == "Progressing" and st.weight == 50
    assert m.verdict == "inconclusive"
    assert "waiting for evidence in west" in m.message


def test_segment_epochs_are_kept_per_segment() -> None:
    d = _driver()
    d.tick()
    d.tick(_obs({r: (0.5, 0.5) for r in REGIONS}, 200))
    steps.close_epoch(
        d.status, eng.current_epoch(d.status, _obs({r: (0.5, 0.5) for r in REGIONS}, 200)), d.now
    )
    assert set(d.status.epochs) == {"fb", *(segments.segment_key("fb", r) for r in REGIONS)}


class FakeProvider:
    def __init__(self, missing: str | None = None) -> None:
        self.queries: list[str] = []
        self.missing = missing

    def query(self, promql: str) -> Result:
        self.queries.append(promql)
        if self.missing and f'region="{self.missing}"' in promql:
            return Result("noData", message="no series")
        return Result("value", 50.0 if "pos" in promql else 100.0)


def _measure(provider: FakeProvider) -> eng.Observations:
    s = spec(
        [{"setWeight": 50}, {"analysis": {"duration": "10s"}}],
        analysis={"comparisons": [comparison()]},
    )
    st = eng.reconcile(s, eng.ModelRolloutStatus(), now=eng.EPOCH, generation=1).status  # type: ignore[attr-defined]
    st.weight = 50
    return handler.measure(s, st, provider, "ns")  # type: ignore[arg-type]


def test_handler_measures_each_segment_and_the_pooled_sum() -> None:
    p = FakeProvider()
    obs = _measure(p)
    assert any('region="west"' in q for q in p.queries) and not any("{{" in q for q in p.queries)
    assert len([q for q in p.queries if "fb{" in q]) == 2 * 2 * len(REGIONS)
    pooled = obs.comparisons["fb"]
    assert pooled.stable == P(200, 400) and pooled.candidate == P(200, 400)
    assert obs.comparisons[segments.segment_key("fb", "east")].stable == P(50, 100)


def test_a_segment_without_data_holds_the_comparison_naming_it() -> None:
    obs = _measure(FakeProvider(missing="east"))
    problem = obs.comparisons["fb"].problem
    assert problem is not None and problem.outcome == "noData"
    assert "region east" in problem.message


def test_segmented_queries_pass_the_placeholder_check() -> None:
    s = spec([{"setWeight": 50}], analysis={"comparisons": [comparison()]})
    from model_rollouts.metrics.resolve import check_queries

    check_queries(handler._queries(s))  # no RouterError: {{ segment }} is allowed here


def test_the_plugin_shows_the_segment_table() -> None:
    import re

    from model_rollouts.api.common import dump
    from model_rollouts.cli import render, view
    from tests.unit.test_cli import obj_of

    d = _driver()
    d.tick()
    d.tick(_obs({"north": (0.5, 0.7), "south": (0.5, 0.7), "east": (0.5, 0.7), "west": (0.5, 0.3)}, 3000))
    obj = obj_of("ModelRollout", "seg", d.spec, d.status)
    v = view.rollout_view(obj, d.now)
    c = v["comparisons"][0]
    assert c["segmentLabel"] == "region" and {r["segment"] for r in c["segments"]} == set(REGIONS)
    text = render.to_text(render.view(v))
    assert "fb by region" in text
    assert re.search(r"west\s+3,000/3,000\s+-0\.2\s+.*fail", text), text
    assert dump(d.status)["lastAnalysis"][-1]["segments"][0]["segment"] == "north"


def test_the_report_lists_each_segment() -> None:
    from model_rollouts.report import document
    from model_rollouts.report.data import load
    from tests.unit.test_cli import obj_of

    d = _driver()
    d.tick()
    d.tick(_obs({"north": (0.5, 0.7), "south": (0.5, 0.7), "east": (0.5, 0.7), "west": (0.5, 0.3)}, 3000))
    r = load(obj_of("ModelRollout", "seg", d.spec, d.status))
    head, *rows = document.segment_rows(r)
    assert head[:3] == ["metric", "segment", "status"]
    assert [(row[1], row[2]) for row in rows] == [
        ("north", "pass"),
        ("south", "pass"),
        ("east", "pass"),
        ("west", "fail"),
    ]


def test_a_pooled_pass_without_the_segments_counts_is_not_a_pass() -> None:
    d = _driver()
    d.tick()
    full = _obs({r: (0.5, 0.5) for r in REGIONS}, 20000)
    only_pooled = eng.Observations(guardrails=full.guardrails, comparisons={"fb": full.comparisons["fb"]})
    for _ in range(5):
        st = d.tick(only_pooled)
    m = next(x for x in st.lastAnalysis if x.name == "fb")
    assert m.verdict == "inconclusive" and "region north not measured" in m.message
    assert st.phase == "Progressing" and st.weight == 50


def test_telemetry_exports_each_segment_with_bounded_labels() -> None:
    from model_rollouts import telemetry
    from model_rollouts.api.common import dump

    d = _driver()
    d.tick()
    d.tick(_obs({"north": (0.5, 0.7), "south": (0.5, 0.7), "east": (0.5, 0.7), "west": (0.5, 0.3)}, 3000))
    values = telemetry.analysis_values("ModelRollout", dump(d.status), dump(d.spec))
    diff = values[telemetry.SEGMENT_DIFFERENCE]
    assert diff[("fb", "west")] == pytest.approx(-0.2) and diff[("fb", "north")] == pytest.approx(0.2)
    assert values[telemetry.SEGMENT_STATUS][("fb", "west", "fail")] == 1.0
    assert {k[1] for k in values[telemetry.SEGMENT_STATUS]} == set(REGIONS)
