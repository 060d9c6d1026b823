"""Bake and holdout after promotion (engine/post.py), driven with synthetic observations and a fake clock."""

from __future__ import annotations

import itertools
from datetime import timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from model_rollouts.analysis.stats import ProportionData
from model_rollouts.api.rollout import (
    ANNOTATION_ABORT,
    ANNOTATION_PROMOTE_FULL,
    TRAJECTORY_POINTS,
    EffectPoint,
    ModelRolloutSpec,
    ModelRolloutStatus,
)
from model_rollouts.engine import post
from model_rollouts.engine import rollout as eng
from model_rollouts.metrics.provider import Result
from tests.unit.test_rollout_engine import T0, Driver, ok, spec

COMPARISON = {
    "name": "ctr",
    "type": "proportion",
    "successes": "s",
    "trials": "t",
    "test": "nonInferiority",
    "margin": 0.02,
}


def baking(post_promotion: dict[str, Any], **extra: Any) -> ModelRolloutSpec:
    return spec([{"setWeight": 50}, {"setWeight": 100}], postPromotion=post_promotion, **extra)


def to_bake(d: Driver, limit: int = 20) -> ModelRolloutStatus:
    for _ in range(limit):
        if d.tick().phase == "Baking":
            return d.status
    raise AssertionError(f"never baked: {d.status.phase} {d.status.message}")


def cond(st: ModelRolloutStatus, t: str) -> Any:
    return next(c for c in st.conditions if c.type == t)


def test_reaching_100_bakes_with_the_old_stable_at_weight_0_then_promotes() -> None:
    d = Driver(baking({"bake": "60s"}))
    st = to_bake(d)
    assert st.weight == 100 and st.stableService == "v1"
    assert eng.route_weights(d.spec, st) == {"v1": 0, "v2": 100}  # the old stable stays in the route
    assert cond(st, "Baking").status == "True" and cond(st, "Completed").status == "False"
    assert cond(st, "Progressing").status == "True" and cond(st, "Promoted").reason == "Baking"
    assert "BakeStarted" in d.events and eng.active(d.spec.model_dump(), st.model_dump(), {})
    started = st.postPromotion.startedAt if st.postPromotion else None
    for _ in range(5):  # 50 s into a 60 s bake
        assert d.tick().phase == "Baking"
    while d.status.phase == "Baking":
        d.tick()
    st = d.status
    assert st.phase == "Promoted" and st.stableService == "v2" and "v1" in st.retiredServices
    assert eng.route_weights(d.spec, st) == {"v1": 0, "v2": 100}
    assert started is not None and (d.now - started).total_seconds() >= 60
    assert cond(st, "Baking").status == "False" and cond(st, "Baking").reason == "BakePassed"
    assert cond(st, "Promoted").status == "True" and st.history[-1].reason == "BakePassed"


def test_a_breach_during_the_bake_sends_all_traffic_back_to_the_old_stable() -> None:
    d = Driver(baking({"bake": "10m"}))
    to_bake(d)
    d.tick(ok(0.2))  # failureLimit 2: one breach holds
    assert d.status.phase == "Baking" and d.status.guardrailFailures["errors"] == 1
    st = d.tick(ok(0.3))
    assert st.phase == "RolledBack" and st.weight == 0 and st.stableService == "v1"
    assert eng.route_weights(d.spec, st) == {"v1": 100, "v2": 0}
    assert eng.guard_weights(d.spec, st) == {"v2": 0, "v1": 100}
    assert st.history[-1].reason == "BakeFailed" and "errors" in st.message and "v1" in st.message
    assert "BakeFailed" in d.events and "RolledBack" in d.events
    assert cond(st, "Baking").status == "False" and cond(st, "Baking").reason == "BakeFailed"
    assert cond(st, "Promoted").status == "False"
    assert st.postPromotion is not None and st.postPromotion.stage == "Done"


def test_post_promotion_guardrails_replace_the_analysis_ones_during_the_bake() -> None:
    pp = {"bake": "5m", "guardrails": [{"name": "latency", "query": "lat", "max": 0.5}]}
    d = Driver(baking(pp))
    st = to_bake(d)
    measured = post.measured_spec(d.spec, st)
    assert [g.name for g in measured.analysis.guardrails] == ["latency"]
    assert post.measured_spec(d.spec, ModelRolloutStatus()) is d.spec  # before the bake: the spec's
    st = d.tick(eng.Observations(guardrails={"latency": Result("value", 0.9)}))
    assert st.phase == "RolledBack" and st.history[-1].reason == "BakeFailed" and "latency" in st.message


