"""Dead arms get no traffic, on the real stack: SIGKILL one non-control variant's model server of a
running 3-variant experiment; its weight goes to 0 on the HTTPRoute within about interval + 2 s, with
an ``ArmUnready`` Event; restarted, it gets its weight back (``ArmReady``). The same for a rollout's
candidate (``CandidateUnready``/``CandidateReady``), which keeps its step and is not rolled back.

The harness's model servers are plain processes, not Pods, so nothing in it keeps EndpointSlices. This
module plays the kubelet and the EndpointSlice controller: one EndpointSlice per variant Service
(label ``kubernetes.io/service-name``, the server's port; the API server refuses loopback addresses,
so the address is a documentation one, 192.0.2.1, that nothing dials), whose endpoint's ``ready``
condition a bounded prober thread sets from the server's ``GET /healthz`` every 0.5 s (a readiness
probe with period 0.5 s and failureThreshold 1). The operator reads only the EndpointSlices.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from tests.harness import objects
from tests.harness.modelserver import ModelServerProcess
from tests.harness.objects import delete_all, event_reasons, status
from tests.harness.stack import Stack, httproute
from tests.integration.test_experiment import PLURAL, ROUTE, A, B, C, experiment

pytestmark = pytest.mark.integration

INTERVAL = 5.0
#: Shared-CPU slack on top of interval + 2 s (the prober's period is part of the 2 s).
SLACK = 5.0
#: TEST-NET-1 (RFC 5737): an EndpointSlice may not hold a loopback address; only its ready condition counts.
ADDRESS = "192.0.2.1"


def _slice(svc: str, port: int, ready: bool) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": f"{svc}-h8", "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ADDRESS], "conditions": {"ready": ready}}],
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
    }


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=0.4) as r:
            return bool(r.status == 200)
    except Exception:
        return False


class Prober:
    """Keeps each variant's EndpointSlice ``ready`` equal to its server's /healthz (bounded in time)."""

    def __init__(self, stack: Stack, max_seconds: float = 600.0) -> None:
        self.stack, self.max_seconds = stack, max_seconds
        self.api = client.DiscoveryV1Api(stack.api)
        self.ready: dict[str, bool] = {}
        self.stopped = threading.Event()
        for svc, srv in stack.servers.items():
            self.api.create_namespaced_endpoint_slice(stack.namespace, _slice(svc, srv.port, True))
            self.ready[svc] = True
        self.thread = threading.Thread(target=self._run, name="h8-prober", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self.stopped.wait(0.5) and time.monotonic() < deadline:
            for svc, srv in list(self.stack.servers.items()):
                ok = _healthy(srv.url)
                if ok != self.ready[svc]:
                    patch = {"endpoints": [{"addresses": [ADDRESS], "conditions": {"ready": ok}}]}
                    self.api.patch_namespaced_endpoint_slice(f"{svc}-h8", self.stack.namespace, patch)
                    self.ready[svc] = ok

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        for svc in self.ready:
            with contextlib.suppress(client.ApiException):
                self.api.delete_namespaced_endpoint_slice(f"{svc}-h8", self.stack.namespace)


@pytest.fixture(scope="module")
def stack(real_components: None) -> Iterator[Stack]:
    with Stack(
        variants={A: {"positive_rate": 0.5}, B: {"positive_rate": 0.5}, C: {"positive_rate": 0.5}},
        route=ROUTE,
        rps=40,
        max_seconds=900,
        initial_weights={A: 34, B: 33, C: 33},
    ) as s:
        s.start_operator()
        yield s


def _variant(obj: dict[str, Any], name: str) -> dict[str, Any]:
    return next((v for v in status(obj).get("variants", []) if v["name"] == name), {})


def _wait_route(stack: Stack, pred: Any, timeout: float) -> tuple[float, dict[str, int]]:
    t0 = time.monotonic()
    while True:
        w = stack.route_weights()
        if pred(w):
            return time.monotonic() - t0, w
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"route {w} after {timeout:.0f}s\n" + stack.operator_log()[-3000:])
        time.sleep(0.1)


def test_a_killed_variant_loses_its_weight_and_gets_it_back_when_ready(stack: Stack) -> None:
    assert stack.prom is not None
    stack.apply(httproute(ROUTE, stack.namespace, {A: 34, B: 33, C: 33}))
    prober = Prober(stack)
    try:
        stack.apply(
            experiment(
                "dead-arm",
                stack.prom.url,
                [A, B, C],
                stoppingRules={"minSamplesPerVariant": 100000},
                analysis={"interval": f"{INTERVAL:.0f}s", "noDataTimeout": "10m"},
            )
        )
        stack.wait_for(PLURAL, "dead-arm", lambda o: bool(status(o).get("lastAnalysisTime")), 60)
        assert stack.route_weights() == {A: 34, B: 33, C: 33}

        victim = stack.servers[C]
        port = victim.port
        os.kill(victim.pid, signal.SIGKILL)
        took, w = _wait_route(stack, lambda w: w.get(C) == 0, INTERVAL + 2 + SLACK + 10)
        print(f"\nSIGKILL of {C} -> weight 0 on the route in {took:.1f}s (interval {INTERVAL:.0f}s): {w}")
        assert took <= INTERVAL + 2 + SLACK, f"{took:.1f}s"
        assert w == {A: 50, B: 50, C: 0}  # the fixed equal split over the two that serve
        # The route is written before the status (the status records what the route carries).
        obj = stack.wait_for(PLURAL, "dead-arm", lambda o: _variant(o, "c").get("unready") is True, 10)
        st = status(obj)
        assert st["phase"] == "Running", st
        vc = next(v for v in st["variants"] if v["name"] == "c")
        assert vc["unready"] is True and vc["active"] is True and vc["weight"] == 0
        cond = next(c for c in st["conditions"] if c["type"] == "ArmsReady")
        assert cond["status"] == "False" and "c" in cond["message"], cond
        stack.wait_for(PLURAL, "dead-arm", lambda _o: "ArmUnready" in event_reasons(stack, "dead-arm"), 10)

        _restart(stack, C, port)
        took, w = _wait_route(stack, lambda w: w.get(C, 0) > 0, INTERVAL + 2 + SLACK + 10)
        print(f"{C} restarted -> weight back on the route in {took:.1f}s: {w}")
        assert w == {A: 34, B: 33, C: 33}
        stack.wait_for(PLURAL, "dead-arm", lambda _o: "ArmReady" in event_reasons(stack, "dead-arm"), 10)
        obj = stack.wait_for(PLURAL, "dead-arm", lambda o: _variant(o, "c").get("unready") is False, 10)
        st = status(obj)
        assert st["phase"] == "Running" and not any(v.get("unready") for v in st["variants"]), st
    finally:
        prober.close()
        delete_all(stack, PLURAL)


def _restart(stack: Stack, svc: str, port: int) -> None:
    stack.servers[svc].stop()  # reap the killed child
    stack.servers[svc] = ModelServerProcess(variant=svc, port=port, positive_rate=0.5).start()


def test_a_killed_candidate_goes_to_0_keeps_its_step_and_gets_its_weight_back(stack: Stack) -> None:
    assert stack.prom is not None
    stack.apply(httproute(ROUTE, stack.namespace, {A: 100, B: 0}))
    prober = Prober(stack)
    try:
        doc = objects.rollout(
            "dead-candidate",
            stack.prom.url,
            [{"setWeight": 30}, {"pause": {}}],
            stable=A,
            candidate={"service": B},
            route=ROUTE,
            compare=False,
            analysis={"interval": f"{INTERVAL:.0f}s"},
        )
        stack.apply(doc)
        stack.wait_route({A: 70, B: 30}, timeout=60)
        stack.wait_for(
            "modelrollouts", "dead-candidate", lambda o: bool(status(o).get("lastAnalysisTime")), 60
        )
        step = status(stack.get("modelrollouts", "dead-candidate"))["currentStep"]

        port = stack.servers[B].port
        os.kill(stack.servers[B].pid, signal.SIGKILL)
        took, w = _wait_route(stack, lambda w: w.get(B) == 0, INTERVAL + 2 + SLACK + 10)
        print(f"\nSIGKILL of candidate {B} -> weight 0 on the route in {took:.1f}s: {w}")
        assert took <= INTERVAL + 2 + SLACK, f"{took:.1f}s"
        assert w == {A: 100, B: 0}
        obj = stack.wait_for(
            "modelrollouts", "dead-candidate", lambda o: status(o).get("candidateUnready") is True, 10
        )
        st = status(obj)
        assert st["candidateUnready"] is True and st["weight"] == 30 and st["currentStep"] == step, st
        assert st["phase"] not in ("RolledBack", "Aborted") and "no ready endpoints" in st["message"], st
        stack.wait_for(
            "modelrollouts",
            "dead-candidate",
            lambda _o: "CandidateUnready" in event_reasons(stack, "dead-candidate"),
            10,
        )

        _restart(stack, B, port)
        took, w = _wait_route(stack, lambda w: w.get(B, 0) > 0, INTERVAL + 2 + SLACK + 10)
        print(f"candidate {B} restarted -> weight back on the route in {took:.1f}s: {w}")
        assert w == {A: 70, B: 30}
        obj = stack.wait_for(
            "modelrollouts", "dead-candidate", lambda o: not status(o).get("candidateUnready"), 10
        )
        st = status(obj)
        assert not st.get("candidateUnready") and st["currentStep"] == step, st
        assert st["phase"] not in ("RolledBack", "Aborted"), st
        assert "CandidateReady" in event_reasons(stack, "dead-candidate")
    finally:
        prober.close()
        delete_all(stack, "modelrollouts")
