"""The prediction-shift and calibration judges on the real stack (issue 20).

One stack: a stable and a candidate model server that both emit their prediction-score histogram and
calibration counters; per test the candidate's score distribution is changed through ``/admin``:

- same mean, a different shape (``score_concentration`` 3 against the stable's 20): the prediction-shift
  judge stops it at its first weight;
- the same distribution: both judges pass and the rollout is promoted;
- the same accuracy, every score 0.1 too high (``score_bias``, ECE up by about 0.1): the calibration
  judge rolls it back, and the reason names it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from tests.harness.cluster import ControlPlane
from tests.harness.objects import (
    CANDIDATE,
    EXPERIMENTS,
    ROUTE,
    STABLE,
    delete_all,
    experiment,
    phase,
    rollout,
    status,
)
from tests.harness.stack import Stack, httproute

P = "modelrollouts"
#: The stable's score concentration: Beta(mean 0.6, concentration 20), scores mostly 0.4 .. 0.8.
STABLE_CONCENTRATION = 20.0
SCORE_BUCKETS = 'sum by (le) (increase(model_prediction_score_bucket{service="{{ service }}"}[{{ window }}]))'
OUTCOMES = (
    "sum by (bin, outcome) (increase(model_calibration_outcomes_total"
    '{service="{{ service }}"}[{{ window }}]))'
)
SCORE_SUMS = (
    'sum by (bin) (increase(model_calibration_score_sum_total{service="{{ service }}"}[{{ window }}]))'
)
SHIFT = {"name": "score-shape", "buckets": SCORE_BUCKETS, "maxPSI": 0.1}
CALIBRATION = {"name": "calibration", "outcomes": OUTCOMES, "scoreSums": SCORE_SUMS, "margin": 0.05}


@pytest.fixture(scope="module")
def stack(real_components: None) -> Iterator[Stack]:
    lifecycle = {"error_rate": 0.0, "score_concentration": STABLE_CONCENTRATION}
    with Stack(
        variants={STABLE: dict(lifecycle), CANDIDATE: dict(lifecycle)},
        route=ROUTE,
        rps=50,
        max_seconds=900,
        cluster=ControlPlane(),
    ) as s:
        s.start_operator()
        yield s


@pytest.fixture()
def fresh(stack: Stack) -> Iterator[Stack]:
    stack.servers[CANDIDATE].set(score_concentration=STABLE_CONCENTRATION, score_bias=0.0)
    stack.apply(httproute(ROUTE, stack.namespace, {STABLE: 100, CANDIDATE: 0}))
    yield stack
    delete_all(stack, P, EXPERIMENTS)


def _judged(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(m for m in status(obj).get("lastAnalysis") or [] if m["kind"] == kind)


def _weights_set(obj: dict[str, Any]) -> list[int]:
    return [h["weight"] for h in status(obj).get("history") or [] if h.get("reason") == "StepAdvanced"]


def _seconds(obj: dict[str, Any]) -> float:
    """From the rollout's start to its last transition, by its own history."""
    times = [datetime.fromisoformat(h["time"].replace("Z", "+00:00")) for h in status(obj)["history"]]
    return (times[-1] - times[0]).total_seconds()


def _finished(o: dict[str, Any]) -> bool:
    return phase(o) in ("Promoted", "RolledBack", "Aborted")


def test_a_shifted_score_distribution_is_stopped_at_its_first_weight(fresh: Stack) -> None:
    assert fresh.prom is not None
    fresh.servers[CANDIDATE].set(score_concentration=3.0)  # same mean 0.6, much wider
    steps = [{"setWeight": 40}, {"setWeight": 100}]
    fresh.apply(
        rollout("shifted", fresh.prom.url, steps, compare=False, analysis={"predictionShift": [SHIFT]})
    )
    obj = fresh.wait_for(P, "shifted", _finished, 180)
    st = status(obj)
    assert st["phase"] == "RolledBack", st.get("message")
    last = st["history"][-1]
    assert last["reason"] == "PredictionShifted"
    assert "prediction-shift judge score-shape" in st["message"]
    assert max(_weights_set(obj), default=0) == 40  # never past its first weight
    m = _judged(obj, "predictionShift")
    assert m["verdict"] == "fail" and m["name"] == "score-shape"
    d = m["details"]
    assert d["psi"] >= 0.1 and d["psiDebiased"] >= 0.1 and d["pValue"] <= d["alpha"]
    assert d["baselineN"] >= 500 and d["candidateN"] >= 500
    assert fresh.route_weights()[CANDIDATE] == 0
    n = f"{d['baselineN']:.0f}/{d['candidateN']:.0f}"
    print(
        f"\nshifted: PSI {d['psi']:.3f}, p {d['pValue']:.2g}, n {n}, rolled back after {_seconds(obj):.0f}s"
    )


def test_an_unshifted_calibrated_candidate_passes_both_judges_and_is_promoted(fresh: Stack) -> None:
    assert fresh.prom is not None
    steps = [{"setWeight": 50}, {"setWeight": 100}]
    analysis = {"predictionShift": [SHIFT], "calibration": [CALIBRATION]}
    fresh.apply(rollout("unshifted", fresh.prom.url, steps, compare=False, analysis=analysis))
    verdicts: list[tuple[str, str]] = []

    def poll(o: dict[str, Any]) -> None:
        for m in status(o).get("lastAnalysis") or []:
            if m["kind"] in ("predictionShift", "calibration") and not m.get("carried"):
                verdicts.append((m["kind"], m["verdict"]))

    obj = fresh.wait_for(P, "unshifted", _finished, 300, on_poll=poll)
    st = status(obj)
    assert st["phase"] == "Promoted", st.get("message")
    # Both judges passed at weight 50 before the move to 100; nothing failed on the way.
    assert ("predictionShift", "pass") in verdicts and ("calibration", "pass") in verdicts
    assert not any(v == "fail" for _, v in verdicts)
    shift, cal = _judged(obj, "predictionShift"), _judged(obj, "calibration")
    assert shift["verdict"] == "pass" and cal["verdict"] == "pass"
    assert shift["details"]["psi"] < 0.1
    assert abs(cal["details"]["eceCandidate"] - cal["details"]["eceBaseline"]) < 0.05
    print(f"\nunshifted: PSI {shift['details']['psi']:.4f}; ECE {cal['details']['eceCandidate']:.3f} vs "
          f"{cal['details']['eceBaseline']:.3f}; promoted after {_seconds(obj):.0f}s")  # fmt: skip