def test_the_bake_never_passes_without_data() -> None:
    d = Driver(baking({"bake": "20s"}))
    to_bake(d)
    for _ in range(6):
        d.tick(eng.Observations(guardrails={"errors": Result("noData")}))
    assert d.status.phase == "Baking" and "waiting for a passing analysis" in d.status.message
    d.tick()
    assert d.status.phase == "Promoted"


def test_a_restart_resumes_the_bake_from_status() -> None:
    d = Driver(baking({"bake": "60s"}))
    to_bake(d)
    d.tick()
    saved = ModelRolloutStatus.model_validate(d.status.model_dump(mode="json"))  # what the API server has
    again = Driver(d.spec)
    again.status, again.now = saved, d.now
    ends = saved.postPromotion.stageEndsAt if saved.postPromotion else None
    assert ends is not None and ends > again.now
    while again.status.phase == "Baking":
        again.tick()
    assert again.status.phase == "Promoted" and again.now >= ends
    assert sum(1 for h in again.status.history if h.reason == "BakeStarted") == 1


def test_abort_during_the_bake_returns_traffic_and_promote_full_ends_it() -> None:
    d = Driver(baking({"bake": "10m"}))
    to_bake(d)
    st = d.tick(annotations={ANNOTATION_ABORT: "now"})
    assert st.phase == "Aborted" and eng.route_weights(d.spec, st) == {"v1": 100, "v2": 0}
    assert cond(st, "Baking").status == "False"
    d = Driver(baking({"bake": "10m"}))
    to_bake(d)
    st = d.tick(annotations={ANNOTATION_PROMOTE_FULL: "yes"})
    assert st.phase == "Promoted" and st.stableService == "v2"


def test_spec_stable_changed_during_the_bake_is_not_used_until_it_ends() -> None:
    d = Driver(baking({"bake": "60s"}))
    to_bake(d)
    d.spec = d.spec.model_copy(update={"stable": d.spec.candidate})  # GitOps: Git says v2 is stable
    st = d.tick()
    assert st.phase == "Baking" and eng.route_weights(d.spec, st) == {"v1": 0, "v2": 100}
    d.tick(ok(0.2))
    st = d.tick(ok(0.2))
    assert st.phase == "RolledBack" and eng.route_weights(d.spec, st) == {"v1": 100, "v2": 0}


def test_steps_edited_during_the_bake_do_not_restart_the_walk() -> None:
    d = Driver(baking({"bake": "60s"}))
    to_bake(d)
    d.spec = d.spec.model_copy(update={"steps": [d.spec.steps[0]]})
    st = d.tick()
    assert st.phase == "Baking" and st.weight == 100


def test_a_new_candidate_during_the_bake_rolls_out_over_the_baked_one() -> None:
    d = Driver(baking({"bake": "10m"}))
    to_bake(d)
    d.spec = d.spec.model_copy(update={"candidate": d.spec.candidate.model_copy(update={"service": "v3"})})
    st = d.tick()
    assert st.stableService == "v2" and st.weight == 0 and st.postPromotion is None
    assert eng.route_weights(d.spec, st) == {"v1": 0, "v2": 100, "v3": 0}


def comparison_obs(stable: tuple[float, float], cand: tuple[float, float]) -> eng.Observations:
    counts = eng.ComparisonData(stable=ProportionData(*stable), candidate=ProportionData(*cand))
    return eng.Observations(guardrails={"errors": Result("value", 0.01)}, comparisons={"ctr": counts})


def holdout_driver(percent: int = 10, duration: str = "5m") -> Driver:
    pp = {"bake": "20s", "holdout": {"percent": percent, "duration": duration}}
    d = Driver(baking(pp, analysis={"comparisons": [COMPARISON]}))
    for _ in range(30):
        obs = comparison_obs((5000, 10000), (5000, 10000)) if 0 < d.status.weight < 100 else None
        if d.tick(obs).postPromotion is not None and d.status.postPromotion.stage == "Holdout":  # type: ignore[union-attr]
            return d
    raise AssertionError(f"no holdout: {d.status.phase} {d.status.message}")


