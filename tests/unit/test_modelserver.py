"""The test model server, run as a real process on a loopback port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.modelserver import (
    DEFAULT_SEGMENTS,
    LIFECYCLE_METRIC_NAMES,
    METRIC_NAMES,
    REPO_ROOT,
    ModelServerProcess,
    ModelState,
    ParamError,
    Params,
)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, frozenset(labels.items()))]


@pytest.fixture(scope="module")
def server() -> Iterator[ModelServerProcess]:
    with ModelServerProcess("cand", seed=7, latency_ms=1.0, max_seconds=120) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _reset(server: ModelServerProcess) -> Iterator[None]:
    yield
    if server.running:
        server.set(error_rate=0.0, latency_ms=1.0)


def test_port_zero_picks_a_port_and_healthz(server: ModelServerProcess) -> None:
    assert server.url == f"http://127.0.0.1:{server.port}"
    assert server.port > 0
    status, body = server.request("GET", "/healthz")
    assert status == 200
    assert body.strip() == b"ok"


def test_predict_returns_a_prediction(server: ModelServerProcess) -> None:
    for payload in ({"features": [1, 2, 3]}, None):
        status, body = server.request("POST", "/predict", payload)
        assert status == 200
        reply = json.loads(body)
        assert reply["variant"] == "cand"
        assert isinstance(reply["request_id"], str) and reply["request_id"]
        assert isinstance(reply["prediction"], float)
        assert reply["satisfaction"] == pytest.approx(0.6)
        assert reply["reward_mean"] == pytest.approx(1.0)
        assert reply["reward_sd"] == pytest.approx(0.5)


def test_metrics_expose_the_contracted_names(server: ModelServerProcess) -> None:
    server.request("POST", "/predict", {})
    text = server.metrics_text()
    for name in METRIC_NAMES:
        assert f"{name}" in text
    s = samples(text)
    label = ("variant", "cand")
    for code in ("200", "500"):
        assert ("model_requests_total", frozenset({label, ("code", code)})) in s
    for fb in ("positive", "negative"):
        assert ("model_feedback_total", frozenset({label, ("feedback", fb)})) in s
    for name in ("model_reward_sum_total", "model_reward_count_total", "model_reward_squares_total"):
        assert (name, frozenset({label})) in s
    assert value(text, "model_drift_score", variant="cand") == pytest.approx(0.05)
    assert value(text, "model_calibration_error", variant="cand") == pytest.approx(0.02)
    assert value(text, "model_request_duration_seconds_count", variant="cand") >= 1
    assert ("model_request_duration_seconds_bucket", frozenset({label, ("le", "0.001")})) in s
    assert ("model_request_duration_seconds_bucket", frozenset({label, ("le", "2.0")})) in s
    assert not any(name.endswith("_created") for name, _ in s)


def test_error_rate_one_makes_every_predict_fail(server: ModelServerProcess) -> None:
    before = value(server.metrics_text(), "model_requests_total", variant="cand", code="500")
    new = server.set(error_rate=1.0)
    assert new["error_rate"] == 1.0
    assert server.get_params()["error_rate"] == 1.0
    for _ in range(5):
        status, _ = server.request("POST", "/predict", {})
        assert status == 500
    after = value(server.metrics_text(), "model_requests_total", variant="cand", code="500")
    assert after - before == 5
    server.set(error_rate=0.0)
    assert server.request("POST", "/predict", {})[0] == 200


def test_latency_is_applied_and_observed(server: ModelServerProcess) -> None:
    server.set(latency_ms=60.0)
    t0 = time.monotonic()
    assert server.request("POST", "/predict", {})[0] == 200
    assert time.monotonic() - t0 >= 0.05
    text = server.metrics_text()
    # the 60 ms request lands above the 50 ms bucket
    le_50 = value(text, "model_request_duration_seconds_bucket", variant="cand", le="0.05")
    count = value(text, "model_request_duration_seconds_count", variant="cand")
    assert count - le_50 >= 1


def test_feedback_counters_move(server: ModelServerProcess) -> None:
    text = server.metrics_text()
    pos0 = value(text, "model_feedback_total", variant="cand", feedback="positive")
    neg0 = value(text, "model_feedback_total", variant="cand", feedback="negative")
    sum0 = value(text, "model_reward_sum_total", variant="cand")
    n0 = value(text, "model_reward_count_total", variant="cand")
    sq0 = value(text, "model_reward_squares_total", variant="cand")
    rid = json.loads(server.request("POST", "/predict", {})[1])["request_id"]
    for positive, reward in ((True, 2.0), (True, None), (False, 3.0), (False, -1.0)):
        body: dict[str, object] = {"request_id": rid, "positive": positive}
        if reward is not None:
            body["reward"] = reward
        status, payload = server.request("POST", "/feedback", body)
        assert status == 204
        assert payload == b""
    text = server.metrics_text()
    assert value(text, "model_feedback_total", variant="cand", feedback="positive") - pos0 == 2
    assert value(text, "model_feedback_total", variant="cand", feedback="negative") - neg0 == 2
    # a negative reward lowers the sum: Welch/mean queries must use delta(), not increase()
    assert value(text, "model_reward_sum_total", variant="cand") - sum0 == pytest.approx(4.0)
    assert value(text, "model_reward_count_total", variant="cand") - n0 == 3
    assert value(text, "model_reward_squares_total", variant="cand") - sq0 == pytest.approx(14.0)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"error_rate": 1.5}, "error_rate"),
        ({"positive_rate": -0.1}, "positive_rate"),
        ({"calibration_error": 2}, "calibration_error"),
        ({"latency_ms": -1}, "latency_ms"),
        ({"reward_sd": -0.5}, "reward_sd"),
        ({"drift": "high"}, "drift"),
        ({"error_rate": True}, "error_rate"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_invalid_admin_is_rejected_naming_the_field(
    server: ModelServerProcess, body: dict[str, object], field: str
) -> None:
    before = server.get_params()
    status, payload = server.request("POST", "/admin", body)
    assert status == 400
    reply = json.loads(payload)
    assert reply["field"] == field
    assert field in reply["error"]
    assert server.get_params() == before  # nothing applied
    with pytest.raises(ValueError, match=field):
        server.set(**body)  # type: ignore[arg-type]


def test_invalid_bodies(server: ModelServerProcess) -> None:
    assert server.request("POST", "/admin", ["error_rate", 1])[0] == 400
    assert server.request("POST", "/feedback", {"positive": True})[0] == 400
    assert server.request("POST", "/feedback", {"request_id": "x", "positive": "yes"})[0] == 400
    assert server.request("POST", "/feedback", {"request_id": "x", "positive": True, "reward": "1"})[0] == 400
    assert server.request("GET", "/nope")[0] == 404


def test_admin_changes_several_params_at_once(server: ModelServerProcess) -> None:
    new = server.set(positive_rate=0.2, reward_mean=-1.5, drift=0.4, calibration_error=0.3)
    try:
        assert new["positive_rate"] == 0.2
        reply = json.loads(server.request("POST", "/predict", {})[1])
        assert reply["satisfaction"] == pytest.approx(0.2)
        assert reply["reward_mean"] == pytest.approx(-1.5)
        text = server.metrics_text()
        assert value(text, "model_drift_score", variant="cand") == pytest.approx(0.4)
        assert value(text, "model_calibration_error", variant="cand") == pytest.approx(0.3)
    finally:
        server.set(**{k: v for k, v in vars(Params()).items() if k != "latency_ms"})


def test_param_validation_in_process() -> None:
    with pytest.raises(ParamError) as info:
        Params().updated({"latency_ms": float("nan")})
    assert info.value.field == "latency_ms"
    with pytest.raises(ParamError):
        ModelServerProcess("x", error_rate=3.0)


def test_stop_leaves_no_process() -> None:
    srv = ModelServerProcess("gone", max_seconds=60).start()
    pid = srv.pid
    assert srv.running
    code = srv.stop()
    assert code == 0  # SIGTERM is a clean shutdown
    assert not srv.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert srv.stop() == 0  # idempotent


def test_exits_by_itself_after_max_seconds() -> None:
    srv = ModelServerProcess("short", max_seconds=0.5).start()
    assert srv.proc is not None
    assert srv.proc.wait(timeout=10) == 0
    srv.stop()


def test_cli_rejects_bad_arguments() -> None:
    for extra in (["--error-rate", "2"], ["--host", "10.1.2.3"], ["--max-seconds", "0"]):
        proc = subprocess.run(
            [sys.executable, "-m", "tests.harness.modelserver", "--variant", "x", *extra],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert proc.returncode == 2, (extra, proc.stderr)
        assert proc.stdout == ""


def test_sigint_is_a_clean_shutdown() -> None:
    srv = ModelServerProcess("int", max_seconds=60).start()
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGINT)
    assert srv.proc.wait(timeout=10) == 0
    srv.stop()


# ---- model lifecycle signals: segments, scores, calibration, label delay ---------------------------


def test_existing_metrics_come_first_and_lifecycle_metrics_follow(server: ModelServerProcess) -> None:
    server.request("POST", "/predict", {})
    text = server.metrics_text()
    first_new = min(text.index(f"# HELP {n}") for n in LIFECYCLE_METRIC_NAMES)
    for name in METRIC_NAMES:
        assert text.index(f"# HELP {name}") < first_new
    s = samples(text)
    label = ("variant", "cand")
    for region in DEFAULT_SEGMENTS:
        assert ("model_segment_requests_total", frozenset({label, ("region", region)})) in s
        for fb in ("positive", "negative"):
            key = ("model_segment_feedback_total", frozenset({label, ("region", region), ("feedback", fb)}))
            assert key in s
    for b in ("0.1", "0.5", "1"):
        for outcome in ("positive", "negative"):
            key = ("model_calibration_outcomes_total", frozenset({label, ("bin", b), ("outcome", outcome)}))
            assert key in s
        assert ("model_calibration_score_sum_total", frozenset({label, ("bin", b)})) in s
    assert ("model_prediction_score_bucket", frozenset({label, ("le", "0.1")})) in s
    assert value(text, "model_prediction_score_count", variant="cand") >= 1


@pytest.fixture(scope="module")
def life() -> Iterator[ModelServerProcess]:
    with ModelServerProcess(
        "life",
        seed=11,
        latency_ms=0.0,
        max_seconds=120,
        segments=("eu", "us", "apac", "latam"),
        segment_positive_rate={"latam": 0.2},
        segment_share={"apac": 0.0},
    ) as srv:
        yield srv


def _predict(srv: ModelServerProcess, body: dict[str, object] | None = None) -> dict[str, object]:
    status, raw = srv.request("POST", "/predict", body or {})
    assert status == 200
    reply: dict[str, object] = json.loads(raw)
    return reply


def test_segments_have_their_own_quality_share_and_counters(life: ModelServerProcess) -> None:
    seen = {_predict(life)["region"] for _ in range(60)}
    assert seen == {"eu", "us", "latam"}  # apac has share 0
    reply = _predict(life, {"region": "latam"})
    assert reply["region"] == "latam" and reply["satisfaction"] == pytest.approx(0.2)
    assert reply["score"] == pytest.approx(0.2)  # concentration 0: the score is the rate itself
    eu = _predict(life, {"region": "eu"})
    assert eu["satisfaction"] == pytest.approx(0.6)
    before = samples(life.metrics_text())
    for positive in (True, False, False):
        rid = _predict(life, {"region": "latam"})["request_id"]
        assert life.request("POST", "/feedback", {"request_id": rid, "positive": positive})[0] == 204
    text = life.metrics_text()

    def delta(name: str, **labels: str) -> float:
        key = (name, frozenset({("variant", "life"), *labels.items()}))
        return samples(text)[key] - before[key]

    assert delta("model_segment_requests_total", region="latam") == 3
    assert delta("model_segment_feedback_total", region="latam", feedback="positive") == 1
    assert delta("model_segment_feedback_total", region="latam", feedback="negative") == 2
    assert delta("model_segment_feedback_total", region="eu", feedback="negative") == 0
    # Scores of 0.2 fall in the bin with upper bound 0.2.
    assert delta("model_calibration_outcomes_total", bin="0.2", outcome="negative") == 2
    assert delta("model_calibration_score_sum_total", bin="0.2") == pytest.approx(0.6)


def test_score_spread_and_bias_keep_the_outcome_rate(life: ModelServerProcess) -> None:
    life.set(score_concentration=5.0, score_bias=0.1)
    try:
        replies = [_predict(life, {"region": "eu"}) for _ in range(300)]
    finally:
        life.set(score_concentration=0.0, score_bias=0.0)
    truth = [float(r["satisfaction"]) for r in replies]  # type: ignore[arg-type]
    score = [float(r["score"]) for r in replies]  # type: ignore[arg-type]
    assert 0.5 < sum(truth) / len(truth) < 0.7  # the outcome rate stays the segment's rate
    assert len({round(t, 6) for t in truth}) > 100  # a spread of true rates
    for t, sc in zip(truth, score, strict=True):
        assert sc == pytest.approx(min(1.0, t + 0.1))  # miscalibrated by +0.1


def test_labels_are_counted_after_their_delay(life: ModelServerProcess) -> None:
    life.set(label_delay_min_s=1.0, label_delay_max_s=1.0)
    try:
        rid = _predict(life)["request_id"]
        before = value(life.metrics_text(), "model_feedback_total", variant="life", feedback="positive")
        t0 = time.monotonic()
        assert life.request("POST", "/feedback", {"request_id": rid, "positive": True})[0] == 204
        assert time.monotonic() - t0 < 0.8  # the reply does not wait for the label
        now = value(life.metrics_text(), "model_feedback_total", variant="life", feedback="positive")
        assert now == before
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if (
                value(life.metrics_text(), "model_feedback_total", variant="life", feedback="positive")
                > before
            ):
                break
            time.sleep(0.1)
        assert time.monotonic() - t0 >= 0.9
        after = value(life.metrics_text(), "model_feedback_total", variant="life", feedback="positive")
        assert after == before + 1
    finally:
        life.set(label_delay_min_s=0.0, label_delay_max_s=0.0)


def test_label_delay_distributions() -> None:
    state = ModelState("x", Params(), seed=1)
    uniform = Params(label_delay_min_s=60.0, label_delay_max_s=600.0)
    draws = [state.label_delay(uniform) for _ in range(4000)]
    assert min(draws) >= 60 and max(draws) <= 600
    assert sum(draws) / len(draws) == pytest.approx(330, rel=0.05)
    expo = Params(label_delay_max_s=600.0, label_delay_mean_s=120.0)
    draws = [state.label_delay(expo) for _ in range(4000)]
    assert min(draws) >= 0 and max(draws) <= 600
    # The mean of an exponential (mean 120 s) truncated at 600 s is about 115.9 s.
    assert sum(draws) / len(draws) == pytest.approx(115.9, rel=0.06)
    assert state.label_delay(Params()) == 0.0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"score_bias": 2}, "score_bias"),
        ({"score_concentration": -1}, "score_concentration"),
        ({"label_delay_max_s": -1}, "label_delay_max_s"),
        ({"label_delay_min_s": 10, "label_delay_max_s": 5}, "label_delay_max_s"),
        ({"segment_positive_rate": {"eu": 1.5}}, "segment_positive_rate"),
        ({"segment_share": [1, 2]}, "segment_share"),
    ],
)
def test_invalid_lifecycle_params_are_rejected_naming_the_field(
    life: ModelServerProcess, body: dict[str, object], field: str
) -> None:
    before = life.get_params()
    status, payload = life.request("POST", "/admin", body)
    assert status == 400
    assert json.loads(payload)["field"] == field
    assert life.get_params() == before


def test_cli_rejects_bad_segments() -> None:
    for extra in (["--segments", "a,,b"], ["--segments", "a,a"], ["--segment-share", "[1]"]):
        proc = subprocess.run(
            [sys.executable, "-m", "tests.harness.modelserver", "--variant", "x", *extra],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert proc.returncode == 2, (extra, proc.stderr)