def test_a_miscalibrated_candidate_is_rolled_back_by_the_calibration_judge(fresh: Stack) -> None:
    assert fresh.prom is not None
    fresh.servers[CANDIDATE].set(score_bias=0.1)  # same outcomes (accuracy), every score 0.1 too high
    steps = [{"setWeight": 50}, {"setWeight": 100}]
    fresh.apply(
        rollout(
            "miscalibrated", fresh.prom.url, steps, compare=False, analysis={"calibration": [CALIBRATION]}
        )
    )
    obj = fresh.wait_for(P, "miscalibrated", _finished, 180)
    st = status(obj)
    assert st["phase"] == "RolledBack", st.get("message")
    assert st["history"][-1]["reason"] == "CalibrationWorse"
    assert "calibration judge calibration" in st["message"]
    promoted = next(c for c in st["conditions"] if c["type"] == "Promoted")
    assert promoted["status"] == "False" and promoted["reason"] == "CalibrationWorse"
    m = _judged(obj, "calibration")
    d = m["details"]
    assert m["verdict"] == "fail"
    # The judge's own (bias-reduced) difference is at least the margin and its interval above 0; the
    # plug-in ECEs show the 0.1 shift of every score.
    assert d["difference"] >= 0.05 and d["ciLow"] > 0
    assert 0.07 <= d["eceCandidate"] <= 0.15 and d["eceCandidate"] > d["eceBaseline"]
    assert fresh.route_weights()[CANDIDATE] == 0
    ci = f"[{d['ciLow']:+.3f}, {d['ciHigh']:+.3f}]"
    print(f"\nmiscalibrated: ECE {d['eceCandidate']:.3f} vs {d['eceBaseline']:.3f}, interval {ci}, "
          f"rolled back after {_seconds(obj):.0f}s")  # fmt: skip


def test_the_api_server_refuses_a_judge_query_that_reads_the_same_series_for_both_arms(fresh: Stack) -> None:
    assert fresh.prom is not None
    same = {**SHIFT, "buckets": "sum by (le) (increase(model_prediction_score_bucket[{{ window }}]))"}
    doc = rollout(
        "same", fresh.prom.url, [{"setWeight": 40}], compare=False, analysis={"predictionShift": [same]}
    )
    with pytest.raises(ApiException) as e:
        fresh.apply(doc)
    assert e.value.status == 422
    assert "predictionShift[0].buckets" in str(e.value.body) and "{{ service }}" in str(e.value.body)


def test_a_judge_without_data_holds_the_weight_and_never_promotes(fresh: Stack) -> None:
    assert fresh.prom is not None
    missing = {**SHIFT, "buckets": SCORE_BUCKETS.replace("model_prediction_score", "model_no_such_score")}
    steps = [{"setWeight": 40}, {"setWeight": 100}]
    fresh.apply(
        rollout("nodata", fresh.prom.url, steps, compare=False, analysis={"predictionShift": [missing]})
    )
    seen: list[str] = []

    def held(o: dict[str, Any]) -> bool:
        last = [m for m in status(o).get("lastAnalysis") or [] if m["kind"] == "predictionShift"]
        if last and status(o).get("lastAnalysisTime") not in seen:
            seen.append(status(o)["lastAnalysisTime"])
        return len(seen) >= 4

    obj = fresh.wait_for(P, "nodata", held, 120)
    st = status(obj)
    assert st["phase"] == "Progressing" and st["weight"] == 40
    m = _judged(obj, "predictionShift")
    assert m["verdict"] == "noData" and "stable the query returned no series" in m["message"]
    assert "score-shape: stable the query returned no series" in st["message"]
    assert fresh.route_weights()[CANDIDATE] == 40


def test_an_experiment_drops_a_variant_whose_scores_shifted(fresh: Stack) -> None:
    assert fresh.prom is not None
    fresh.servers[CANDIDATE].set(score_concentration=3.0)
    variants = [
        {"name": "control", "service": STABLE, "control": True},
        {"name": "wide", "service": CANDIDATE},
    ]
    doc = experiment(
        "shifted-exp",
        fresh.prom.url,
        variants,
        ROUTE,
        analysis={"predictionShift": [SHIFT]},
        stoppingRules={"minSamplesPerVariant": 100000},  # no primary-metric decision in this test
    )
    fresh.apply(doc)
    obj = fresh.wait_for(EXPERIMENTS, "shifted-exp", lambda o: phase(o) in ("RolledBack", "Concluded"), 180)
    st = status(obj)
    wide = next(v for v in st["variants"] if v["name"] == "wide")
    assert not wide["active"] and wide["weight"] == 0
    assert "wide: prediction-shift judge score-shape: PSI" in wide["reason"]
    assert st["phase"] == "RolledBack", st.get("message")
    m = next(m for m in st["lastAnalysis"] if m["kind"] == "predictionShift")
    assert m["variant"] == "wide" and m["verdict"] == "fail" and m["details"]["psi"] >= 0.1
    assert fresh.route_weights()[CANDIDATE] == 0
