"""Dead arms get no traffic: an arm whose Service has no ready endpoint gets weight 0 with a reason
and an Event, and gets its weight back when ready again (both kinds; pure engine)."""

from __future__ import annotations

from dataclasses import replace

from model_rollouts.analysis.stats import ProportionData
from model_rollouts.api.common import get_condition
from model_rollouts.engine import experiment as xeng
from model_rollouts.engine import rollout as reng
from model_rollouts.metrics.provider import Result
from tests.unit.test_experiment_engine import events, make_spec, obs, set_weights, start, step, weights
from tests.unit.test_rollout_engine import Driver, spec

DATA = {n: ProportionData(50, 100) for n in ("control", "v1", "v2")}


def ready(**r: bool | None) -> xeng.Observations:
    return replace(obs(DATA), ready=dict(r))


# --------------------------------------------------------------------------- experiments


def test_a_dead_variant_gets_0_its_share_spread_over_the_fixed_split_and_back_when_ready() -> None:
    spec_ = make_spec(3)
    d = start(spec_)
    assert weights(d) == {"control": 34, "v1": 33, "v2": 33}
    d = step(spec_, d, 5, ready(control=True, v1=True, v2=False))
    assert weights(d) == {"control": 50, "v1": 50, "v2": 0}
    assert set_weights(d) == [{"svc-a": 50, "svc-b": 50, "svc-c": 0}]
    assert "ArmUnready" in events(d)
    v2 = next(v for v in d.status.variants if v.name == "v2")
    assert v2.unready and v2.active  # not dropped: it comes back
    cond = get_condition(d.status.conditions, "ArmsReady")
    assert cond is not None and cond.status == "False" and "v2" in cond.message
    # Unknown readiness (no EndpointSlices, a failed read) changes nothing.
    d = step(spec_, d, 10, ready(control=True, v1=True, v2=None))
    assert weights(d) == {"control": 50, "v1": 50, "v2": 0} and "ArmReady" not in events(d)
    d = step(spec_, d, 15, obs(DATA))  # no readiness at all: still nothing
    assert weights(d)["v2"] == 0
    # Ready again: the configured split is back, with an Event and the condition True.
    d = step(spec_, d, 20, ready(control=True, v1=True, v2=True))
    assert weights(d) == {"control": 34, "v1": 33, "v2": 33}
    assert "ArmReady" in events(d)
    cond = get_condition(d.status.conditions, "ArmsReady")
    assert cond is not None and cond.status == "True"
    assert not any(v.unready for v in d.status.variants)


def test_fixed_weights_are_respected_when_a_variant_is_unready() -> None:
    spec_ = make_spec(
        3,
        variants=[
            {"name": "control", "service": "svc-a", "control": True, "weight": 50},
            {"name": "v1", "service": "svc-b", "weight": 30},
            {"name": "v2", "service": "svc-c", "weight": 20},
        ],
    )
    d = start(spec_)
    d = step(spec_, d, 5, ready(v1=False))
    assert weights(d) == xeng.fixed_weights(spec_, {"control", "v2"}) == {"control": 72, "v1": 0, "v2": 28}


def test_a_dead_control_is_never_zeroed_the_analysis_holds_and_says_why() -> None:
    spec_ = make_spec(3)
    d = start(spec_)
    d = step(spec_, d, 5, ready(control=False, v1=True, v2=True))
    assert weights(d) == {"control": 34, "v1": 33, "v2": 33} and set_weights(d) == []
    assert "ControlUnready" in events(d)
    assert d.status.phase == "Running" and "control control has no ready endpoints" in d.status.message
    cond = get_condition(d.status.conditions, "ArmsReady")
    assert cond is not None and cond.reason == "ControlUnready"
    # Even with a clear winner in the data, nothing is decided while the control is dead.
    win = {
        "control": ProportionData(100, 1000),
        "v1": ProportionData(400, 1000),
        "v2": ProportionData(100, 1000),
    }
    d = step(spec_, d, 10, replace(obs(win), ready={"control": False}))
    assert d.status.phase == "Running" and d.status.decision is None
    d = step(spec_, d, 15, replace(obs(win), ready={"control": True}))
    assert "ArmReady" in events(d)
    assert not next(v for v in d.status.variants if v.name == "control").unready


def test_thompson_excludes_an_unready_arm_and_takes_it_back() -> None:
    spec_ = make_spec(3, allocation={"strategy": "thompson", "minWeight": 10, "maxStep": 10})
    d = start(spec_)
    d = step(spec_, d, 5, ready(v1=False))
    w = weights(d)
    assert w["v1"] == 0 and sum(w.values()) == 100 and min(w["control"], w["v2"]) >= 10
    for t in (10, 15, 20):  # the bandit's own updates keep it at 0 while it is unready
        d = step(spec_, d, t, obs(DATA))
        assert weights(d)["v1"] == 0
    d = step(spec_, d, 25, ready(v1=True))
    assert weights(d)["v1"] >= 10 and "ArmReady" in events(d)


