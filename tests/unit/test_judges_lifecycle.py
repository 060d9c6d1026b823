"""The lifecycle judges' math (analysis/segments, shift, calibration, delay): pure, seeded."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from scipy import stats as sps

from model_rollouts.analysis import calibration as cal
from model_rollouts.analysis import delay, segments, shift, stats
from model_rollouts.analysis.stats import MeanData, ProportionData
from tests.bench import bench_lifecycle as bl

P = ProportionData


def _seg(pairs: dict[str, tuple[tuple[int, int], tuple[int, int]]]) -> dict[str, list[tuple[P, P]]]:
    return {s: [(P(*c), P(*t))] for s, (c, t) in pairs.items()}


# --------------------------------------------------------------------------- segments


def test_a_segment_harmed_beyond_the_margin_fails_although_the_pooled_comparison_passes() -> None:
    # Three regions 0.02 better, one 0.04 worse (margin 0.01): pooled the candidate is better.
    data = _seg(
        {
            "north": ((1000, 10000), (1200, 10000)),
            "south": ((1000, 10000), (1200, 10000)),
            "east": ((1000, 10000), (1200, 10000)),
            "west": ((1000, 10000), (600, 10000)),
        }
    )
    res = segments.judge_segments(data, margin=0.01)
    assert res.pooled.verdict == "pass"
    assert res.verdict == "fail"
    assert res.harmed == ("west",)
    assert "west" in res.reason and "although the pooled comparison passes" in res.reason
    west = {r.segment: r for r in res.segments}["west"]
    assert west.adjusted_p_value <= 0.05 and west.comparison.difference == pytest.approx(-0.04)


def test_equal_candidate_with_enough_data_passes_in_every_segment() -> None:
    data = _seg({s: ((10000, 100000), (10000, 100000)) for s in ("a", "b", "c", "d")})
    res = segments.judge_segments(data, margin=0.01)
    assert res.verdict == "pass"
    assert all(r.status == "pass" for r in res.segments)
    assert res.harmed == () and res.too_small == ()


def test_a_too_small_segment_is_reported_never_passed_and_holds_unless_ignored() -> None:
    data = _seg({s: ((10000, 100000), (10000, 100000)) for s in ("a", "b", "c")})
    data["tiny"] = [(P(5, 50), P(5, 50))]
    res = segments.judge_segments(data, margin=0.01, min_samples=200)
    rows = {r.segment: r for r in res.segments}
    assert rows["tiny"].status == "tooSmall"
    assert "too small" in rows["tiny"].reason and "minSamples 200" in rows["tiny"].reason
    assert res.too_small == ("tiny",)
    # By default a segment that cannot be judged yet holds the pass back.
    assert res.verdict == "inconclusive"
    assert "too small to judge: tiny (held until they reach minSamples)" in res.reason
    ignored = segments.judge_segments(data, margin=0.01, min_samples=200, too_small="ignore")
    assert ignored.verdict == "pass" and "too small to judge: tiny" in ignored.reason
    only_tiny = segments.judge_segments(
        {"tiny": data["tiny"]}, margin=0.01, min_samples=200, too_small="ignore"
    )
    assert only_tiny.verdict == "inconclusive"
    # Even a tiny segment that looks harmed is not failed: it is too small to judge.
    harmed_tiny = segments.judge_segments(
        {**data, "tiny": [(P(40, 50), P(0, 50))]}, margin=0.01, min_samples=200, too_small="ignore"
    )
    assert harmed_tiny.verdict == "pass" and harmed_tiny.too_small == ("tiny",)


def test_holm_across_segments_raises_the_bar_for_a_harm_call() -> None:
    # One segment's harm is significant alone but not after adjusting for four segments.
    harmed = (P(2000, 20000), P(1575, 20000))
    cap = stats.information_cap(0.01)
    alone = segments.judge_segments({"x": [harmed]}, margin=0.01, max_information=cap)
    assert alone.verdict == "fail"
    p = alone.segments[0].harm_p_value
    assert 0.05 / 4 < p <= 0.05
    others = {s: [(P(2000, 20000), P(2000, 20000))] for s in ("a", "b", "c")}
    four = segments.judge_segments({"x": [harmed], **others}, margin=0.01, max_information=cap)
    x = {r.segment: r for r in four.segments}["x"]
    assert x.adjusted_p_value == pytest.approx(min(1.0, 4 * p))
    assert x.status != "fail" and four.verdict != "fail"


def test_segments_combine_epochs_and_accept_means() -> None:
    rng = np.random.default_rng(0)

    def m(mu: float, n: int) -> MeanData:
        x = rng.normal(mu, 1.0, n)
        return MeanData(float(n), float(x.sum()), float((x**2).sum()))

    data = {s: [(m(0, 3000), m(0, 1000)), (m(0.5, 3000), m(0.5, 3000))] for s in ("a", "b")}
    data["c"] = [(m(0, 3000), m(-0.5, 1000)), (m(0.5, 3000), m(0.0, 3000))]
    res = segments.judge_segments(data, margin=0.1, min_samples=100)
    assert res.harmed == ("c",)
    # A common shift between epochs does not count as harm: epochs are strata.
    assert {r.segment: r.status for r in res.segments}["a"] != "fail"


def test_select_segments_values_top_and_other() -> None:
    data = {
        "eu": [(P(10, 100), P(10, 100))],
        "us": [(P(50, 1000), P(50, 1000))],
        "apac": [(P(5, 50), P(5, 50))],
    }
    assert list(segments.select_segments(data)) == ["apac", "eu", "us"]
    top = segments.select_segments(data, top=1)
    assert list(top) == ["us", segments.OTHER]
    other = top[segments.OTHER][0]
    assert isinstance(other[0], P) and other[0].trials == 150 and other[0].successes == 15
    vals = segments.select_segments(data, values=["eu", "missing"])
    assert list(vals) == ["eu", segments.OTHER]
    with pytest.raises(ValueError):
        segments.select_segments(data, values=["eu"], top=1)


def test_segments_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="margin"):
        segments.judge_segments({"a": [(P(1, 10), P(1, 10))]}, margin=0.0)
    with pytest.raises(ValueError, match="at least one segment"):
        segments.judge_segments({}, margin=0.01)
    with pytest.raises(ValueError):
        segments.judge_segments({"a": [(P(1, 10), MeanData(10, 1, 1))]}, margin=0.01)


def test_segment_plan_keeps_joint_power() -> None:
    one = stats.information_cap(0.01, looks=stats.DEFAULT_PLAN_LOOKS)
    four = segments.segment_information_cap(0.01, 4)
    assert four > one
    assert segments.segment_information_cap(0.01, 1) == pytest.approx(one)


def test_segments_type_one_error_over_looks_and_segments_is_at_most_alpha() -> None:
    """Null candidates, four segments, 15 looks each: a false harm call in at most alpha (+2 se)."""
    rng = np.random.default_rng(11)
    runs, looks, per = 120, 15, 400
    base = [0.05, 0.1, 0.2, 0.3]
    false = 0
    for _ in range(runs):
        cum = np.zeros((4, 4))
        for _look in range(looks):
            for i, p in enumerate(base):
                cum[i] += [rng.binomial(per, p), per, rng.binomial(per, p), per]
            data = {str(i): [(P(c[0], c[1]), P(c[2], c[3]))] for i, c in enumerate(cum)}
            if segments.judge_segments(data, margin=0.01).verdict == "fail":
                false += 1
                break
    assert false / runs <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / runs)


# --------------------------------------------------------------------------- shift


def _buckets(counts: list[float], edges: list[float]) -> dict[str, float]:
    cum = np.cumsum(counts)
    out = {f"{e:g}": float(c) for e, c in zip(edges, cum[:-1], strict=False)}
    out["+Inf"] = float(cum[-1])
    return out


def test_bin_counts_from_cumulative_le_buckets_on_common_bounds() -> None:
    b = {"0.5": 10.0, "0.25": 4.0, "+Inf": 12.0, "0.75": 11.0}
    c = {0.5: 3.0, float("inf"): 10.0}
    les, cb, cc = shift.bin_counts(b, c)
    assert list(les) == [0.5, math.inf]
    assert list(cb) == [10.0, 2.0] and list(cc) == [3.0, 7.0]
    # A cumulative count that dips (scrape skew) is no increase, never a negative bin.
    _, cb2, _ = shift.bin_counts({"0.5": 10.0, "1": 9.0, "+Inf": 12.0}, c)
    assert list(cb2) == [10.0, 2.0]
    with pytest.raises(ValueError, match=r"\+Inf"):
        shift.bin_counts({"0.5": 1.0}, c)
    with pytest.raises(ValueError):
        shift.bin_counts({"0.5": -1.0, "+Inf": 2.0}, c)


def test_psi_and_chi_square_match_their_definitions() -> None:
    b, c = np.array([100.0, 300, 600]), np.array([200.0, 300, 500])
    pb, pc = (b + 0.5) / (b + 0.5).sum(), (c + 0.5) / (c + 0.5).sum()
    assert shift.psi(b, c) == pytest.approx(float(np.sum((pc - pb) * np.log(pc / pb))))
    assert shift.psi(b, b) == pytest.approx(0.0)
    x2, dof = shift.chi2_homogeneity(b, c)
    ref = sps.chi2_contingency(np.vstack([b, c]), correction=False)
    assert x2 == pytest.approx(ref.statistic) and dof == ref.dof
    mb, mc = shift.merge_sparse(np.array([1.0, 1, 100, 3, 4]), np.array([0.0, 2, 90, 1, 0]))
    assert list(mb) == [102.0, 7.0] and list(mc) == [92.0, 1.0]
    mb, mc = shift.merge_sparse(np.array([1.0, 1, 100, 0, 1]), np.array([0.0, 2, 90, 1, 0]))
    assert list(mb) == [103.0] and list(mc) == [93.0]  # a remainder joins the last bin


def test_look_alpha_spends_at_most_alpha_over_all_looks() -> None:
    assert sum(shift.look_alpha(0.05, k) for k in range(1, 100000)) <= 0.05
    assert shift.look_alpha(0.05, 1) == pytest.approx(0.025)


def test_shift_same_mean_different_shape_fails_and_unshifted_passes() -> None:
    edges = [round(0.1 * i, 1) for i in range(1, 10)]
    base = bl.beta_bin_probs(0.3, 20)
    wide = bl.beta_bin_probs(0.3, 4)  # the same mean, a different shape
    b = _buckets(list(base * 20000), edges)
    res = shift.judge_shift(b, _buckets(list(wide * 3000), edges))
    assert res.verdict == "fail" and res.psi > 0.25
    same = shift.judge_shift(b, _buckets(list(base * 3000), edges))
    assert same.verdict == "pass" and same.psi < 0.01
    small = shift.judge_shift(b, _buckets(list(wide * 100), edges), min_samples=500)
    assert small.verdict == "inconclusive" and "not enough scores" in small.reason


def test_shift_false_stops_over_thirty_looks_are_at_most_alpha() -> None:
    rng = np.random.default_rng(5)
    edges = [round(0.1 * i, 1) for i in range(1, 10)]
    p = bl.beta_bin_probs(0.3, 20)
    runs, false = 200, 0
    for _ in range(runs):
        cb, cc = np.zeros(10), np.zeros(10)
        for look in range(1, 31):
            cb += rng.multinomial(900, p)
            cc += rng.multinomial(100, p)
            v = shift.judge_shift(_buckets(list(cb), edges), _buckets(list(cc), edges), look=look).verdict
            if v != "inconclusive":
                false += v == "fail"
                break
    assert false / runs <= 0.05


# --------------------------------------------------------------------------- calibration

EDGES = tuple(round(0.1 * i, 1) for i in range(1, 11))


def _arm(rng: np.random.Generator, n: int, bias: float) -> cal.CalibrationBins:
    q = rng.beta(2.4, 5.6, n)  # the true probability of a positive outcome
    s = np.clip(q + bias, 0.0, 1.0)  # the model's predicted probability
    y = rng.random(n) < q
    b = np.minimum(np.searchsorted(np.array(EDGES), s, side="left"), 9)
    return cal.CalibrationBins(
        EDGES,
        tuple(np.bincount(b, weights=y, minlength=10)),
        tuple(np.bincount(b, minlength=10).astype(float)),
        tuple(np.bincount(b, weights=s, minlength=10)),
    )


def test_ece_of_known_counts() -> None:
    # Predicted 0.25 in one bin, 0.75 in the other; observed 0.25 and 0.65.
    bins = cal.CalibrationBins((0.5, 1.0), (25.0, 65.0), (100.0, 100.0))
    assert cal.ece(bins) == pytest.approx(0.5 * 0.0 + 0.5 * 0.1)
    with_sums = cal.CalibrationBins((0.5, 1.0), (25.0, 65.0), (100.0, 100.0), (30.0, 70.0))
    assert cal.ece(with_sums) == pytest.approx(0.5 * 0.05 + 0.5 * 0.05)
    built = cal.calibration_bins({"0.5": 25, "1": 65}, {"0.5": 75, "1": 35})
    assert built == bins


def test_bias_reduced_ece_does_not_penalise_the_smaller_arm() -> None:
    rng = np.random.default_rng(1)
    big, small = _arm(rng, 50000, 0.0), _arm(rng, 400, 0.0)
    assert cal.ece(small) > cal.ece(big) + 0.02  # the plug-in ECE is inflated by noise
    assert cal.ece_debiased(small)[0] < 0.02
    res = cal.judge_calibration(big, small, min_samples=300)
    assert res.verdict != "fail"


def test_calibration_judge_fails_a_miscalibrated_candidate_and_passes_a_calibrated_one() -> None:
    rng = np.random.default_rng(2)
    stable = _arm(rng, 20000, 0.0)
    worse = cal.judge_calibration(stable, _arm(rng, 5000, 0.1))
    assert worse.verdict == "fail" and worse.ece_candidate == pytest.approx(0.1, abs=0.02)
    assert "less calibrated" in worse.reason
    good = cal.judge_calibration(stable, _arm(rng, 5000, 0.0))
    assert good.verdict == "pass"
    few = cal.judge_calibration(stable, _arm(rng, 100, 0.1))
    assert few.verdict == "inconclusive"


def test_calibration_rejects_bad_bins() -> None:
    with pytest.raises(ValueError):
        cal.CalibrationBins((0.5, 0.4), (1.0, 1.0), (2.0, 2.0))
    with pytest.raises(ValueError):
        cal.CalibrationBins((0.5, 1.0), (3.0, 1.0), (2.0, 2.0))
    with pytest.raises(ValueError, match="margin"):
        cal.judge_calibration(
            _arm(np.random.default_rng(0), 10, 0), _arm(np.random.default_rng(0), 10, 0), margin=0
        )


# --------------------------------------------------------------------------- label delay

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_no_label_window_before_the_delay_has_passed() -> None:
    assert delay.label_window(T0, T0 + timedelta(minutes=9), timedelta(minutes=10)) is None
    assert delay.first_verdict_at(T0, 600) == T0 + timedelta(minutes=10)
    w = delay.label_window(T0, T0 + timedelta(minutes=25), timedelta(minutes=10))
    assert w is not None
    assert w.labels_from == T0 + timedelta(minutes=10) and w.labels_to == T0 + timedelta(minutes=25)
    assert w.trials_offset_seconds == 600 and w.seconds == 900
    zero = delay.label_window(T0, T0 + timedelta(minutes=1), 0)
    assert zero is not None and zero.labels_from == T0 and zero.trials_offset_seconds == 0
    with pytest.raises(ValueError):
        delay.label_window(T0, T0, -1)


def test_delayed_proportion_caps_labels_at_trials() -> None:
    assert delay.delayed_proportion(12, 10) == P(10, 10)
    assert delay.delayed_proportion(-1, 10) == P(0, 10)


def test_label_windows_are_unbiased_where_the_undelayed_count_is_not() -> None:
    """Delays on [0, 10 min) across weight steps 10% -> 25% -> 50%: at the last look the delayed
    windows estimate both rates without bias; the undelayed count underestimates the candidate's
    rate more than the stable's (its traffic is newer)."""
    sim = bl.simulate_delay(np.random.default_rng(3), 60, 0.0)
    ticks = sim["n_c"].shape[1]
    ours, naive = [], []
    for r in range(60):
        for delayed, out in ((True, ours), (False, naive)):
            strata = bl._delay_strata(sim, r, ticks, delayed)
            c = stats.compare_proportions_stratified(strata, test="nonInferiority", margin=0.01)
            out.append((c.control_estimate, c.treatment_estimate, c.difference))
    o, n = np.array(ours), np.array(naive)
    assert abs(o[:, 0].mean() - bl.DELAY_RATE) < 0.001
    assert abs(o[:, 1].mean() - bl.DELAY_RATE) < 0.002
    assert abs(o[:, 2].mean()) < 0.002
    assert n[:, 1].mean() < bl.DELAY_RATE - 0.005  # the undelayed candidate rate is too low
    assert n[:, 2].mean() < -0.005  # and the difference is biased against the candidate


