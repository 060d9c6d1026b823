"""confirm-promotion / confirm-rollout gates in the pure rollout engine: the gate's answer is an input."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from model_rollouts.api.rollout import ANNOTATION_PROMOTE, ANNOTATION_PROMOTE_FULL
from model_rollouts.engine import rollout as eng
from tests.unit.test_rollout_engine import Driver, ok, spec

OPEN, CLOSED = eng.GateAnswer(True, "answered 2xx"), eng.GateAnswer(False, "answered HTTP 403")


class GateDriver(Driver):
    """Like the handler: if the engine asks a gate, answer it from ``self.answers`` and decide again."""

    def __init__(self, s: Any, answers: dict[str, eng.GateAnswer]) -> None:
        super().__init__(s)
        self.answers = answers
        self.asked: list[str] = []

    def tick(self, obs: eng.Observations | None = None, advance: float = 10, **kw: Any) -> Any:
        if obs is None and eng.needs_measurement(self.spec, self.status, self.now):
            obs = ok()
        first = eng.reconcile(self.spec, self.status, now=self.now, generation=1, observations=obs, **kw)
        gates = {}
        if first.asks:
            self.asked += first.asks
            gates = {n: self.answers[n] for n in first.asks if n in self.answers}
        d = eng.reconcile(
            self.spec, self.status, now=self.now, generation=1, observations=obs, gates=gates, **kw
        )
        self.status = d.status
        if d.status.revision is not None and self.weights[-1] != d.status.weight:
            self.weights.append(d.status.weight)
        self.events += [a.reason for a in d.actions]
        self.now += timedelta(seconds=advance)
        return self.status


def gated(*gates: dict[str, str], **extra: Any) -> Any:
    return spec([{"setWeight": 20}, {"setWeight": 50}], gates=list(gates), **extra)


def test_a_closed_confirm_promotion_gate_holds_below_100_and_names_the_gate() -> None:
    d = GateDriver(gated({"name": "qa-signoff", "provider": "ci"}), {"qa-signoff": CLOSED})
    for _ in range(12):
        d.tick()
    assert d.weights == [0, 20, 50], "never past 50 while the gate is closed"
    assert d.status.phase == "Progressing"
    assert "qa-signoff" in d.status.message and "HTTP 403" in d.status.message
    progressing = next(c for c in d.status.conditions if c.type == "Progressing")
    assert (progressing.status, progressing.reason) == ("False", "GateClosed")
    assert "qa-signoff" in progressing.message
    # Asked at every analysis tick at 50, but the Event and the history record the transition once.
    assert d.asked.count("qa-signoff") >= 9
    assert d.events.count("GateClosed") == 1
    assert [h.reason for h in d.status.history].count("GateClosed") == 1
    gate = d.status.gates[0]
    assert (gate.name, gate.open, gate.message) == ("qa-signoff", False, "answered HTTP 403")


def test_the_gate_opening_lets_the_rollout_promote() -> None:
    d = GateDriver(gated({"name": "qa-signoff", "provider": "ci"}), {"qa-signoff": CLOSED})
    for _ in range(5):
        d.tick()
    assert d.status.weight == 50
    d.answers["qa-signoff"] = OPEN
    for _ in range(5):
        d.tick()
    assert d.status.phase == "Promoted" and d.weights == [0, 20, 50, 100]
    assert "GateOpened" in d.events
    assert d.status.gates[0].open


def test_confirm_promotion_is_not_asked_before_the_intermediate_steps() -> None:
    d = GateDriver(gated({"name": "qa", "provider": "ci"}), {"qa": OPEN})
    d.tick()
    d.tick()
    assert d.status.weight == 50 and d.asked == []


def test_confirm_rollout_is_asked_before_every_weight_increase() -> None:
    d = GateDriver(gated({"name": "go", "type": "confirm-rollout", "provider": "ci"}), {"go": CLOSED})
    for _ in range(4):
        d.tick()
    assert d.weights == [0], "not even the first step while confirm-rollout is closed"
    assert d.status.phase == "Progressing" and "go" in d.status.message
    d.answers["go"] = OPEN
    for _ in range(8):
        d.tick()
    assert d.status.phase == "Promoted"
    assert d.asked.count("go") >= 4 + 3  # each of 0->20, 20->50, 50->100 asked


def test_a_gate_without_an_answer_holds_and_is_named_in_asks() -> None:
    d = GateDriver(gated({"name": "qa", "provider": "ci"}), {})
    for _ in range(6):
        d.tick()
    assert d.status.weight == 50 and "qa" in d.asked
    assert "has not been asked" in d.status.message


def test_a_closed_gate_does_not_run_out_the_progress_deadline() -> None:
    d = GateDriver(gated({"name": "qa", "provider": "ci"}, progressDeadline="30s"), {"qa": CLOSED})
    for _ in range(20):  # 200 s, far past the deadline
        d.tick()
    assert d.status.phase == "Progressing" and d.status.weight == 50


def test_a_breach_still_rolls_back_while_a_gate_holds() -> None:
    d = GateDriver(gated({"name": "qa", "provider": "ci"}), {"qa": CLOSED})
    for _ in range(4):
        d.tick()

    d.tick(obs=ok(0.5))
    d.tick(obs=ok(0.5))
    assert d.status.phase == "RolledBack" and d.status.weight == 0


def test_promote_full_skips_gates_and_promote_does_not() -> None:
    d = GateDriver(gated({"name": "qa", "provider": "ci"}), {"qa": CLOSED})
    for _ in range(4):
        d.tick()
    held = d.status.weight
    d.tick(annotations={ANNOTATION_PROMOTE: "step"})  # moves past pause/analysis steps only
    assert d.status.phase != "Promoted" and d.status.weight == held
    d.tick(annotations={ANNOTATION_PROMOTE: "step", ANNOTATION_PROMOTE_FULL: "now"})
    assert d.status.phase == "Promoted" and d.status.weight == 100


def test_gate_answers_are_forgotten_by_a_new_revision_and_pace_the_weight_0_asks() -> None:
    d = GateDriver(gated({"name": "go", "type": "confirm-rollout", "provider": "ci"}), {"go": CLOSED})
    d.tick(advance=0)
    asked_at = d.status.gates[0].lastAskedTime
    # At weight 0 nothing is measured; the next ask is due one interval after the last one.
    assert eng.next_due(d.spec, d.status) == asked_at + timedelta(seconds=10)
    d.spec = d.spec.model_copy(update={"candidate": d.spec.candidate.model_copy(update={"service": "v3"})})
    d.tick()
    assert d.status.gates == []


BUSY = eng.GateAnswer(False, "busy: an earlier request to this gate has not been answered yet", busy=True)


def test_a_gate_busy_with_another_objects_request_holds_without_counting_as_closed() -> None:
    d = GateDriver(gated({"name": "qa", "provider": "ci"}), {"qa": BUSY})
    for _ in range(8):
        d.tick()
    assert d.weights == [0, 20, 50], "held: a busy gate is not an open one"
    assert "GateClosed" not in d.events and "GateClosed" not in [h.reason for h in d.status.history]
    progressing = next(c for c in d.status.conditions if c.type == "Progressing")
    assert progressing.reason == "GateBusy" and "busy" in d.status.message
    assert d.status.gates[0].busy is True and d.status.gates[0].open is False
    # Its real answer then counts: a 403 is the first GateClosed, a 2xx lets it through.
    d.answers["qa"] = CLOSED
    d.tick()
    assert d.events.count("GateClosed") == 1 and not d.status.gates[0].busy
    d.answers["qa"] = OPEN
    for _ in range(3):
        d.tick()
    assert d.status.phase == "Promoted"


def test_a_gate_hold_counts_towards_progress_deadline_after_its_max_hold() -> None:
    s = gated({"name": "qa", "provider": "ci", "maxHold": "60s"}, progressDeadline="30s")
    d = GateDriver(s, {"qa": CLOSED})
    for _ in range(8):  # 80 s at 50: past maxHold (60 s) but not past maxHold + progressDeadline
        d.tick()
    assert d.status.phase == "Progressing" and d.status.weight == 50
    for _ in range(6):  # the hold now counts: 30 s later, onProgressDeadline (rollback) applies
        d.tick()
    assert d.status.phase == "RolledBack" and d.status.weight == 0
    assert "maxHold 60s" in d.status.message and "progressDeadline 30s" in d.status.message


def test_a_busy_gate_also_counts_after_its_max_hold() -> None:
    s = gated({"name": "qa", "provider": "ci", "maxHold": "30s"}, progressDeadline="30s")
    d = GateDriver(s, {"qa": BUSY})
    for _ in range(12):
        d.tick()
    assert d.status.phase == "RolledBack" and "maxHold 30s" in d.status.message


def test_the_default_max_hold_is_an_hour() -> None:
    d = GateDriver(gated({"name": "qa", "provider": "ci"}, progressDeadline="30s"), {"qa": CLOSED})
    for _ in range(350):  # 58 min
        d.tick()
    assert d.status.phase == "Progressing" and d.status.weight == 50
    for _ in range(20):  # past 1 h + 30 s from the first hold (at 20 s)
        d.tick()
    assert d.status.phase == "RolledBack"
