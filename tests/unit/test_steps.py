"""The rollout step runner on its own: a StepContext in, the status changed in place, a StepOutcome out."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from model_rollouts.api.common import ArmCounts
from model_rollouts.api.rollout import ANNOTATION_PROMOTE, EpochCounts, ModelRolloutSpec, ModelRolloutStatus
from model_rollouts.engine import steps
from tests.unit.test_rollout_engine import T0, spec


def context(sp: ModelRolloutSpec, **kw: Any) -> steps.StepContext:
    base: dict[str, Any] = {
        "spec": sp,
        "now": T0,
        "annotations": {},
        "hold_reasons": [],
        "analysed": True,
        "candidate_ready": True,
        "missing_evidence": [],
        "values": {},
        "epoch": {},
        "answers": {},
        "asks": [],
    }
    base.update(kw)
    return steps.StepContext(**base)


def status(weight: int, step: int = 0, **kw: Any) -> ModelRolloutStatus:
    return ModelRolloutStatus(phase="Progressing", weight=weight, currentStep=step, stepStartedAt=T0, **kw)


def test_a_move_is_split_by_max_weight_step_and_closes_the_epoch_it_is_given() -> None:
    epoch = EpochCounts(weight=10, stable=ArmCounts(n=100, total=5), candidate=ArmCounts(n=10, total=1))
    s = status(10)
    out = steps.run(s, context(spec([{"setWeight": 50}], maxWeightStep=20), epoch={"quality": epoch}))
    assert (s.weight, s.stepWeight, s.currentStep) == (30, 30, 0)
    assert s.epochs["quality"] == [epoch] and s.epochStartedAt == T0
    assert [e.reason for e in out.events] == ["WeightChanged"]
    assert out.finish is None and out.progressing is None


def test_past_the_last_step_at_full_weight_it_asks_for_promotion_with_the_given_values() -> None:
    s = status(100, step=1)
    out = steps.run(s, context(spec([{"setWeight": 100}]), values={"errors": 0.01}))
    assert out.finish == steps.Finish(
        "Promoted", 100, "AnalysisPassed", "all steps completed with passing analysis", {"errors": 0.01}
    )


def test_missing_evidence_holds_before_full_traffic_then_the_deadline_policy_applies() -> None:
    sp = spec([{"setWeight": 100}], progressDeadline="60s", analysis={"onInconclusive": "rollback"})
    missing = ["comparison quality has not passed its superiority test (inconclusive)"]
    s = status(50)
    out = steps.run(s, context(sp, missing_evidence=missing))
    assert s.weight == 50 and s.heldSince == T0 and out.finish is None
    assert s.message == f"holding at weight 50 before full traffic: {missing[0]}"
    later = T0 + timedelta(seconds=60)
    out = steps.run(s, context(sp, now=later, missing_evidence=missing))
    assert out.finish is not None and (out.finish.phase, out.finish.reason) == ("RolledBack", "Inconclusive")


def test_an_unanswered_gate_is_asked_for_and_holds_the_weight() -> None:
    sp = spec([{"setWeight": 20}], gates=[{"name": "qa", "type": "confirm-rollout", "provider": "hook"}])
    ctx = context(sp)
    s = status(10)
    out = steps.run(s, ctx)
    assert ctx.asks == ["qa"] and s.weight == 10
    assert out.progressing is not None and out.progressing[0] == "GateClosed"
    out = steps.run(s, context(sp, answers={"qa": steps.GateAnswer(open=True, message="ok")}))
    assert s.weight == 20 and [e.reason for e in out.events] == ["WeightChanged"]


def test_a_promote_annotation_skips_the_current_pause_only() -> None:
    sp = spec([{"setWeight": 10}, {"pause": {}}, {"setWeight": 50}, {"pause": {}}])
    s = status(10, step=1)
    out = steps.run(s, context(sp, annotations={ANNOTATION_PROMOTE: "t1"}))
    assert s.handled.promote == "t1" and s.weight == 50 and s.currentStep == 3
    assert [e.reason for e in out.events] == ["PromoteRequested", "WeightChanged"]
