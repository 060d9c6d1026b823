"""Shadow steps on the real stack, through the real proxy, on both routers.

A rollout step ``shadow: {percent: P, duration: D}``: the operator writes a mirror (HTTPRoute
``RequestMirror`` with ``percent``; VirtualService ``mirror`` + ``mirrorPercentage``) and keeps the
candidate's weight at 0. Debian's nginx follows the route the operator writes
(``tests/harness/gateway.py``), the traffic generator sends every request through it, and the model
servers count what they received: the candidate's server gets P% of the requests as mirrored copies,
the client gets no answer from it. The real kube-apiserver with the real Gateway API and Istio CRDs,
real Prometheus, the operator as its ServiceAccount. The fixtures are the router suite's
(``tests/integration/test_rollout_routers.py``).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from tests.harness.objects import CANDIDATE, STABLE, phase
from tests.integration.test_rollout_routers import (  # noqa: F401  (fixtures used by name)
    ROLLOUTS,
    Routed,
    fresh,
    routed,
    served,
)


@pytest.fixture()
def on(fresh: Routed) -> Routed:  # noqa: F811  (the router suite's fixture, by name)
    """All traffic on a healthy stable, through nginx, on the router of this parameter."""
    return fresh


#: Requests counted at the stable's server (every client request) during the measured window: 40 s of
#: the generator's 50/s, inside the 60 s shadow (the mirror reaches nginx within a few seconds).
REQUESTS = 2000
TOLERANCE = 0.03


def mirrors(r: Routed) -> dict[str, int]:
    return dict(r.reader().read().mirrors)


def wait_mirror(r: Routed, want: dict[str, int], timeout: float = 60.0) -> str:
    """Until the route carries the mirror ``want`` (backend -> percent) and nginx serves that version;
    returns the route's resourceVersion."""
    deadline = time.monotonic() + timeout
    while mirrors(r) != want:
        if time.monotonic() > deadline:
            raise AssertionError(f"{r.kind} mirrors {mirrors(r)}, expected {want}")
        time.sleep(0.2)
    rv = r.resource_version()
    r.gateway.wait_version(rv, timeout=max(1.0, deadline - time.monotonic()))
    return rv


def settled(r: Routed) -> dict[str, int]:
    """The servers' counters once they stopped moving (mirrored copies finish after the answers)."""
    last = served(r.stack)
    for _ in range(30):
        time.sleep(0.1)
        now = served(r.stack)
        if now == last:
            break
        last = now
    return last


def client_answers(r: Routed) -> dict[str, Any]:
    assert r.stack.loadgen is not None
    s = r.stack.loadgen.stats()
    return {"ok": dict(s["ok"]), "errors": dict(s["errors"]), "total_errors": s["total_errors"]}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}


def test_shadow_mirrors_p_percent_to_the_candidate_nobody_sees_it_then_the_steps_go_on(on: Routed) -> None:
    stack, percent = on.stack, 20
    steps: list[dict[str, Any]] = [
        {"shadow": {"percent": percent, "duration": "60s"}},
        {"setWeight": 50},
        {"setWeight": 100},
    ]
    stack.apply(on.rollout("shadow", steps))
    spec = stack.get(ROLLOUTS, "shadow")["spec"]
    assert spec["steps"][0]["shadow"] == {"percent": percent, "duration": "60s"}
    obj = stack.wait_for(
        ROLLOUTS, "shadow", lambda o: (o.get("status") or {}).get("shadowPercent") == percent, 60
    )
    assert obj["status"]["weight"] == 0 and "mirrored" in obj["status"]["message"]
    rv = wait_mirror(on, {CANDIDATE: percent})
    assert on.weights() == {STABLE: 100, CANDIDATE: 0}
    before, answers_before = settled(on), client_answers(on)
    deadline = time.monotonic() + 70
    while served(stack)[STABLE] - before[STABLE] < REQUESTS and time.monotonic() < deadline:
        time.sleep(0.5)
    counted, answers = delta(settled(on), before), client_answers(on)
    # The window lies inside the shadow: the route was not written meanwhile.
    assert on.resource_version() == rv, "the shadow ended before enough requests were counted"
    share = counted[CANDIDATE] / counted[STABLE]
    print(
        f"\n{on.kind} shadow {percent}%: stable answered {counted[STABLE]} client requests; the "
        f"candidate's server counted {counted[CANDIDATE]} mirrored copies ({100 * share:.2f}%); "
        f"client answers from the candidate: {delta(answers['ok'], answers_before['ok']).get(CANDIDATE, 0)}"
    )
    assert counted[STABLE] >= REQUESTS, counted
    assert abs(share - percent / 100) <= TOLERANCE, counted
    assert delta(answers["ok"], answers_before["ok"]).get(CANDIDATE, 0) == 0
    assert delta(answers["errors"], answers_before["errors"]).get(CANDIDATE, 0) == 0

    # After the duration, with healthy analyses, the mirror goes and the weights follow the steps.
    obj = stack.wait_for(ROLLOUTS, "shadow", lambda o: phase(o) == "Promoted", 300)
    on.wait_weights({STABLE: 0, CANDIDATE: 100})
    assert mirrors(on) == {}
    route = on.reader().read().raw
    if on.router == "istio":
        assert "mirror" not in route["spec"]["http"][0] and "mirrorPercentage" not in route["spec"]["http"][0]
    else:
        assert "filters" not in route["spec"]["rules"][0]
    events = [h["event"] for h in obj["status"]["history"]]
    assert events.index("ShadowStarted") < events.index("ShadowEnded") < events.index("WeightChanged")
    ended = next(h for h in obj["status"]["history"] if h["event"] == "ShadowEnded")
    assert ended["weight"] == 0
    assert obj["status"].get("shadowPercent") is None


