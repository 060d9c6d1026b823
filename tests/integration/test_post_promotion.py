"""spec.postPromotion on the real stack: the bake after the candidate reaches 100% and the holdout.

Real API server, real Prometheus, real model servers and traffic split by the route's weights.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from model_rollouts.metrics.provider import render
from model_rollouts.report.document import write as write_report
from tests.harness.objects import CANDIDATE, STABLE, cond, fraud_stack, fresh_fraud, phase, rollout
from tests.harness.queries import ERROR_RATE, REQUESTS
from tests.harness.stack import Stack

INTERVAL = 5.0  # the harness rollout's analysis.interval


@pytest.fixture(scope="module")
def stack(real_components: None) -> Iterator[Stack]:
    with fraud_stack(max_seconds=1200) as s:
        yield s


@pytest.fixture()
def fresh(stack: Stack) -> Iterator[Stack]:
    """A healthy candidate, whose errors of an earlier test have left Prometheus's window."""
    for s in fresh_fraud(stack, "modelrollouts", restart_operator=True):
        _wait_no_breach(s, CANDIDATE, 0.05)
        yield s


def _wait_no_breach(stack: Stack, service: str, limit: float, timeout: float = 60) -> None:
    assert stack.prom is not None
    q = render(ERROR_RATE, {"service": service, "window": "10s"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = stack.prom.query(q)
        if not res or not float(res[0]["value"][1]) > limit:  # no series, NaN (no traffic) or below
            return
        time.sleep(0.5)
    raise TimeoutError(f"{service}'s error rate stayed above {limit}")


def _post(o: dict[str, Any]) -> dict[str, Any]:
    return (o.get("status") or {}).get("postPromotion") or {}


def _events(stack: Stack, name: str) -> set[str]:
    items = (
        client.CoreV1Api(stack.api)
        .list_namespaced_event(stack.namespace, field_selector=f"involvedObject.name={name}")
        .items
    )
    return {e.reason for e in items}


def _capture(obj: dict[str, Any], name: str) -> None:
    """With MODEL_ROLLOUTS_CAPTURE=DIR, keep the object (Argo CD health fixtures are made from it)."""
    where = os.environ.get("MODEL_ROLLOUTS_CAPTURE")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        (Path(where) / f"{name}.json").write_text(json.dumps(obj, indent=1))


def _wait_breach_visible(stack: Stack, service: str, limit: float, timeout: float = 60) -> float:
    assert stack.prom is not None
    q = render(ERROR_RATE, {"service": service, "window": "10s"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = stack.prom.query(q)
        if res and float(res[0]["value"][1]) > limit:
            return time.monotonic()
        time.sleep(0.1)
    raise TimeoutError("the breach never became visible in Prometheus")


def test_breach_during_bake_sends_all_traffic_back_to_the_old_stable_within_interval_plus_2s(
    fresh: Stack,
) -> None:
    assert fresh.prom is not None
    fresh.apply(
        rollout(
            "bake-breach",
            fresh.prom.url,
            [{"setWeight": 50}, {"setWeight": 100}],
            compare=False,
            postPromotion={"bake": "10m"},
        )
    )
    obj = fresh.wait_for("modelrollouts", "bake-breach", lambda o: phase(o) == "Baking", 90)
    _capture(obj, "baking")
    # The old stable stays in the route at weight 0 while the candidate has all the traffic.
    assert fresh.wait_route({STABLE: 0, CANDIDATE: 100}) == {STABLE: 0, CANDIDATE: 100}
    assert cond(obj, "Baking")["status"] == "True" and cond(obj, "Completed")["status"] == "False"
    assert cond(obj, "Progressing")["status"] == "True" and obj["status"]["stableService"] == STABLE
    time.sleep(INTERVAL + 1)  # at least one healthy analysis in the bake
    assert phase(fresh.get("modelrollouts", "bake-breach")) == "Baking"

    fresh.servers[CANDIDATE].set(error_rate=0.5)
    breach_at = _wait_breach_visible(fresh, CANDIDATE, 0.05)
    deadline = breach_at + 30
    while fresh.route_weights().get(STABLE) != 100:
        assert time.monotonic() < deadline, "the route never went back to the old stable"
        time.sleep(0.05)
    back_at = time.monotonic()
    print(
        f"\nbreach visible in Prometheus -> old stable 100%: {back_at - breach_at:.2f}s "
        f"(interval {INTERVAL}s)"
    )
    assert back_at - breach_at <= INTERVAL + 2.0
    assert fresh.route_weights() == {STABLE: 100, CANDIDATE: 0}

    obj = fresh.wait_for("modelrollouts", "bake-breach", lambda o: phase(o) == "RolledBack", 10)
    st = obj["status"]
    assert st["history"][-1]["reason"] == "BakeFailed" and "error-rate" in st["message"]
    assert cond(obj, "Baking")["status"] == "False" and cond(obj, "Baking")["reason"] == "BakeFailed"
    assert cond(obj, "Promoted")["status"] == "False"
    # Events are sent after the status write that the phase came with: give them a moment.
    want = {"BakeStarted", "BakeFailed", "RolledBack"}
    until = time.monotonic() + 15
    while not want <= _events(fresh, "bake-breach") and time.monotonic() < until:
        time.sleep(0.5)
    assert want <= _events(fresh, "bake-breach")


def test_clean_bake_survives_a_sigkill_and_finishes_promoted_with_the_old_stable_at_0(fresh: Stack) -> None:
    assert fresh.prom is not None
    bake = 20.0
    fresh.apply(
        rollout(
            "bake-clean",
            fresh.prom.url,
            [{"setWeight": 50}, {"setWeight": 100}],
            compare=False,
            postPromotion={"bake": f"{bake:.0f}s"},
        )
    )
    obj = fresh.wait_for("modelrollouts", "bake-clean", lambda o: phase(o) == "Baking", 90)
    started = _post(obj)["startedAt"]
    fresh.wait_route({STABLE: 0, CANDIDATE: 100})
    time.sleep(3)
    fresh.stop_operator(kill=True)  # SIGKILL in the middle of the bake
    time.sleep(4)
    fresh.start_operator()
    seen: list[dict[str, int]] = []
    obj = fresh.wait_for(
        "modelrollouts",
        "bake-clean",
        lambda o: phase(o) == "Promoted",
        bake + 60,
        on_poll=lambda _o: seen.append(fresh.route_weights()),
        poll=0.25,
    )
    st = obj["status"]
    assert all(w == {STABLE: 0, CANDIDATE: 100} for w in seen), seen  # nothing moved during the bake
    assert _post(obj)["startedAt"] == started  # resumed, not restarted
    assert [h["reason"] for h in st["history"]].count("BakeStarted") == 1
    promoted = next(h for h in reversed(st["history"]) if h["event"] == "Promoted")
    from model_rollouts.report.data import parse_time

    waited = (parse_time(promoted["time"]) - parse_time(started)).total_seconds()
    print(f"\nbake {bake:.0f}s (operator SIGKILLed for 4s in it): promoted {waited:.1f}s after it began")
    assert bake <= waited <= bake + 2 * INTERVAL + 10
    assert promoted["reason"] == "BakePassed" and st["stableService"] == CANDIDATE
    assert cond(obj, "Baking")["reason"] == "BakePassed" and cond(obj, "Promoted")["status"] == "True"
    assert cond(obj, "Completed")["status"] == "True"
    # As before postPromotion: the replaced stable stays in the route at weight 0.
    assert fresh.wait_route({STABLE: 0, CANDIDATE: 100}) == {STABLE: 0, CANDIDATE: 100}


def _server_share(stack: Stack, service: str, window: str) -> float:
    assert stack.prom is not None
    counts = {}
    for svc in (STABLE, CANDIDATE):
        res = stack.prom.query(render(REQUESTS, {"service": svc, "window": window}))
        counts[svc] = float(res[0]["value"][1]) if res else 0.0
    total = sum(counts.values())
    assert total > 0, counts
    return 100.0 * counts[service] / total


def test_holdout_keeps_p_percent_on_the_old_model_and_the_report_plots_the_effect(
    fresh: Stack, tmp_path: Path
) -> None:
    assert fresh.prom is not None
    percent, duration = 20, 50
    fresh.apply(
        rollout(
            "holdout",
            fresh.prom.url,
            [{"setWeight": 50}, {"setWeight": 100}],
            postPromotion={"bake": "5s", "holdout": {"percent": percent, "duration": f"{duration}s"}},
        )
    )
    obj = fresh.wait_for("modelrollouts", "holdout", lambda o: _post(o).get("stage") == "Holdout", 240)
    _capture(obj, "holdout")
    assert phase(obj) == "Baking" and obj["status"]["weight"] == 100 - percent
    fresh.wait_route({STABLE: percent, CANDIDATE: 100 - percent})
    holdout_at = time.monotonic()
    routes: list[dict[str, int]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            routes.append(fresh.route_weights())
            time.sleep(0.5)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        # The last 30 s of the holdout's first 35 s: 5 s for the traffic generator to follow the route.
        time.sleep(max(0.0, holdout_at + 35 - time.monotonic()))
        measured = _server_share(fresh, STABLE, "30s")  # the holdout's traffic, counted at the servers
        obj = fresh.wait_for("modelrollouts", "holdout", lambda o: phase(o) == "Promoted", duration + 60)
    finally:
        stop.set()
        t.join()
    during = [w for w in routes if w.get(CANDIDATE) != 100]
    print(f"\nholdout {percent}%: route {set(map(str, map(sorted, map(dict.items, during))))}; "
          f"old model's share at the servers over 30s: {measured:.1f}%")  # fmt: skip
    assert during and all(abs(w[STABLE] - percent) <= 1 for w in during), routes
    # ~1,500 requests (50/s for 30 s) split at random: sd sqrt(.2 * .8 / 1500) = 1.03 points, so 4 points
    # is > 3.8 sd (still > 3 sd at 1,000 requests, if the generator falls behind on a loaded machine).
    assert abs(measured - percent) <= 4.0

    _capture(obj, "holdout-done")
    st = obj["status"]
    pp = st["postPromotion"]
    row = pp["holdout"][0]
    assert row["name"] == "positive-feedback" and pp["stage"] == "Done"
    assert pp["gain"] in ("held", "decayed", "undecided") and row["gain"] == pp["gain"]
    assert pp["gain"] != "decayed"  # an equal candidate
    traj = row["trajectory"]
    assert len(traj) >= 5 and all(p["lower"] <= p["effect"] <= p["upper"] for p in traj)
    assert traj[-1]["upper"] - traj[-1]["lower"] < traj[0]["upper"] - traj[0]["lower"]  # the band narrows
    assert st["history"][-1]["reason"] == "HoldoutFinished" and f"gain {pp['gain']}" in st["message"]
    fresh.wait_route({STABLE: 0, CANDIDATE: 100})

    written = write_report(obj, "md", tmp_path / "holdout.md")
    title = next((t for t in written.panels if t.startswith("Holdout positive-feedback")), None)
    assert title is not None and f"gain {pp['gain']}" in title, written.panels
    text = written.path.read_text()
    assert "## Holdout after promotion" in text and "positive-feedback" in text
    assert any("holdout-positive-feedback" in i.name and i.stat().st_size > 5000 for i in written.images)


@pytest.mark.parametrize(
    ("post_promotion", "compare", "field", "words"),
    [
        ({"bake": "200h"}, True, "spec.postPromotion.bake", "at most 168h"),
        (
            {"bake": "1m", "holdout": {"percent": 60, "duration": "1h"}},
            True,
            "postPromotion.holdout.percent",
            "",
        ),
        ({"bake": "1m", "holdout": {"percent": 5, "duration": "800h"}}, True, "holdout.duration", "720h"),
        (
            {"bake": "1m", "holdout": {"percent": 5, "duration": "1h"}},
            False,
            "postPromotion.holdout",
            "comparison",
        ),
    ],
)
def test_bad_post_promotion_is_refused_by_the_api_server_naming_the_field(
    stack: Stack, post_promotion: dict[str, Any], compare: bool, field: str, words: str
) -> None:
    from kubernetes.client.exceptions import ApiException

    doc = rollout("bad-post", "http://127.0.0.1:9090", [{"setWeight": 10}], compare=compare)
    doc["metadata"]["namespace"] = stack.namespace
    doc["spec"]["postPromotion"] = post_promotion
    with pytest.raises(ApiException) as e:
        client.CustomObjectsApi(stack.api).create_namespaced_custom_object(
            "mlrollouts.io", "v1alpha1", stack.namespace, "modelrollouts", doc
        )
    assert e.value.status == 422 and field in e.value.body and words in e.value.body, e.value.body