def test_holdout_keeps_p_percent_on_the_old_model_and_the_gain_held() -> None:
    d = holdout_driver(percent=10)
    st = d.status
    assert st.phase == "Baking" and st.weight == 90
    assert eng.route_weights(d.spec, st) == {"v1": 10, "v2": 90}
    assert eng.measure_comparisons(st) and st.epochStartedAt is not None
    assert [c.name for c in post.measured_spec(d.spec, st).analysis.comparisons] == ["ctr"]
    row = st.postPromotion.holdout[0] if st.postPromotion else None
    assert row is not None and row.atPromotion is not None and row.atPromotion.effect is not None
    n = 0.0
    while d.status.phase == "Baking":
        n += 6000
        d.tick(comparison_obs((0.3 * n / 9, n / 9), (0.3 * n, n)))
        assert eng.route_weights(d.spec, d.status).get("v1") in (10, 0)
    st = d.status
    pp = st.postPromotion
    assert st.phase == "Promoted" and pp is not None and pp.gain == "held" and pp.stage == "Done"
    assert eng.route_weights(d.spec, st) == {"v1": 0, "v2": 100}
    traj = pp.holdout[0].trajectory
    assert len(traj) >= 20 and all(p.lower is not None and p.upper is not None for p in traj)
    assert traj[-1].upper - traj[-1].lower < traj[0].upper - traj[0].lower  # type: ignore[operator]
    assert "gain held" in st.message and st.history[-1].reason == "HoldoutFinished"


def test_holdout_reports_a_decayed_gain_and_does_not_roll_back_for_it() -> None:
    d = holdout_driver(percent=20)
    n = 0.0
    while d.status.phase == "Baking":
        n += 4000
        d.tick(comparison_obs((0.5 * n / 4, n / 4), (0.40 * n, n)))  # 10 points worse: beyond the margin
    st = d.status
    assert st.phase == "Promoted" and st.postPromotion is not None and st.postPromotion.gain == "decayed"
    assert st.postPromotion.holdout[0].gain == "decayed" and "decayed" in st.message


def test_a_guardrail_breach_in_the_holdout_rolls_back_with_its_own_reason() -> None:
    d = holdout_driver()
    d.tick(
        eng.Observations(
            guardrails={"errors": Result("value", 0.5)},
            comparisons={"ctr": eng.ComparisonData(problem=Result("noData"))},
        )
    )
    st = d.tick(eng.Observations(guardrails={"errors": Result("value", 0.5)}))
    assert st.phase == "RolledBack" and st.history[-1].reason == "HoldoutFailed"
    assert eng.route_weights(d.spec, st) == {"v1": 100, "v2": 0}


def test_trajectory_is_bounded_and_spans_the_whole_holdout() -> None:
    for n in (30, 500, 5000):
        traj: list[EffectPoint] = []
        for i in range(n):
            post.add_point(traj, EffectPoint(time=T0 + timedelta(seconds=i), effect=float(i)))
        assert len(traj) == min(n, TRAJECTORY_POINTS)
        assert traj[0].effect == 0.0 and traj[-1].effect == n - 1
        gaps = [(b.time - a.time).total_seconds() for a, b in itertools.pairwise(traj)]
        assert max(gaps) <= 3 * min(gaps)  # nearly even over the whole span