def test_a_breaching_candidate_in_shadow_is_rolled_back_and_no_client_saw_it(on: Routed) -> None:
    stack, percent = on.stack, 30
    stack.apply(
        on.rollout("bad-shadow", [{"shadow": {"percent": percent, "duration": "10m"}}, {"setWeight": 100}])
    )
    stack.wait_for(
        ROLLOUTS, "bad-shadow", lambda o: (o.get("status") or {}).get("shadowPercent") == percent, 60
    )
    wait_mirror(on, {CANDIDATE: percent})
    time.sleep(6)  # one healthy analysis on the mirrored copies
    answers_before, before = client_answers(on), settled(on)
    stack.servers[CANDIDATE].set(error_rate=0.5)
    t0 = time.monotonic()
    obj = stack.wait_for(ROLLOUTS, "bad-shadow", lambda o: phase(o) == "RolledBack", 90)
    wait_mirror(on, {})
    took = time.monotonic() - t0
    on.wait_weights({STABLE: 100, CANDIDATE: 0})
    mid = settled(on)
    answers = client_answers(on)
    message = obj["status"]["message"]
    print(
        f"\n{on.kind}: breach in shadow -> rolled back and nginx without the mirror in {took:.1f}s; "
        f"candidate's server counted {mid[CANDIDATE] - before[CANDIDATE]} copies meanwhile; {message}"
    )
    assert "error-rate" in message and "shadow" in message
    assert obj["status"]["weight"] == 0 and obj["status"].get("shadowPercent") is None
    # The candidate answered (and failed) mirrored copies only: no client got an answer or an error from it.
    assert mid[CANDIDATE] > before[CANDIDATE]
    assert delta(answers["ok"], answers_before["ok"]).get(CANDIDATE, 0) == 0
    assert delta(answers["errors"], answers_before["errors"]).get(CANDIDATE, 0) == 0
    assert answers["total_errors"] == answers_before["total_errors"]
    # With the mirror removed, the candidate's server gets nothing more.
    time.sleep(2.0)
    assert served(stack)[CANDIDATE] == settled(on)[CANDIDATE] == mid[CANDIDATE]
    stack.servers[CANDIDATE].set(error_rate=0.0)


def test_the_api_server_refuses_a_shadow_step_after_a_weight(on: Routed) -> None:
    bad = on.rollout("late-shadow", [{"setWeight": 10}, {"shadow": {"percent": 10, "duration": "1m"}}])
    with pytest.raises(ApiException) as e:
        on.stack.apply(bad)
    assert e.value.status == 422 and "shadow step must come before" in str(e.value.body)
    for shadow in ({"percent": 0, "duration": "1m"}, {"percent": 10}):
        with pytest.raises(ApiException) as e:
            on.stack.apply(on.rollout("bad-field", [{"shadow": shadow}]))
        assert e.value.status == 422 and "shadow" in str(e.value.body)


@pytest.mark.parametrize("end", ["abort", "delete"])
def test_abort_or_deletion_during_shadow_removes_the_mirror(on: Routed, end: str) -> None:
    from kubernetes import client

    stack = on.stack
    stack.apply(on.rollout("ended", [{"shadow": {"percent": 10, "duration": "10m"}}, {"setWeight": 100}]))
    stack.wait_for(ROLLOUTS, "ended", lambda o: (o.get("status") or {}).get("shadowPercent") == 10, 60)
    wait_mirror(on, {CANDIDATE: 10})
    co = client.CustomObjectsApi(stack.api)
    if end == "abort":
        co.patch_namespaced_custom_object(
            "mlrollouts.io", "v1alpha1", stack.namespace, ROLLOUTS, "ended",
            {"metadata": {"annotations": {"mlrollouts.io/abort": "shadow-test"}}},
        )  # fmt: skip
        stack.wait_for(ROLLOUTS, "ended", lambda o: phase(o) == "Aborted", 60)
    else:
        co.delete_namespaced_custom_object("mlrollouts.io", "v1alpha1", stack.namespace, ROLLOUTS, "ended")
    wait_mirror(on, {}, timeout=30)
    assert on.weights() == {STABLE: 100, CANDIDATE: 0}
    quiet = settled(on)[CANDIDATE]
    time.sleep(2.0)
    assert served(stack)[CANDIDATE] == quiet, "nginx still mirrors to the candidate"
