"""Shadow steps in the rollout engine: mirrored copies analysed at candidate weight 0, a breach rolls
back (the mirror removed, the reason naming the shadow), a healthy shadow ends after its duration."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from model_rollouts.analysis.vocabulary import Result
from model_rollouts.api.rollout import ANNOTATION_ABORT
from model_rollouts.engine import rollout as eng
from model_rollouts.engine import steps
from tests.unit.test_rollout_engine import Driver, run_until_done, spec

SHADOW_FIRST: list[dict[str, Any]] = [
    {"shadow": {"percent": 20, "duration": "30s"}},
    {"setWeight": 50},
    {"setWeight": 100},
]


def test_a_shadow_step_mirrors_at_weight_zero_is_analysed_then_ends_before_the_first_weight() -> None:
    d = Driver(spec(SHADOW_FIRST))
    mirrors: list[tuple[int, tuple[str, int] | None]] = []
    for _ in range(60):
        st = d.tick()
        mirrors.append((st.weight, eng.route_mirror(d.spec, st)))
        if st.phase == "Promoted":
            break
    assert d.status.phase == "Promoted"
    assert d.weights == [0, 50, 100]
    # The mirror is on only at weight 0, to the candidate, and gone from the first weight on.
    shadow = [m for w, m in mirrors if m is not None]
    assert shadow and set(shadow) == {("v2", 20)}
    assert all(m is None for w, m in mirrors if w > 0)
    assert d.events.index("ShadowStarted") < d.events.index("ShadowEnded") < d.events.index("WeightChanged")
    # Analyses ran during the shadow (weight 0): the ones before the 30 s were up (10 s interval).
    analysed = [h for h in d.status.series if h.weight == 0]
    assert len(analysed) >= 2, d.status.series
    assert d.status.shadowPercent is None


def test_status_and_message_show_the_shadow_while_it_runs() -> None:
    d = Driver(spec(SHADOW_FIRST))
    st = d.tick()
    assert (st.weight, st.shadowPercent, st.currentStep) == (0, 20, 0)
    assert "20% of requests mirrored to v2" in st.message
    assert eng.needs_measurement(d.spec, st, d.now)
    st = d.tick()
    assert "shadow at weight 0, 20% of requests mirrored to v2" in st.message and "s left" in st.message


def test_a_guardrail_breach_in_shadow_rolls_back_with_the_mirror_removed_and_says_so() -> None:
    d = Driver(spec(SHADOW_FIRST))
    d.tick()
    st = run_until_done(d, obs=eng.Observations(guardrails={"errors": Result("value", 0.5)}))
    assert st.phase == "RolledBack" and st.weight == 0 and st.shadowPercent is None
    assert eng.route_mirror(d.spec, st) is None
    assert "shadow step" in st.message and "no user saw" in st.message
    assert d.weights == [0], "the candidate never had a user-facing weight"
    assert eng.deletion_weights(d.spec, st) is None


def test_a_breach_below_the_failure_limit_holds_the_shadow_past_its_duration() -> None:
    d = Driver(
        spec(
            SHADOW_FIRST,
            analysis={"guardrails": [{"name": "errors", "query": "q", "max": 0.05, "failureLimit": 99}]},
        )
    )
    bad = eng.Observations(guardrails={"errors": Result("value", 0.5)})
    for _ in range(8):
        st = d.tick(obs=bad)
    assert (st.phase, st.weight, st.shadowPercent) == ("Progressing", 0, 20)
    assert "holding at weight 0 after shadow step 0" in st.message
    assert d.weights == [0]


def test_abort_and_deletion_during_shadow_remove_the_mirror() -> None:
    d = Driver(spec(SHADOW_FIRST))
    st = d.tick()
    assert eng.deletion_weights(d.spec, st) == {"v1": 100, "v2": 0}  # the deletion write removes the mirror
    st = d.tick(annotations={ANNOTATION_ABORT: "now"})
    assert st.phase == "Aborted" and eng.route_mirror(d.spec, st) is None and st.shadowPercent is None


def test_comparisons_are_measured_in_shadow_with_the_mirrored_share() -> None:
    d = Driver(spec(SHADOW_FIRST))
    st = d.tick()
    assert eng.measure_comparisons(st)
    assert steps.exposure(st) == 20
    st.shadowPercent = None
    assert not eng.measure_comparisons(st) and steps.exposure(st) == 0


@pytest.mark.parametrize(
    "bad",
    [
        [{"setWeight": 10}, {"shadow": {"percent": 20, "duration": "1m"}}, {"setWeight": 100}],
        [{"shadow": {"percent": 0, "duration": "1m"}}],
        [{"shadow": {"percent": 101, "duration": "1m"}}],
        [{"shadow": {"percent": 10}}],
    ],
)
def test_invalid_shadow_steps_are_refused_naming_the_field(bad: list[dict[str, Any]]) -> None:
    with pytest.raises(ValidationError, match="steps"):
        spec(bad)


def test_a_shadow_after_a_weight_zero_step_is_fine() -> None:
    assert spec([{"setWeight": 0}, {"shadow": {"percent": 5, "duration": "1m"}}, {"setWeight": 100}])


def test_a_comparison_without_data_in_shadow_does_not_hold_it_but_still_gates_full_traffic() -> None:
    comparison = {"name": "feedback", "successes": "s", "trials": "t", "margin": 0.1}
    d = Driver(spec(SHADOW_FIRST, analysis={"comparisons": [comparison]}))
    no_feedback = eng.Observations(
        guardrails={"errors": Result("value", 0.01)},
        comparisons={"feedback": eng.ComparisonData(problem=Result("noData", message="no series"))},
    )
    for _ in range(8):
        st = d.tick(obs=no_feedback)
    # The shadow ended on its guardrails; the comparison, unmeasurable there, was undecided.
    assert st.weight == 50 and st.shadowPercent is None, st.message
    assert "ShadowEnded" in d.events
    shadow_look = next(p for p in st.series if p.weight == 0)
    assert shadow_look is not None
    # Without data at 50% it holds as always: never full traffic without the comparison's pass.
    for _ in range(8):
        st = d.tick(obs=no_feedback)
    assert st.weight == 50 and st.phase == "Progressing"


def test_promote_ends_the_shadow_early_and_the_next_weight_follows() -> None:
    from model_rollouts.api.rollout import ANNOTATION_PROMOTE

    d = Driver(spec([{"shadow": {"percent": 20, "duration": "10m"}}, {"setWeight": 50}, {"setWeight": 100}]))
    d.tick()
    d.tick()
    st = d.tick(annotations={ANNOTATION_PROMOTE: "t1"})
    assert (st.weight, st.shadowPercent) == (50, None)
    assert eng.route_mirror(d.spec, st) is None
    assert [e for e in d.events if e in ("PromoteRequested", "ShadowEnded", "WeightChanged")] == [
        "PromoteRequested",
        "ShadowEnded",
        "WeightChanged",
    ]