@pytest.mark.parametrize(
    ("pp", "field"),
    [
        ({"bake": "200h"}, "bake"),
        ({"bake": "1m", "holdout": {"percent": 0, "duration": "1h"}}, "percent"),
        ({"bake": "1m", "holdout": {"percent": 60, "duration": "1h"}}, "percent"),
        ({"bake": "1m", "holdout": {"percent": 5, "duration": "800h"}}, "duration"),
        ({"bake": "1m", "holdout": {"percent": 5, "duration": "1h"}}, "comparison"),
        ({"bake": "soon"}, "bake"),
    ],
)
def test_bad_post_promotion_is_refused_naming_the_field(pp: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as e:
        baking(pp)
    assert field in str(e.value)


def test_a_spec_without_post_promotion_promotes_as_before() -> None:
    d = Driver(spec([{"setWeight": 50}, {"setWeight": 100}]))
    for _ in range(20):
        if d.tick().phase == "Promoted":
            break
    assert d.status.phase == "Promoted" and d.status.postPromotion is None and "Baking" not in d.events


def test_a_bake_failure_is_notified_like_other_rollbacks_with_its_reason() -> None:
    from model_rollouts.engine.actions import Event
    from model_rollouts.notify import events as notify_events

    d = Driver(baking({"bake": "10m"}))
    to_bake(d)
    d.tick(ok(0.2))
    before = d.status
    decision = eng.reconcile(d.spec, before, now=d.now, generation=1, observations=ok(0.3))
    out = notify_events.notices("ModelRollout", "ml", "r", before, decision.status, decision.actions)
    rolled = [n for n in out if n.event == "RolledBack"]
    assert len(rolled) == 1 and rolled[0].reason == "BakeFailed" and rolled[0].severity == "warning"
    assert rolled[0].weights == {"candidate": 0, "stable": 100}
    assert any(
        isinstance(a, Event) and a.reason == "BakeFailed" and a.type == "Warning" for a in decision.actions
    )


def test_the_report_plots_the_holdout_effect_and_tabulates_the_gain(tmp_path: Any) -> None:
    pytest.importorskip("matplotlib")
    from model_rollouts.report.document import write

    d = holdout_driver(percent=10)
    n = 0.0
    while d.status.phase == "Baking":
        n += 6000
        d.tick(comparison_obs((0.3 * n / 9, n / 9), (0.3 * n, n)))
    obj = {
        "apiVersion": "mlrollouts.io/v1alpha1",
        "kind": "ModelRollout",
        "metadata": {"name": "r", "namespace": "ml"},
        "spec": d.spec.model_dump(mode="json", exclude_none=True),
        "status": d.status.model_dump(mode="json", exclude_none=True),
    }
    md = write(obj, "md", tmp_path / "r.md")
    assert "Holdout ctr: effect over time, gain held" in md.panels
    text = md.path.read_text()
    assert "## Holdout after promotion" in text and "| ctr | held |" in text
    assert "After promotion**: stage Done (replaced: v1), gain held" in text
    image = next(i for i in md.images if "holdout-ctr" in i.name)
    assert image.stat().st_size > 5000
    html = write(obj, "html", tmp_path / "r.html").path.read_text()
    assert 'id="holdout-ctr"' in html and "Holdout after promotion" in html
    # Without a holdout there is no holdout panel.
    del obj["status"]["postPromotion"]
    assert not any(t.startswith("Holdout") for t in write(obj, "md", tmp_path / "s.md").panels)


def test_the_plugin_says_what_a_baking_rollout_waits_for() -> None:
    from model_rollouts.cli.view import rollout_view

    d = Driver(baking({"bake": "60s"}, analysis={"comparisons": [COMPARISON]}))
    for _ in range(30):
        obs = comparison_obs((5000, 10000), (5000, 10000)) if 0 < d.status.weight < 100 else None
        if d.tick(obs).phase == "Baking":
            break
    obj = {
        "apiVersion": "mlrollouts.io/v1alpha1",
        "kind": "ModelRollout",
        "metadata": {"name": "r", "namespace": "ml", "generation": 1},
        "spec": d.spec.model_dump(mode="json", exclude_none=True),
        "status": d.status.model_dump(mode="json", exclude_none=True),
    }
    waiting = rollout_view(obj, now=d.now)["waitingFor"]
    assert any(w.startswith("the bake to end at") for w in waiting), waiting
    assert not any("comparison" in w for w in waiting), waiting  # nothing waits for evidence any more


@pytest.mark.parametrize("policy", ["rollback", "hold"])
def test_a_bake_without_data_past_progress_deadline_follows_on_progress_deadline(policy: str) -> None:
    d = Driver(baking({"bake": "20s"}, progressDeadline="1m", onProgressDeadline=policy))
    to_bake(d)
    no_data = eng.Observations(guardrails={"errors": Result("noData")})
    for _ in range(7):  # 20 s of bake + 50 s late: not yet past 1m
        d.tick(no_data)
    assert d.status.phase == "Baking"
    for _ in range(3):
        d.tick(no_data)
    if policy == "rollback":
        assert d.status.phase == "RolledBack" and d.status.history[-1].reason == "BakeFailed"
        assert eng.route_weights(d.spec, d.status) == {"v1": 100, "v2": 0}
    else:
        assert d.status.phase == "Baking" and d.events.count("ProgressDeadlineExceeded") == 1
        assert "progressDeadline" in d.status.message
        d.tick()
        assert d.status.phase == "Promoted"


def test_an_invalid_spec_during_the_bake_resumes_the_same_bake_when_valid_again() -> None:
    from model_rollouts.engine.status import invalid

    d = Driver(baking({"bake": "60s"}))
    to_bake(d)
    started = d.status.postPromotion.startedAt if d.status.postPromotion else None
    d.status, _ = invalid(d.status, "spec.trafficRouting: route missing", d.now, 2)
    assert d.status.phase == "Invalid"
    st = d.tick()
    assert st.phase == "Baking" and st.postPromotion is not None and st.postPromotion.startedAt == started
    while d.status.phase == "Baking":
        d.tick()
    assert d.status.phase == "Promoted" and [h.reason for h in d.status.history].count("BakeStarted") == 1


def test_the_bake_and_holdout_starts_are_step_notifications() -> None:
    from model_rollouts.notify import events as notify_events

    d = holdout_driver(percent=10)
    reasons = [h.reason for h in d.status.history]
    assert "BakeStarted" in reasons and "HoldoutStarted" in reasons
    assert notify_events.event_of("BakeStarted") == "Step" == notify_events.event_of("HoldoutStarted")
