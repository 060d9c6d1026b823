"""Dead arms through the real proxy: user traffic of a 3-variant experiment flows through Debian's nginx
(``tests/harness/gateway.py``), which follows the HTTPRoute the operator writes. SIGKILL one
non-control variant's model server: its weight on the route goes to 0 within about interval + 2 s,
nginx reloads that route, and from then on the clients see no error; the only errors are the requests
nginx sent to the dead server between the kill and the reload. Restarted, the variant gets its weight
back and answers requests through nginx again.

Readiness comes from the EndpointSlices that :class:`tests.integration.test_dead_arms.Prober` keeps
(the harness's model servers are plain processes; see that module). Real kube-apiserver, real
Prometheus, the operator as its ServiceAccount.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from kubernetes import client

from tests.harness.cluster import MissingComponent
from tests.harness.gateway import Gateway, find_nginx
from tests.harness.loadgen import LoadGenerator
from tests.harness.objects import delete_all, status
from tests.harness.stack import Stack, httproute
from tests.integration.test_dead_arms import INTERVAL, SLACK, Prober, _restart, _variant, _wait_route
from tests.integration.test_experiment import PLURAL, ROUTE, A, B, C, experiment

pytestmark = pytest.mark.integration

RPS = 40
EVEN = {A: 34, B: 33, C: 33}
#: A request answered before nginx's old workers exited may be counted by the client a moment later.
COUNT_SLACK = 1.5


@pytest.fixture(scope="module")
def proxied(real_components: None) -> Iterator[tuple[Stack, Gateway]]:
    try:
        find_nginx()
    except MissingComponent as e:
        if os.environ.get("MODEL_ROLLOUTS_REQUIRE_INTEGRATION") == "1":
            pytest.fail(f"integration components missing and required: {e}")
        print(f"\nSKIP dead arms through nginx: {e}")
        pytest.skip(str(e))
    with Stack(
        variants={A: {"positive_rate": 0.5}, B: {"positive_rate": 0.5}, C: {"positive_rate": 0.5}},
        route=ROUTE,
        rps=RPS,
        max_seconds=900,
        initial_weights=EVEN,
    ) as stack:
        assert stack.loadgen is not None and stack.workdir is not None
        stack.loadgen.stop()  # the harness's generator picks backends itself; this one goes through nginx
        stack.apply(httproute(ROUTE, stack.namespace, EVEN))
        backends = {svc: s.url for svc, s in stack.servers.items()}
        gateway = Gateway(
            stack.api, stack.namespace, ROUTE, backends, workdir=stack.workdir / "gateway"
        ).start()
        try:
            stack.loadgen = LoadGenerator(
                api=None,
                namespace=stack.namespace,
                httproute=ROUTE,
                backends=backends,
                rps=RPS,
                max_seconds=300,
                max_requests=RPS * 300,
                workers=8,
                via=gateway.url,
            ).start()
            stack.start_operator()
            yield stack, gateway
        finally:
            gateway.close()


def route_version(stack: Stack) -> str:
    route: dict[str, Any] = client.CustomObjectsApi(stack.api).get_namespaced_custom_object(
        "gateway.networking.k8s.io", "v1", stack.namespace, "httproutes", ROUTE
    )
    return str(route["metadata"]["resourceVersion"])


def counted(stack: Stack, svc: str) -> int:
    """Prediction requests the model server itself counted (since it started)."""
    text = stack.servers[svc].metrics_text()
    return int(sum(float(v) for v in re.findall(r"^model_requests_total\{[^}]*\} (\S+)$", text, re.M)))


@dataclass
class ErrorClock:
    """Samples the client's error counters every 0.2 s (bounded in time): when errors happened."""

    gen: LoadGenerator
    max_seconds: float = 150.0
    samples: list[tuple[float, int]] = field(default_factory=list)  # (time, client errors so far)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, name="h8-errors", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while time.monotonic() < deadline:
            s = self.gen.stats()
            self.samples.append((time.monotonic(), s["total_errors"]))
            if self._stop.wait(0.2):
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def errors_between(self, t0: float, t1: float) -> int:
        """Errors counted after the last sample taken at or before t0, up to the last one at or before t1."""
        upto = [n for t, n in self.samples if t <= t1]
        start = [n for t, n in self.samples if t <= t0] or [self.samples[0][1]]
        return upto[-1] - start[-1] if upto else 0

    def last_error_at(self) -> float | None:
        """The time of the first sample that saw the last increase of the error count."""
        last = None
        for (_, before), (t, now) in zip(self.samples, self.samples[1:], strict=False):
            if now > before:
                last = t
        return last

    def per_second(self, since: float, seconds: int) -> list[int]:
        return [self.errors_between(since + k, since + k + 1.0) for k in range(seconds)]


