"""Only the leader exports per-object series: a replica that loses the Lease drops them."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from model_rollouts import leader, telemetry

PHASES = ("Progressing", "Paused", "Promoted", "RolledBack")


def scrape() -> list[tuple[str, dict[str, str], float]]:
    """The samples a /metrics scrape of this process returns."""
    text = generate_latest(REGISTRY).decode()
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def object_series(namespace: str) -> list[str]:
    return sorted({n for n, labels, _ in scrape() if labels.get("namespace") == namespace})


def leader_value() -> float:
    return next(v for n, labels, v in scrape() if n == "mlrollouts_leader")


def export_everything(namespace: str, name: str) -> None:
    """What a leader's handlers export for one rolled-back rollout that missed its deadline."""
    obj = ("ModelRollout", namespace, name)
    telemetry.set_phase(*obj, "RolledBack", PHASES)
    telemetry.WEIGHT.labels(*obj, "candidate").set(0)
    telemetry.DECISIONS.labels(*obj, "RolledBack").inc()
    telemetry.LIMITS.labels(*obj, "ProgressDeadlineExceeded").inc()
    telemetry.MEASUREMENT_ERRORS.labels(*obj).inc()
    telemetry.RECONCILE_ERRORS.labels(*obj, "RouteWriteFailed").inc()
    status = {
        "phase": "RolledBack",
        "reconcileErrors": 1,
        "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}],
        "lastAnalysis": [
            {
                "name": "ctr",
                "kind": "comparison",
                "variant": "candidate",
                "details": {"stable": 0.5, "candidate": 0.4, "difference": -0.1, "pValue": 0.01},
            }
        ],
    }
    spec = {"analysis": {"guardrails": [{"name": "error-rate", "max": 0.05}]}}
    telemetry.record(*obj, status, spec)


def test_forget_all_removes_every_objects_series_and_keeps_the_process_metrics() -> None:
    export_everything("fa-1", "r1")
    export_everything("fa-2", "r2")
    telemetry.NOTIFICATIONS.labels("sent").inc()
    exported = object_series("fa-1")
    # every per-object metric the alerts and dashboards read is there before
    for metric in (
        "mlrollouts_phase",
        "mlrollouts_weight",
        "mlrollouts_progress_deadline_exceeded",
        "mlrollouts_comparison_difference",
        "mlrollouts_guardrail_threshold",
        "mlrollouts_decisions_total",
        "mlrollouts_reconcile_errors_consecutive",
    ):
        assert metric in exported, (metric, exported)
    telemetry.forget_all()
    assert object_series("fa-1") == [] and object_series("fa-2") == []
    assert not [n for n, labels, _ in scrape() if "name" in labels and n.startswith("mlrollouts_")]
    assert any(n == "mlrollouts_notifications_total" and v >= 1 for n, _, v in scrape())
    # exporting again afterwards works, and a later record still replaces what it exported
    export_everything("fa-1", "r1")
    telemetry.record("ModelRollout", "fa-1", "r1", {"phase": "Progressing"}, {})
    names = object_series("fa-1")
    assert "mlrollouts_phase" in names and "mlrollouts_comparison_difference" not in names
    telemetry.forget_all()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def elector(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[leader.Elector, Clock, dict[str, Any]]]:
    """An elector whose Lease answers are scripted and whose clock the test moves."""
    clock = Clock()
    monkeypatch.setattr(leader, "time", SimpleNamespace(monotonic=clock.monotonic))
    lease: dict[str, Any] = {"ours": True}
    e = leader.Elector(
        cast(Any, object()), "model-rollouts", "lease", lease_seconds=6, retry_seconds=1, identity="a"
    )

    def answer() -> bool:
        if isinstance(lease["ours"], Exception):
            raise lease["ours"]
        return bool(lease["ours"])

    monkeypatch.setattr(e, "_try_acquire_or_renew", answer)
    yield e, clock, lease
    telemetry.LEADER.set(0)
    telemetry.forget_all()


def test_a_replica_that_loses_the_lease_stops_exporting_object_series(
    elector: tuple[leader.Elector, Clock, dict[str, Any]],
) -> None:
    e, clock, lease = elector
    e._step()
    assert e.is_leader() and leader_value() == 1
    export_everything("ll-1", "r1")
    clock.now += 1
    e._step()  # renewed: a leader keeps its series
    assert "mlrollouts_phase" in object_series("ll-1")
    # the API server stops answering: the replica stops acting when its own lease could expire
    lease["ours"] = ConnectionError("refused")
    clock.now += 3
    e._step()
    assert e.is_leader() and "mlrollouts_phase" in object_series("ll-1")
    clock.now += 3
    e._step()
    assert not e.is_leader()
    assert object_series("ll-1") == [] and leader_value() == 0
    # a handler that started before the loss sets a gauge late: the next round drops it
    telemetry.set_phase("ModelRollout", "ll-1", "r1", "RolledBack", PHASES)
    lease["ours"] = False  # another replica holds the Lease now
    clock.now += 1
    e._step()
    assert object_series("ll-1") == [] and leader_value() == 0
    # taking the Lease back: the new leader's handlers export again, and they stay
    lease["ours"] = True
    e._step()
    telemetry.set_phase("ModelRollout", "ll-1", "r1", "Progressing", PHASES)
    clock.now += 1
    e._step()
    assert e.is_leader() and leader_value() == 1 and "mlrollouts_phase" in object_series("ll-1")


def test_a_stopped_leader_drops_its_series(elector: tuple[leader.Elector, Clock, dict[str, Any]]) -> None:
    e, _, _ = elector
    e._step()
    export_everything("st-1", "r1")
    e.stop()  # the Lease hand-back fails (no API server here); that is best effort
    assert not e.is_leader() and object_series("st-1") == [] and leader_value() == 0


def test_without_leader_election_the_only_replica_exports() -> None:
    e = leader.Elector(None, "", "")
    e.start()
    export_everything("ne-1", "r1")
    e.stop()
    assert e.is_leader() and "mlrollouts_phase" in object_series("ne-1")
    telemetry.forget_all()


def test_without_leader_election_the_replica_reports_leading() -> None:
    """--no-leader-election: the one replica always acts, so ModelRolloutsNoLeader must not fire."""
    telemetry.LEADER.set(0)
    leader.Elector(None, "", "").start()
    assert leader_value() == 1