def test_segment_rows_for_status() -> None:
    data = _seg({s: ((10000, 100000), (10000, 100000)) for s in ("a", "b")})
    data["tiny"] = [(P(5, 50), P(5, 50))]
    table = segments.rows(segments.judge_segments(data, margin=0.01, min_samples=200))
    by = {r.segment: r for r in table}
    assert by["a"].status == "pass" and by["a"].stableN == 100000 and by["a"].pValue is not None
    assert by["tiny"].status == "tooSmall" and by["tiny"].pValue is None and by["tiny"].candidateN == 50


def test_segments_spec_model() -> None:
    from pydantic import ValidationError

    from model_rollouts.api.segments import Segments

    s = Segments.model_validate({"label": "region", "values": ["eu-west", "us"]})
    assert s.minSamples == 200
    for bad in (
        {"label": "region", "values": ["eu"]},
        {"label": "region", "values": ["eu", "eu"]},
        {"label": "region", "values": ["EU", "us"]},
        {"label": "region", "values": ['eu"}', "us"]},
        {"label": "re-gion", "values": ["eu", "us"]},
        {"label": "region", "values": ["eu", "us"], "minSamples": 0},
    ):
        with pytest.raises(ValidationError):
            Segments.model_validate(bad)


def test_segmented_comparison_verdict_combines_pooled_and_segments() -> None:
    assert segments.combine("pass", "fail") == "fail"
    assert segments.combine("fail", "pass") == "fail"
    assert segments.combine("pass", "inconclusive") == "inconclusive"
    assert segments.combine("pass", "pass") == "pass"
    assert segments.combine("noData", "fail") == "noData"
    data = _seg(
        {
            "north": ((1000, 10000), (1200, 10000)),
            "south": ((1000, 10000), (1200, 10000)),
            "east": ((1000, 10000), (1200, 10000)),
            "west": ((1000, 10000), (600, 10000)),
        }
    )
    from model_rollouts.api.segments import Segments

    spec = segments.SegmentsSpec(
        Segments(label="region", values=list(data)), margin=0.01, better="higher", alpha=0.05
    )
    f = segments.judge(spec, data)
    assert f.verdict == "fail" and segments.combine("pass", f.verdict) == "fail"
    assert f.message.startswith("region west harmed beyond the margin")
    assert f.numbers["segmentsHarmed"] == 1 and f.numbers["segments"] == 4
    table = segments.rows(segments.evaluate(spec, data))
    assert [r.segment for r in table if r.status == "fail"] == ["west"]


