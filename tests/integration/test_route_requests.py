"""One route read and at most one route write per tick (issue 17), counted by the real API server.

The API server logs (audit, Metadata level) every request for HTTPRoutes and for the mlrollouts.io
resources. A tick of the operator ends in a status write of the object it decided (every analysis
writes ``lastAnalysisTime``), so the operator's requests are cut at its status writes: each cut
(the requests after one status write, up to and including the next) is one tick, and holds at most
one GET and at most one PATCH of the HTTPRoute. Before, a tick read the route twice (the check,
then the write) and an experiment with retired Services three times.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness.cluster import ControlPlane
from tests.harness.objects import (
    CANDIDATE,
    EXPERIMENTS,
    ROLLOUTS,
    ROUTE,
    STABLE,
    experiment,
    fresh_fraud,
    phase,
    rollout,
    weight,
)
from tests.harness.stack import Stack
from tests.integration.test_tenancy_bounds import OPERATOR_USER, prom

AUDIT_RULES: list[dict[str, Any]] = [
    {"level": "Metadata", "resources": [{"group": "gateway.networking.k8s.io", "resources": ["httproutes"]}]},
    {"level": "Metadata", "resources": [{"group": "mlrollouts.io"}]},
    {"level": "None"},
]


@pytest.fixture(scope="module")
def stack(real_components: None) -> Iterator[Stack]:
    with Stack(
        variants={STABLE: {"error_rate": 0.0}, CANDIDATE: {"error_rate": 0.0}},
        route=ROUTE,
        rps=50,
        max_seconds=600,
        cluster=ControlPlane(audit=True, audit_rules=AUDIT_RULES),
    ) as s:
        s.start_operator()
        yield s


@pytest.fixture()
def fresh(stack: Stack) -> Iterator[Stack]:
    yield from fresh_fraud(stack, ROLLOUTS, EXPERIMENTS)


def ticks(stack: Stack, since: int, plural: str, name: str) -> list[dict[str, int]]:
    """The operator's requests after audit event ``since``, cut at its status writes of ``name``:
    per tick, the GETs and PATCHes of the HTTPRoute (a tick still under way at the end is left out)."""
    out: list[dict[str, int]] = []
    tick = {"get": 0, "patch": 0}
    for e in stack.cluster.audit_events()[since:]:
        if e.get("user", {}).get("username") != OPERATOR_USER:
            continue
        ref = e.get("objectRef") or {}
        if ref.get("resource") == "httproutes" and ref.get("name") == ROUTE and e["verb"] in tick:
            tick[e["verb"]] += 1
        elif (ref.get("resource"), ref.get("subresource"), ref.get("name")) == (plural, "status", name) and e[
            "verb"
        ] in ("patch", "update"):  # the tick's end, its status write (a 409 too: the next tick reads afresh)
            out.append(tick)
            tick = {"get": 0, "patch": 0}
    return out


def wait_ticks(stack: Stack, since: int, plural: str, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(ticks(stack, since, plural, "counted")) < n:
        time.sleep(1)


def check(found: list[dict[str, int]], what: str, min_ticks: int, min_patches: int) -> None:
    gets = sum(t["get"] for t in found)
    patches = sum(t["patch"] for t in found)
    print(f"\n{what}: {len(found)} ticks, {gets} route GETs, {patches} route PATCHes; per tick: {found}")
    assert len(found) >= min_ticks, f"{what}: too few ticks to judge: {found}"
    assert patches >= min_patches, f"{what}: the weights were written {patches} times: {found}"
    over = [t for t in found if t["get"] > 1 or t["patch"] > 1]
    assert not over, f"{what}: ticks with more than one route read or write: {over} of {found}"


def test_an_experiment_tick_reads_its_route_once_and_writes_it_at_most_once(fresh: Stack) -> None:
    if fresh.cluster.audit_log is None:
        pytest.skip("the API server was started without an audit log")
    start = len(fresh.cluster.audit_events())
    variants = [{"name": "a", "service": STABLE, "control": True}, {"name": "b", "service": CANDIDATE}]
    doc = experiment(
        "counted", prom(fresh), variants, ROUTE, stoppingRules={"minSamplesPerVariant": 1_000_000}
    )
    fresh.apply(doc)
    fresh.wait_for(EXPERIMENTS, "counted", lambda o: phase(o) in ("Running", "Paused"), 60)
    fresh.wait_route({STABLE: 50, CANDIDATE: 50})
    wait_ticks(fresh, start, EXPERIMENTS, 5, 60)  # the start and four analyses at a 5 s interval
    check(ticks(fresh, start, EXPERIMENTS, "counted"), "experiment", min_ticks=5, min_patches=1)


def test_a_rollout_tick_reads_its_route_once_and_writes_it_at_most_once(fresh: Stack) -> None:
    if fresh.cluster.audit_log is None:
        pytest.skip("the API server was started without an audit log")
    start = len(fresh.cluster.audit_events())
    steps = [{"setWeight": 20}, {"pause": {"duration": "6s"}}, {"setWeight": 50}, {"pause": {}}]
    fresh.apply(rollout("counted", prom(fresh), steps, compare=False))
    fresh.wait_for(ROLLOUTS, "counted", lambda o: weight(o) == 50, 90)
    fresh.wait_route({STABLE: 50, CANDIDATE: 50})
    wait_ticks(fresh, start, ROLLOUTS, 6, 30)
    check(ticks(fresh, start, ROLLOUTS, "counted"), "rollout", min_ticks=4, min_patches=2)
