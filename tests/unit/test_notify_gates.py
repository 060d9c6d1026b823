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