def test_bench_lifecycle_scenarios_report_the_shared_keys() -> None:
    res = bl.run_all(6, 4, seed=1, workers=1)
    assert set(res) == {"segments", "label_delay", "prediction_shift"}
    for row in res.values():
        ours = row["ours"]
        assert {"false_rollback", "bad_promoted", "runs", "miss", "mc_se"} <= set(ours)
        assert ours["runs"] == {"null": 6, "bad": 4}
    assert "undelayed" in res["label_delay"]["ours"] and "power" in res["segments"]["ours"]
    assert res["prediction_shift"]["ours"]["true_psi_bad"] == pytest.approx(0.2)


def test_shift_and_calibration_judges_behind_the_judge_interface() -> None:
    from model_rollouts.analysis.judge import Arms
    from model_rollouts.api.calibration import Calibration
    from model_rollouts.api.shift import PredictionShift

    edges = [round(0.1 * i, 1) for i in range(1, 10)]
    base, wide = bl.beta_bin_probs(0.3, 20), bl.beta_bin_probs(0.3, 4)
    spec = shift.ShiftSpec(PredictionShift(name="scores", buckets="q"))
    b = _buckets(list(base * 20000), edges)
    f = shift.judge(spec, Arms(b, _buckets(list(wide * 3000), edges)))
    assert f.verdict == "fail" and f.value is not None and f.value > 0.25 and "scores:" in f.message
    assert shift.judge(spec, Arms(b, None)).verdict == "noData"
    assert shift.judge(spec, Arms(b, {"0.5": 1.0})).verdict == "error"  # no +Inf bucket

    rng = np.random.default_rng(4)
    cspec = cal.CalibrationSpec(Calibration(name="ece", outcomes="q"))
    stable = _arm(rng, 20000, 0.0)
    g = cal.judge(cspec, Arms(stable, _arm(rng, 5000, 0.1)))
    assert g.verdict == "fail" and g.numbers["eceCandidate"] > 0.08
    assert cal.judge(cspec, Arms(None, stable)).verdict == "noData"
