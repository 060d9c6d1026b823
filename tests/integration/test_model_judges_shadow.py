"""The prediction-shift judge in a shadow step, on the real stack through the real proxy (both routers).

The candidate answers only mirrored copies (weight 0); its own score histogram is what the judge
compares with the stable's. A candidate with the stable's mean score and a much wider spread is rolled
back in the shadow step, and no client ever got an answer from it. The fixtures are the router
suite's (``tests/integration/test_rollout_routers.py``), as in ``test_shadow.py``; a module of its own
so that its stacks never run beside ``test_model_judges.py``'s.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.objects import CANDIDATE, STABLE, phase
from tests.integration.test_model_judges import SHIFT
from tests.integration.test_rollout_routers import (  # noqa: F401  (fixtures used by name)
    ROLLOUTS,
    Routed,
    fresh,
    routed,
)
from tests.integration.test_shadow import client_answers, delta, wait_mirror


@pytest.fixture()
def shaped(fresh: Routed) -> Iterator[Routed]:  # noqa: F811  (the router suite's fixture, by name)
    """The stable's scores Beta(mean 0.6, concentration 20); the candidate's as wide as concentration 3."""
    fresh.stack.servers[STABLE].set(score_concentration=20.0)
    fresh.stack.servers[CANDIDATE].set(score_concentration=3.0)
    yield fresh
    for svc in (STABLE, CANDIDATE):
        fresh.stack.servers[svc].set(score_concentration=0.0)


def test_a_shifted_candidate_is_stopped_in_a_shadow_step_before_any_user_sees_it(shaped: Routed) -> None:
    stack, percent = shaped.stack, 50
    doc = shaped.rollout(
        "shadow-shift", [{"shadow": {"percent": percent, "duration": "10m"}}, {"setWeight": 100}]
    )
    doc["spec"]["analysis"]["predictionShift"] = [SHIFT]
    answers_before = client_answers(shaped)
    stack.apply(doc)
    obj = stack.wait_for(ROLLOUTS, "shadow-shift", lambda o: phase(o) in ("RolledBack", "Promoted"), 150)
    st = obj["status"]
    assert st["phase"] == "RolledBack", st.get("message")
    assert st["history"][-1]["reason"] == "PredictionShifted"
    assert "prediction-shift judge score-shape" in st["message"] and "shadow step" in st["message"]
    m = next(m for m in st["lastAnalysis"] if m["kind"] == "predictionShift")
    assert m["verdict"] == "fail" and m["details"]["psi"] >= 0.1 and m["details"]["candidateN"] >= 500
    wait_mirror(shaped, {})
    shaped.wait_weights({STABLE: 100, CANDIDATE: 0})
    answers = client_answers(shaped)
    # The candidate's answers (its shifted scores) reached no client.
    assert delta(answers["ok"], answers_before["ok"]).get(CANDIDATE, 0) == 0
    assert max((h["weight"] for h in st["history"]), default=0) == 0
    print(f"\n{shaped.kind}: shifted in shadow -> {st['message'][:160]}")