def test_a_killed_variant_stops_getting_user_requests_through_nginx_and_gets_them_back(
    proxied: tuple[Stack, Gateway],
) -> None:
    stack, gateway = proxied
    assert stack.prom is not None and stack.loadgen is not None
    gen = stack.loadgen
    prober = Prober(stack)
    clock = ErrorClock(gen)
    try:
        stack.apply(
            experiment(
                "dead-arm-proxy",
                stack.prom.url,
                [A, B, C],
                stoppingRules={"minSamplesPerVariant": 100000},
                analysis={"interval": f"{INTERVAL:.0f}s", "noDataTimeout": "10m"},
            )
        )
        stack.wait_for(PLURAL, "dead-arm-proxy", lambda o: bool(status(o).get("lastAnalysisTime")), 60)
        assert stack.route_weights() == EVEN
        before = gen.stats()
        time.sleep(4.0)
        calm = gen.stats()
        assert calm["total_errors"] == before["total_errors"], (before["errors"], calm["errors"])
        assert calm["ok"].get(C, 0) > before["ok"].get(C, 0), "nginx sent nothing to the victim before"

        # Kill right after an analysis: the worst case, a whole interval until the next one looks.
        tick = status(stack.get(PLURAL, "dead-arm-proxy"))["lastAnalysisTime"]
        stack.wait_for(
            PLURAL, "dead-arm-proxy", lambda o: status(o).get("lastAnalysisTime") != tick, 30, poll=0.1
        )
        victim = stack.servers[C]
        port = victim.port
        killed_at = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        took, w = _wait_route(stack, lambda w: w.get(C) == 0, INTERVAL + 2 + SLACK + 10)
        assert w == {A: 50, B: 50, C: 0}
        change = gateway.wait_version(route_version(stack), 20)
        assert change.settled_at is not None and change.weights.get(C, 0) == 0, change
        time.sleep(6.0)  # a quiet stretch, through the new route
        after = gen.stats()
        last = clock.last_error_at()
        window = clock.errors_between(killed_at, change.settled_at + COUNT_SLACK)
        quiet = clock.errors_between(change.settled_at + COUNT_SLACK, time.monotonic())
        dead = {k: after["errors"].get(k, 0) - calm["errors"].get(k, 0) for k in (A, B, C)}
        print(
            f"\nSIGKILL of {C} -> weight 0 on the route in {took:.1f}s (interval {INTERVAL:.0f}s); "
            f"route write -> nginx serving {change.event_to_serving_s:.2f}s, settled "
            f"{change.event_to_settled_s:.2f}s; client errors: {sum(dead.values())} in total {dead}, "
            f"per second in the 3 s before the kill {clock.per_second(killed_at - 3, 3)}, from the kill "
            f"{clock.per_second(killed_at, int(time.monotonic() - killed_at))}; "
            f"last error {(last or killed_at) - killed_at:.1f}s after the kill, nginx settled "
            f"{change.settled_at - killed_at:.1f}s after it"
        )
        assert took <= INTERVAL + 2 + SLACK, f"{took:.1f}s"
        # The only errors are the requests nginx sent to the dead server before it reloaded the route.
        assert dead[A] == dead[B] == 0 and dead[C] > 0, dead
        assert window == sum(dead.values()) and quiet == 0, (window, quiet, dead)
        assert last is not None and last <= change.settled_at + COUNT_SLACK
        assert after["ok"].get(A, 0) > calm["ok"].get(A, 0) and after["ok"].get(B, 0) > calm["ok"].get(B, 0)
        stack.wait_for(PLURAL, "dead-arm-proxy", lambda o: _variant(o, "c").get("unready") is True, 10)

        _restart(stack, C, port)
        took, w = _wait_route(stack, lambda w: w.get(C, 0) > 0, INTERVAL + 2 + SLACK + 10)
        assert w == EVEN
        change = gateway.wait_version(route_version(stack), 20)
        back = gen.stats()
        time.sleep(4.0)
        later = gen.stats()
        answered = later["ok"].get(C, 0) - back["ok"].get(C, 0)
        print(
            f"{C} restarted -> weight back on the route in {took:.1f}s, nginx serving it "
            f"{change.event_to_settled_s:.2f}s after the write; {answered} answers from {C} in 4 s"
        )
        assert took <= INTERVAL + 2 + SLACK, f"{took:.1f}s"
        assert answered > 0 and later["total_errors"] == back["total_errors"], (back, later)
        assert counted(stack, C) >= answered, "the restarted server did not count the requests itself"
        obj = stack.wait_for(PLURAL, "dead-arm-proxy", lambda o: _variant(o, "c").get("unready") is False, 10)
        assert status(obj)["phase"] == "Running"
    finally:
        clock.close()
        prober.close()
        delete_all(stack, PLURAL)
