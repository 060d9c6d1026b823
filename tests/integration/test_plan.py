"""Plan before ramping on the real stack: a required comparison that cannot decide within progressDeadline at
the observed rate is reported within the rollout's first two analyses (condition, Event, plugin line);
a feasible one is not."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.harness.objects import COMPARISON, fraud_stack, fresh_fraud, phase, rollout
from tests.harness.stack import Stack

P = "modelrollouts"
PLUGIN = Path(sys.executable).parent / "kubectl-mlrollouts"


@pytest.fixture(scope="module")
def stack(real_components: None) -> Iterator[Stack]:
    with fraud_stack(max_seconds=900) as s:
        yield s


@pytest.fixture()
def fresh(stack: Stack) -> Iterator[Stack]:
    yield from fresh_fraud(stack, P, restart_operator=True)


def _planned(obj: dict[str, Any]) -> dict[str, Any] | None:
    return next(
        (c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == "Planned"), None
    )


def _events(stack: Stack, name: str, reason: str) -> list[Any]:
    items = (
        client.CoreV1Api(stack.api)
        .list_namespaced_event(stack.namespace, field_selector=f"involvedObject.name={name}")
        .items
    )
    return [e for e in items if e.reason == reason]


def _plugin(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "KUBECONFIG": str(stack.cluster.kubeconfig), "NO_COLOR": "1", "COLUMNS": "2000"}
    return subprocess.run(
        [str(PLUGIN), *args, "-n", stack.namespace],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _t(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_a_comparison_that_cannot_decide_in_time_says_so_within_two_analyses(fresh: Stack) -> None:
    assert fresh.prom is not None
    # Margin 0.001 on positive feedback at the harness's traffic: millions of samples, days of traffic,
    # against a progressDeadline of 2 minutes.
    tight = {**COMPARISON, "margin": 0.001}
    fresh.apply(
        rollout(
            "tight",
            fresh.prom.url,
            [{"setWeight": 50}, {"setWeight": 100}],
            analysis={"comparisons": [tight]},
            progressDeadline="2m",
        )
    )
    obj = fresh.wait_for(P, "tight", lambda o: (_planned(o) or {}).get("status") == "False", 90)
    st = obj["status"]
    cond = _planned(obj)
    assert cond is not None and cond["reason"] == "DecisionUnlikely"
    # Within the first two analyses: the transition is recorded at the time of the first or second one.
    analyses = [_t(p["time"]) for p in st["series"]]
    said = next(_t(h["time"]) for h in st["history"] if h["event"] == "DecisionUnlikely")
    assert said in analyses[:2], (said, analyses)
    [plan] = [p for p in st["plan"] if p["name"] == "positive-feedback"]
    assert plan["feasible"] is False
    assert plan["budgetSeconds"] <= 120
    assert plan["expectedDecisionSeconds"] > 10 * plan["budgetSeconds"]
    assert plan["samplesPerSecond"] > 0 and plan["moreSamplesNeeded"] > 0
    assert "more samples needed" in cond["message"] and "progressDeadline 2m" in cond["message"]
    print(f"\nplan at the first report: {plan['message']}")

    # Several analyses later: still False, one Warning Event (not one per analysis), the plugin says so.
    # (status.series keeps only the last 5 analyses: count them by time, 4 intervals of 5 s on.)
    later = analyses[-1] + timedelta(seconds=4 * 5)
    fresh.wait_for(
        P,
        "tight",
        lambda o: _t((o.get("status") or {}).get("lastAnalysisTime") or "1970-01-01T00:00:00Z") >= later,
        60,
    )
    assert (_planned(fresh.get(P, "tight")) or {}).get("status") == "False"
    events = _events(fresh, "tight", "DecisionUnlikely")
    assert len(events) == 1 and events[0].type == "Warning" and (events[0].count or 1) == 1
    get = _plugin(fresh, "get", "tight")
    assert get.returncode == 0, get.stderr
    assert "decision unlikely in time (Planned=False, DecisionUnlikely)" in get.stdout
    status = _plugin(fresh, "status", "tight", "--timeout", "1s")
    assert status.returncode == 2, status.stderr  # still running
    assert "Planned=False" in status.stdout and "more samples needed" in status.stdout


def test_a_feasible_comparison_reports_no_unlikely_decision(fresh: Stack) -> None:
    assert fresh.prom is not None
    # The harness's comparison (margin 0.15) decides within about a minute; progressDeadline 30m.
    fresh.apply(
        rollout(
            "roomy", fresh.prom.url, [{"setWeight": 50}, {"pause": {"duration": "10s"}}, {"setWeight": 100}]
        )
    )
    seen: list[str] = []

    def poll(o: dict[str, Any]) -> None:
        c = _planned(o)
        if c is not None:
            seen.append(c["status"])

    obj = fresh.wait_for(P, "roomy", lambda o: phase(o) == "Promoted", 150, on_poll=poll)
    assert "False" not in seen
    assert (_planned(obj) or {}).get("status") == "True"
    assert _events(fresh, "roomy", "DecisionUnlikely") == []
    assert not any(h["event"] == "DecisionUnlikely" for h in obj["status"]["history"])
    assert "Planned=False" not in _plugin(fresh, "get", "roomy").stdout