def test_an_unready_variant_is_not_given_weight_when_another_is_dropped() -> None:
    spec_ = make_spec(4)
    d = start(spec_)
    data = {**DATA, "v3": ProportionData(50, 100)}
    d = step(spec_, d, 5, replace(obs(data), ready={"v2": False}))
    assert weights(d)["v2"] == 0
    d = step(spec_, d, 10, obs(data, errors={"v1": 0.5}))
    d = step(spec_, d, 15, obs(data, errors={"v1": 0.5}))  # v1 dropped (failureLimit 2)
    assert weights(d) == {"control": 50, "v1": 0, "v2": 0, "v3": 50}


def test_the_unready_flag_lives_in_status_so_a_restart_resumes() -> None:
    spec_ = make_spec(3)
    d = start(spec_)
    d = step(spec_, d, 5, ready(v2=False))
    restored = xeng.ModelExperimentStatus.model_validate(d.status.model_dump(mode="json"))
    assert next(v for v in restored.variants if v.name == "v2").unready
    d2 = xeng.reconcile(spec_, restored, now=d.status.lastAnalysisTime, generation=1)
    assert {v.name: v.weight for v in d2.status.variants}["v2"] == 0


# --------------------------------------------------------------------------- rollouts


def _obs(r: bool | None) -> reng.Observations:
    return reng.Observations(guardrails={"errors": Result("value", 0.0)}, candidate_ready=r)


def test_an_unready_candidate_goes_to_0_keeps_its_step_and_resumes_its_weight() -> None:
    d = Driver(spec([{"setWeight": 20}, {"setWeight": 60}, {"setWeight": 100}], progressDeadline="1h"))
    d.tick()
    d.tick(_obs(True))
    assert d.status.weight == 60 and reng.route_weights(d.spec, d.status) == {"v1": 40, "v2": 60}
    step_before = d.status.currentStep
    st = d.tick(_obs(False))
    assert reng.route_weights(d.spec, st) == {"v1": 100, "v2": 0}
    assert st.candidateUnready and st.weight == 60 and st.currentStep == step_before
    assert st.phase == "Progressing" and "no ready endpoints" in st.message
    assert d.events.count("CandidateUnready") == 1 and "RolledBack" not in d.events
    for r in (False, None, False):  # unknown changes nothing; no advance while unready
        st = d.tick(_obs(r))
        assert reng.route_weights(d.spec, st) == {"v1": 100, "v2": 0} and st.currentStep == step_before
    assert d.events.count("CandidateUnready") == 1  # one Event per transition
    st = d.tick(_obs(True))
    assert not st.candidateUnready and "CandidateReady" in d.events
    assert reng.route_weights(d.spec, st)["v2"] >= 60  # the step's weight back (or the next step)
    assert st.phase == "Progressing" and not any(e in d.events for e in ("RolledBack", "Aborted"))


def test_candidate_readiness_unknown_before_it_was_unready_changes_nothing() -> None:
    d = Driver(spec([{"setWeight": 20}, {"setWeight": 60}], progressDeadline="1h"))
    d.tick()
    st = d.tick(_obs(None))
    assert not st.candidateUnready and st.weight == 60
    assert reng.route_weights(d.spec, st) == {"v1": 40, "v2": 60}


def test_an_unready_candidate_at_a_manual_gate_says_so_in_its_message() -> None:
    d = Driver(spec([{"setWeight": 30}, {"pause": {}}], progressDeadline="1h"))
    d.tick()
    st = d.tick(_obs(False))
    assert reng.route_weights(d.spec, st) == {"v1": 100, "v2": 0} and st.weight == 30
    assert "no ready endpoints" in st.message, st.message
    st = d.tick(_obs(True))
    assert reng.route_weights(d.spec, st) == {"v1": 70, "v2": 30} and "no ready endpoints" not in st.message


def test_a_leader_under_confirmation_that_dies_waits_at_0_and_gets_its_half_back() -> None:
    spec_ = make_spec(3, allocation={"strategy": "thompson", "minWeight": 10, "maxStep": 20})
    d = start(spec_)
    d = step(spec_, d, 5, obs({n: ProportionData(0, 0) for n in ("control", "v1", "v2")}))
    big = {
        "control": ProportionData(500, 1000),
        "v1": ProportionData(510, 1000),
        "v2": ProportionData(800, 1000),
    }
    d = step(spec_, d, 10, obs(big))
    assert d.status.confirmation is not None and weights(d) == {"control": 50, "v1": 0, "v2": 50}
    d = step(spec_, d, 15, replace(obs(big), ready={"v2": False}))
    assert weights(d) == {"control": 100, "v1": 0, "v2": 0} and "ArmUnready" in events(d)
    d = step(spec_, d, 20, replace(obs(big), ready={"v2": True}))
    assert weights(d) == {"control": 50, "v1": 0, "v2": 50} and "ArmReady" in events(d)
