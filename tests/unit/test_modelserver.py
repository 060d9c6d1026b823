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

from tests.harness.modelserver import METRIC_NAMES, REPO_ROOT, ModelServerProcess, ParamError, Params


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
