"""The prediction-shift and calibration judges wired into ModelRollout: the spec fields, the vector
query (provider and Prometheus answer), the handler's measurement (one query per judge and arm) and the
engine's use of the findings (a fail rolls back naming the judge, noData and too few samples hold,
a pass lets the steps go on, looks are counted in status)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from model_rollouts.analysis import calibration, model_judges
from model_rollouts.analysis.assess import Policy, assess
from model_rollouts.api.common import Measurement
from model_rollouts.api.provider import inline_query_fields
from model_rollouts.api.shift import ARM_SLOT_RE
from model_rollouts.engine import rollout as eng
from model_rollouts.handlers import judges
from model_rollouts.handlers import rollout as handler
from model_rollouts.handlers.common import check_queries
from model_rollouts.metrics.errors import ProviderError
from model_rollouts.metrics.prometheus import interpret_vector
from model_rollouts.metrics.provider import Budgeted, Result, Vector
from tests.unit.test_rollout_engine import Driver, ok, spec

BUCKETS = 'sum by (le) (increase(score_bucket{service="{{ service }}"}[{{ window }}]))'
OUTCOMES = 'sum by (bin, outcome) (increase(cal_total{service="{{ service }}"}[{{ window }}]))'
SUMS = 'sum by (bin) (increase(cal_sum{service="{{ service }}"}[{{ window }}]))'
SHIFT = {"name": "scores", "buckets": BUCKETS}
CAL = {"name": "cal", "outcomes": OUTCOMES, "scoreSums": SUMS}
EDGES = [0.1 * i for i in range(1, 11)]


# -- spec ---------------------------------------------------------------------------------------------
def test_the_judges_are_fields_of_the_analysis_with_their_limits() -> None:
    s = spec([{"setWeight": 50}], analysis={"predictionShift": [SHIFT], "calibration": [CAL]})
    assert s.analysis.predictionShift[0].maxPSI == 0.1 and s.analysis.predictionShift[0].minSamples == 500
    assert s.analysis.calibration[0].margin == 0.05
    for bad in ({"maxPSI": 0}, {"minSamples": 0}, {"extra": 1}):
        with pytest.raises(ValidationError):
            spec([{"setWeight": 50}], analysis={"predictionShift": [{**SHIFT, **bad}]})
    for bad in ({"margin": 0}, {"margin": 1}, {"minSamples": 0}):
        with pytest.raises(ValidationError):
            spec([{"setWeight": 50}], analysis={"calibration": [{**CAL, **bad}]})


def test_the_crd_lists_them_by_name_and_requires_a_query_that_selects_one_arm() -> None:
    crd = yaml.safe_load(Path("crds/modelrollouts.yaml").read_text())
    analysis = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "analysis"
    ]["properties"]
    for field, query in (("predictionShift", "buckets"), ("calibration", "outcomes")):
        prop = analysis[field]
        assert prop["x-kubernetes-list-type"] == "map" and prop["x-kubernetes-list-map-keys"] == ["name"]
        rules = prop["items"]["x-kubernetes-validations"]
        rule = next(r for r in rules if r.get("fieldPath") == f".{query}")
        assert ARM_SLOT_RE in rule["rule"] and "{{ service }}" in rule["message"]
    # The same expression, read as RE2 reads it: a placeholder of one arm, spaces optional.
    assert re.search(ARM_SLOT_RE, BUCKETS) and re.search(ARM_SLOT_RE, "x{variant='{{variant}}'}")
    assert not re.search(ARM_SLOT_RE, "sum by (le) (score_bucket)")
    assert not re.search(ARM_SLOT_RE, "x{ns='{{ namespace }}'}")


def test_their_queries_are_checked_like_others_and_count_as_inline_queries() -> None:
    s = spec([{"setWeight": 50}], analysis={"predictionShift": [SHIFT], "calibration": [CAL]})
    fields = dict(handler._queries(s))
    assert fields["spec.analysis.predictionShift[0].buckets"] == BUCKETS
    assert fields["spec.analysis.calibration[0].scoreSums"] == SUMS
    check_queries(handler._queries(s))
    bad = spec(
        [{"setWeight": 50}], analysis={"calibration": [{**CAL, "outcomes": OUTCOMES + "{{ segment }}"}]}
    )
    with pytest.raises(ProviderError, match=r"spec\.analysis\.calibration\[0\]\.outcomes"):
        check_queries(handler._queries(bad))
    inline = inline_query_fields(s, "spec")
    assert "spec.analysis.predictionShift[0].buckets" in inline
    assert (
        "spec.analysis.calibration[0].outcomes" in inline
        and "spec.analysis.calibration[0].scoreSums" in inline
    )


# -- the vector query -----------------------------------------------------------------------------------
def _series(labels: dict[str, str], value: str) -> dict[str, Any]:
    return {"metric": labels, "value": [1.0, value]}


def test_a_vector_answer_is_keyed_by_the_asked_labels() -> None:
    v = interpret_vector([_series({"le": "0.5"}, "3"), _series({"le": "+Inf"}, "7")], ("le",))
    assert v.ok and v.series == {("0.5",): 3.0, ("+Inf",): 7.0}
    two = interpret_vector(
        [_series({"bin": "0.1", "outcome": "positive", "job": "x"}, "2")], ("bin", "outcome")
    )
    assert two.series == {("0.1", "positive"): 2.0}


@pytest.mark.parametrize(
    ("data", "outcome", "text"),
    [
        ([], "noData", "no series"),
        ([1.0, "3"], "error", "scalar"),
        ([_series({}, "3")], "error", "no label le"),
        ([_series({"le": "1", "a": "x"}, "1"), _series({"le": "1", "a": "y"}, "2")], "error", "aggregate"),
        ([_series({"le": "1"}, "NaN")], "nan", "NaN"),
        ([_series({"le": "1"}, "x")], "error", "non-numeric"),
        ("oops", "error", "unexpected"),
    ],
)
def test_a_vector_answer_that_cannot_be_used_is_never_a_value(data: Any, outcome: str, text: str) -> None:
    v = interpret_vector(data, ("le",))
    assert v.outcome == outcome and not v.ok and not v.series
    assert text.lower() in v.message.lower()
    assert v.problem().outcome == outcome


def test_a_vector_query_after_the_analysis_budget_fails_at_once() -> None:
    class Slow:
        calls = 0

        def query(self, promql: str) -> Result:
            return Result("value", 1.0)

        def query_vector(self, promql: str, labels: tuple[str, ...]) -> Vector:
            Slow.calls += 1
            return Vector("value", {("1",): 1.0})

    b = Budgeted(Slow(), 0.0)
    v = b.query_vector("q", ("le",))
    assert v.outcome == "error" and "budget" in v.message and Slow.calls == 0


# -- the handler's measurement ----------------------------------------------------------------------
class Fake:
    """Answers a vector query by the first (service, metric) key found in it; records every query."""

    def __init__(self, answers: dict[tuple[str, str], Vector]) -> None:
        self.answers = answers
        self.queries: list[str] = []

    def query(self, promql: str) -> Result:
        return Result("value", 0.0)

    def query_vector(self, promql: str, labels: tuple[str, ...]) -> Vector:
        self.queries.append(promql)
        for (svc, metric), v in self.answers.items():
            if f'service="{svc}"' in promql and metric in promql:
                return v
        return Vector("noData", message="the query returned no series")


def _arms() -> dict[str, dict[str, str]]:
    return {
        role: handler._placeholders(ref, role, "ns", "60s")
        for role, ref in (
            ("stable", handler.VariantRef(service="v1")),
            ("candidate", handler.VariantRef(service="v2")),
        )
    }


def _measure(s: Any, p: Fake) -> dict[str, model_judges.JudgeData]:
    arms = _arms()
    return judges.measure_judges(s.analysis, p, arms["stable"], {"candidate": arms["candidate"]})["candidate"]  # type: ignore[arg-type]


def _cal_vector(pos: dict[str, float], neg: dict[str, float], sums: dict[str, float]) -> Vector:
    series = {(b, "positive"): x for b, x in pos.items()}
    series |= {(b, "negative"): x for b, x in neg.items()}
    series |= {(b, "scoreSum"): x for b, x in sums.items()}
    return Vector("value", series)


def test_one_vector_query_per_judge_and_arm() -> None:
    s = spec([{"setWeight": 50}], analysis={"predictionShift": [SHIFT], "calibration": [CAL]})
    hist = Vector("value", {("0.5",): 10.0, ("1",): 20.0, ("+Inf",): 20.0})
    cal = _cal_vector({"0.5": 4, "1": 8}, {"0.5": 6, "1": 2}, {"0.5": 4.5, "1": 8.0})
    p = Fake({(svc, m): v for svc in ("v1", "v2") for m, v in (("score_bucket", hist), ("cal_total", cal))})
    data = _measure(s, p)
    assert len(p.queries) == 4  # two judges x two arms: the score sums ride in the outcomes' query
    d = data[model_judges.key("predictionShift", "scores")]
    assert d.problem is None and d.baseline == {"0.5": 10.0, "1": 20.0, "+Inf": 20.0}
    # The calibration query: the user's outcomes, or the score sums relabelled outcome="scoreSum".
    cal_q = [q for q in p.queries if "cal_total" in q]
    assert len(cal_q) == 2 and all(
        "label_replace((" in q and '"scoreSum"' in q and "cal_sum" in q for q in cal_q
    )
    assert all("[60s]" in q for q in p.queries)  # the epoch's window


def test_calibration_counts_become_bins_with_their_mean_predictions() -> None:
    v = _cal_vector({"0.5": 4, "1": 8}, {"0.5": 6, "1": 2}, {"0.5": 4.5, "1": 8.0})
    b = judges.to_bins(v, True)
    assert isinstance(b, calibration.CalibrationBins)
    assert b.upper == (0.5, 1.0) and b.positives == (4.0, 8.0) and b.totals == (10.0, 10.0)
    assert list(b.confidence()) == [0.45, 0.8]
    no_sums = judges.to_bins(Vector("value", {("0.5", "true"): 1.0, ("0.5", "false"): 1.0}), False)
    assert isinstance(no_sums, calibration.CalibrationBins) and no_sums.score_sums is None
    odd = judges.to_bins(Vector("value", {("0.5", "maybe"): 1.0}), False)
    assert (
        isinstance(odd, Result) and odd.outcome == "error" and "neither positive nor negative" in odd.message
    )
    bad_bin = judges.to_bins(Vector("value", {("7", "positive"): 1.0}), False)
    assert isinstance(bad_bin, Result) and bad_bin.outcome == "error"
    only_sums = judges.to_bins(Vector("value", {("0.5", "scoreSum"): 1.0}), True)
    assert isinstance(only_sums, Result) and only_sums.outcome == "noData"


def test_a_stable_without_data_is_a_problem_named_by_arm_and_the_candidate_is_not_asked() -> None:
    s = spec([{"setWeight": 50}], analysis={"predictionShift": [SHIFT]})
    hist = Vector("value", {("1",): 1.0, ("+Inf",): 1.0})
    p = Fake({("v2", "score_bucket"): hist})
    d = _measure(s, p)[model_judges.key("predictionShift", "scores")]
    assert d.problem is not None and d.problem.outcome == "noData" and d.problem.message.startswith("stable ")
    assert len(p.queries) == 1


# -- the engine ---------------------------------------------------------------------------------------
def _hist(probs: np.ndarray[Any, Any], n: int) -> dict[str, float]:
    counts = np.round(np.asarray(probs) * n)
    cum = np.cumsum(counts)
    out = {f"{e:.1f}": float(c) for e, c in zip(EDGES, cum, strict=True)}
    out["+Inf"] = float(cum[-1])
    return out


BASE = np.array([0.0, 0.0, 0.05, 0.1, 0.2, 0.3, 0.2, 0.1, 0.05, 0.0])
WIDE = np.array([0.05, 0.07, 0.08, 0.1, 0.1, 0.1, 0.1, 0.1, 0.15, 0.15])


def _shift_obs(cand: np.ndarray[Any, Any], n: int, n_stable: int | None = None) -> eng.Observations:
    data = model_judges.JudgeData(baseline=_hist(BASE, n_stable or n), candidate=_hist(cand, n))
    return eng.Observations(
        guardrails=ok().guardrails, judges={model_judges.key("predictionShift", "scores"): data}
    )


def _driver(**analysis: Any) -> Driver:
    return Driver(spec([{"setWeight": 20}, {"setWeight": 100}], analysis=analysis))


def test_a_shifted_candidate_is_rolled_back_naming_the_judge() -> None:
    d = _driver(predictionShift=[SHIFT])
    d.tick()  # to 20%
    st = d.tick(_shift_obs(WIDE, 2000))
    assert st.phase == "RolledBack" and st.weight == 0
    assert st.history[-1].reason == "PredictionShifted"
    assert (st.message or "").startswith("prediction-shift judge scores: PSI")
    m = next(x for x in st.lastAnalysis if x.kind == "predictionShift")
    assert m.verdict == "fail" and m.details is not None
    assert m.details["psi"] > 0.1 and m.details["looks"] == 1 and "pValue" in m.details
    assert max(d.weights) == 20


def test_too_few_samples_and_no_data_hold_and_never_promote() -> None:
    d = _driver(predictionShift=[SHIFT])
    d.tick()
    for _ in range(4):
        st = d.tick(_shift_obs(BASE, 100))  # fewer than minSamples 500
        assert st.phase == "Progressing" and st.weight == 20
        assert "prediction-shift judge scores: " in (st.message or "") and "not enough scores yet" in (
            st.message or ""
        )
    m = next(x for x in st.lastAnalysis if x.kind == "predictionShift")
    assert m.verdict == "inconclusive" and (m.details or {})["looks"] == 0  # nothing tested: no alpha spent
    no_data = eng.Observations(
        guardrails=ok().guardrails,
        judges={model_judges.key("predictionShift", "scores"): model_judges.JudgeData(
            problem=Result("noData", message="candidate the query returned no series"))},
    )  # fmt: skip
    for _ in range(3):
        st = d.tick(no_data)
        assert st.weight == 20 and st.phase == "Progressing"
    assert "scores: candidate the query returned no series" in (st.message or "")
    m = next(x for x in st.lastAnalysis if x.kind == "predictionShift")
    assert m.verdict == "noData" and m.outcome == "noData"
    # Missing entirely (not measured) is an error, not a pass.
    st = d.tick(eng.Observations(guardrails=ok().guardrails, judges={}))
    assert (
        st.weight == 20 and next(x for x in st.lastAnalysis if x.kind == "predictionShift").verdict == "error"
    )


def test_an_unshifted_candidate_passes_and_its_last_verdict_is_carried_at_full_weight() -> None:
    d = _driver(predictionShift=[SHIFT])
    d.tick()
    st = d.tick(_shift_obs(BASE, 2000, 8000))
    m = next(x for x in st.lastAnalysis if x.kind == "predictionShift")
    assert m.verdict == "pass" and st.weight == 100
    st = d.tick(ok())  # at 100 the stable has no traffic: not measured, the pass is carried
    carried = next(x for x in st.lastAnalysis if x.kind == "predictionShift")
    assert carried.carried and carried.verdict == "pass"
    assert st.phase == "Promoted"


def test_looks_are_counted_in_status_and_spend_less_alpha_each() -> None:
    d = _driver(predictionShift=[SHIFT])
    d.tick()
    alphas = []
    # A small shift: neither shown material nor shown below maxPSI, so the judge keeps looking.
    mid = 0.88 * BASE + 0.12 * WIDE
    for _ in range(3):
        st = d.tick(_shift_obs(mid, 600))
        m = next(x for x in st.lastAnalysis if x.kind == "predictionShift")
        assert m.verdict == "inconclusive" and st.weight == 20
        alphas.append((m.details or {})["alpha"])
    assert (m.details or {})["looks"] == 3
    assert alphas == pytest.approx([0.05 / 2, 0.05 / 6, 0.05 / 12])


def test_two_judges_share_alpha_and_a_miscalibrated_candidate_rolls_back() -> None:
    def bins(bias: float) -> calibration.CalibrationBins:
        upper = (0.5, 0.6, 0.7, 0.8)
        totals = (1000.0, 1000.0, 1000.0, 1000.0)
        rates = (0.45, 0.55, 0.65, 0.75)
        return calibration.CalibrationBins(
            upper,
            tuple(r * n for r, n in zip(rates, totals, strict=True)),
            totals,
            tuple((r + bias) * n for r, n in zip(rates, totals, strict=True)),
        )

    d = _driver(predictionShift=[SHIFT], calibration=[{**CAL, "minSamples": 1000}])
    d.tick()
    judges = {
        model_judges.key("predictionShift", "scores"): model_judges.JudgeData(
            baseline=_hist(BASE, 4000), candidate=_hist(BASE, 4000)
        ),
        model_judges.key("calibration", "cal"): model_judges.JudgeData(
            baseline=bins(0.0), candidate=bins(0.1)
        ),
    }
    st = d.tick(eng.Observations(guardrails=ok().guardrails, judges=judges))
    assert st.phase == "RolledBack" and st.history[-1].reason == "CalibrationWorse"
    assert (st.message or "").startswith("calibration judge cal: ECE candidate")
    m = next(x for x in st.lastAnalysis if x.kind == "calibration")
    assert m.details is not None and m.details["alpha"] == pytest.approx(0.05 / 2 / 2)  # 2 judges, look 1
    assert m.details["eceCandidate"] == pytest.approx(0.1) and m.details["eceBaseline"] == pytest.approx(0.0)


def test_assess_holds_on_an_inconclusive_judge_and_reports_a_failing_one() -> None:
    s = spec([{"setWeight": 50}])
    policy = Policy(s.analysis, [], per_arm=False, breach_holds=True, breach_unhealthy=False)

    def m(kind: str, verdict: str, carried: bool | None = None) -> Measurement:
        return Measurement(name="j", kind=kind, outcome="value", verdict=verdict, message=f"j {verdict}",
                           carried=carried)  # type: ignore[arg-type]  # fmt: skip

    a = assess(policy, {"candidate": [m("calibration", "inconclusive")]}, {}, 0)
    assert a.hold_reasons() == ["j inconclusive"] and a.stopped is None
    a = assess(policy, {"candidate": [m("predictionShift", "fail")]}, {}, 0)
    assert a.stopped is not None and a.worse is None
    carried = assess(
        policy,
        {"candidate": [m("predictionShift", "fail", True), m("calibration", "inconclusive", True)]},
        {},
        0,
    )
    assert carried.stopped is None and carried.hold_reasons() == []
    # A comparison's inconclusive verdict still does not hold (its evidence gate is at promotion).
    assert assess(policy, {"candidate": [m("comparison", "inconclusive")]}, {}, 0).hold_reasons() == []


def test_the_plugin_shows_each_judge_with_its_numbers() -> None:
    from model_rollouts.api.common import dump
    from model_rollouts.cli import render, view

    d = _driver(predictionShift=[SHIFT])
    d.tick()
    st = d.tick(_shift_obs(WIDE, 2000))
    obj = {
        "apiVersion": "mlrollouts.io/v1alpha1",
        "kind": "ModelRollout",
        "metadata": {"name": "r", "namespace": "ns", "generation": 1},
        "spec": dump(d.spec),
        "status": dump(st),
    }
    v = view.rollout_view(obj)
    [j] = v["modelJudges"]
    assert j["kind"] == "predictionShift" and j["verdict"] == "fail" and j["details"]["psi"] > 0.1
    text = render.to_text(render.view(v))
    assert "Model judges: candidate vs stable" in text and "scores" in text and "fail" in text
    assert f"{j['details']['psi']:.4g}" in text and "2,000/2,000" in text


def test_lint_knows_the_judges() -> None:
    from model_rollouts.cli import lint
    from tests.integration.test_rollout import rollout

    crds = lint.load_crds()

    def errors(judge: dict[str, Any]) -> list[str]:
        doc = rollout("r", "http://prom:9090", [{"setWeight": 50}], analysis={"predictionShift": [judge]})
        return [
            f"{f.field} {f.message}"
            for f in lint.lint_document(doc, crds, "t.yaml", 0)
            if f.severity == "error"
        ]

    assert errors(SHIFT) == []
    same = errors({**SHIFT, "buckets": "sum by (le) (x_bucket[{{ window }}])"})
    assert len(same) == 1 and "predictionShift[0].buckets" in same[0] and "{{ service }}" in same[0]
    unknown = errors({**SHIFT, "buckets": BUCKETS + " * {{ segment }}"})
    assert len(unknown) == 1 and "predictionShift[0].buckets" in unknown[0] and "segment" in unknown[0]
    assert any("maxPSI" in e for e in errors({**SHIFT, "maxPSI": -1}))


def test_the_report_lists_each_judge_in_the_last_numbers() -> None:
    from model_rollouts.api.common import dump
    from model_rollouts.report import data, document

    d = _driver(predictionShift=[SHIFT])
    d.tick()
    st = d.tick(_shift_obs(WIDE, 2000))
    obj = {
        "apiVersion": "mlrollouts.io/v1alpha1",
        "kind": "ModelRollout",
        "metadata": {"name": "r", "namespace": "ns", "generation": 1},
        "spec": dump(d.spec),
        "status": dump(st),
    }
    rows = document.result_rows(data.load(obj))
    [row] = [r for r in rows if r[1] == "predictionShift"]
    assert row[0] == "scores" and row[-1] == "fail" and row[4] == "PSI < 0.1"
    psi = next(m for m in st.lastAnalysis if m.kind == "predictionShift").value
    assert psi is not None and abs(float(row[2]) - psi) < 0.01


def test_a_vector_query_runs_within_the_tenants_budget_key() -> None:
    from model_rollouts.metrics.resolve import Measurement as Measured
    from model_rollouts.metrics.resolve import Scoped

    seen: list[tuple[str, tuple[str, ...], str | None]] = []

    class Inner:
        def query(self, promql: str, budget: str | None = None) -> Result:
            return Result("value", 1.0)

        def query_vector(self, promql: str, labels: tuple[str, ...], budget: str | None = None) -> Vector:
            seen.append((promql, labels, budget))
            return Vector("value", {("1",): 1.0})

    p = Measured(Scoped(Inner(), "prom@team-a"), 30.0)  # type: ignore[arg-type]
    assert p.query_vector("q", ("le",)).ok
    assert seen == [("q", ("le",), "prom@team-a")]


def test_the_prometheus_provider_answers_a_vector_query_over_http() -> None:
    import json as json_

    from model_rollouts.metrics.prometheus import PrometheusProvider
    from tests.harness.tenancy import RecordingServer

    answer = {
        "status": "success",
        "data": {
            "resultType": "vector",
            "result": [
                {"metric": {"le": "0.5"}, "value": [1.0, "4"]},
                {"metric": {"le": "+Inf"}, "value": [1.0, "9"]},
            ],
        },
    }
    server = RecordingServer(status=200, body=json_.dumps(answer)).start()
    try:
        v = PrometheusProvider(server.url, timeout_s=2).query_vector("sum by (le) (x)", ("le",))
        scalar = PrometheusProvider(server.url, timeout_s=2).query("sum by (le) (x)")
    finally:
        server.close()
    assert v.ok and v.series == {("0.5",): 4.0, ("+Inf",): 9.0}
    assert scalar.outcome == "error" and "2 series" in scalar.message  # the scalar query refuses it
    refused = RecordingServer(status=503, body="secret page").start()
    try:
        bad = PrometheusProvider(refused.url, timeout_s=2).query_vector("x", ("le",))
    finally:
        refused.close()
    assert bad.outcome == "error" and "secret" not in bad.message and "503" in bad.message


# -- ModelExperiment: each variant against the control ---------------------------------------------------
def _exp_obs(shifted: set[str], n: int, names: tuple[str, ...] = ("control", "v1", "v2")) -> Any:
    from model_rollouts.analysis.stats import ProportionData
    from model_rollouts.engine.experiment import Observations, VariantObservation

    # The primary metric far from any decision (the judges' scores are another count).
    primary, g = ProportionData(50, 100), {"error-rate": Result("value", 0.0)}
    variants = {v: VariantObservation(primary=primary, guardrails=g) for v in names}
    judged = {
        v: {
            model_judges.key("predictionShift", "scores"): model_judges.JudgeData(
                baseline=_hist(BASE, n), candidate=_hist(WIDE if v in shifted else BASE, n)
            )
        }
        for v in names
        if v != "control"
    }
    return Observations(variants=variants, judges=judged)


def test_an_experiment_drops_a_shifted_variant_and_holds_while_the_judges_are_undecided() -> None:
    from tests.unit.test_experiment_engine import events, make_spec, start, step, weights

    spec = make_spec(3, analysis={"predictionShift": [SHIFT]})
    d = start(spec)
    d = step(spec, d, 5, _exp_obs(set(), 100))  # fewer than minSamples: the decision holds
    assert d.status.phase == "Running" and "model judges undecided" in (d.status.message or "")
    assert "v1: prediction-shift judge scores: " in (d.status.message or "")
    d = step(spec, d, 10, _exp_obs({"v2"}, 3000))
    v2 = next(v for v in d.status.variants if v.name == "v2")
    assert not v2.active and "v2: prediction-shift judge scores: PSI" in (v2.reason or "")
    assert weights(d) == {"control": 50, "v1": 50, "v2": 0} and "VariantDropped" in events(d)
    judged = [m for m in d.status.lastAnalysis if m.kind == "predictionShift"]
    assert {(m.variant, m.verdict) for m in judged} >= {("v1", "pass")}
    # Each variant counts its own looks (v1 judged twice: once too small, once tested).
    v1 = next(m for m in judged if m.variant == "v1")
    assert (v1.details or {})["looks"] == 1


def test_an_experiments_judges_are_measured_once_for_the_control() -> None:
    from model_rollouts.handlers import experiment as exp_handler

    spec = exp_spec = _exp_spec()
    hist = Vector("value", {("0.5",): 10.0, ("+Inf",): 20.0})
    p = Fake({(svc, "score_bucket"): hist for svc in ("svc-a", "svc-b", "svc-c")})
    control = exp_handler._placeholders(spec.variants[0], "ns", "60s")
    others = {v.name: exp_handler._placeholders(v, "ns", "60s") for v in exp_spec.variants[1:]}
    out = judges.measure_judges(spec.analysis, p, control, others, baseline_name="control control")
    assert len(p.queries) == 3 and set(out) == {"v1", "v2"}
    assert ("spec.analysis.predictionShift[0].buckets", BUCKETS) in exp_handler._queries(spec)
    p_bad = Fake({})
    bad = judges.measure_judges(spec.analysis, p_bad, control, others, baseline_name="control control")
    assert len(p_bad.queries) == 1  # the control failed: the variants are not asked
    problem = bad["v1"][model_judges.key("predictionShift", "scores")].problem
    assert problem is not None and problem.message.startswith("control control ")


def _exp_spec() -> Any:
    from tests.unit.test_experiment_engine import make_spec

    return make_spec(3, analysis={"predictionShift": [SHIFT]})


# -- shadow steps ---------------------------------------------------------------------------------------
SHADOW = [{"shadow": {"percent": 20, "duration": "30s"}}, {"setWeight": 50}, {"setWeight": 100}]


def test_a_shifted_candidate_is_stopped_in_a_shadow_step() -> None:
    d = Driver(spec(SHADOW, analysis={"predictionShift": [SHIFT], "calibration": [CAL]}))
    d.tick()  # the shadow starts: weight 0, 20% mirrored
    assert d.status.shadowPercent == 20
    st = d.tick(_shift_obs(WIDE, 1000, 5000))  # no calibration data: labels need users
    assert st.phase == "RolledBack" and st.history[-1].reason == "PredictionShifted"
    assert "prediction-shift judge scores" in (st.message or "") and "shadow step" in (st.message or "")
    assert max(d.weights) == 0  # no user ever got the candidate's answers


def test_in_a_shadow_step_calibration_waits_for_the_first_weight_and_the_shift_judge_decides() -> None:
    d = Driver(spec(SHADOW, analysis={"predictionShift": [SHIFT], "calibration": [CAL]}))
    d.tick()
    for _ in range(6):
        st = d.tick(_shift_obs(BASE, 1000, 5000))
        if st.weight:
            break
        kinds = {m.kind for m in st.lastAnalysis if not m.carried}
        assert "calibration" not in kinds and "predictionShift" in kinds
    assert st.weight == 50  # the shadow ended after its 30 s: nothing held it
    # From the first weight the calibration judge is measured, and it holds until it has labels.
    st = d.tick(_shift_obs(BASE, 1000, 5000))
    cal = next(m for m in st.lastAnalysis if m.kind == "calibration")
    assert cal.verdict == "error" and st.weight == 50  # not measured here: never a pass
