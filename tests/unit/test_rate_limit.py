"""The client-side limit on the operator's Kubernetes API requests (--kube-api-qps, --kube-api-burst)."""

from __future__ import annotations

import pytest

from model_rollouts.kube.client import RateLimit


class Clock:
    def __init__(self) -> None:
        self.t = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.t += s


def test_a_burst_goes_at_once_then_requests_are_spaced_at_the_rate() -> None:
    c = Clock()
    limit = RateLimit(80, 160, clock=c, sleep=c.sleep)
    for _ in range(160):
        limit.acquire()
    assert c.slept == []  # the burst: no wait
    for _ in range(80):
        limit.acquire()
    # The next 80 take one second in all, one 80th each.
    assert len(c.slept) == 80 and c.slept[0] == pytest.approx(1 / 80)
    assert c.t == pytest.approx(101.0)
    assert limit.waited == pytest.approx(1.0)


def test_tokens_come_back_while_idle_up_to_the_burst() -> None:
    c = Clock()
    limit = RateLimit(10, 20, clock=c, sleep=c.sleep)
    for _ in range(20):
        limit.acquire()
    c.t += 60  # a quiet minute refills the bucket to the burst, not to 600
    for _ in range(20):
        limit.acquire()
    assert c.slept == []
    limit.acquire()
    assert c.slept == [pytest.approx(0.1)]


def test_zero_qps_is_no_limit() -> None:
    c = Clock()
    limit = RateLimit(0, 1, clock=c, sleep=c.sleep)
    for _ in range(10_000):
        limit.acquire()
    assert c.slept == [] and limit.waited == 0.0


def test_the_flags_set_the_limit_and_refuse_nonsense() -> None:
    from model_rollouts import main
    from model_rollouts.kube import client

    with pytest.raises(SystemExit):
        main.main(["--kube-api-qps", "-1"])
    with pytest.raises(SystemExit):
        main.main(["--kube-api-burst", "0"])
    assert (client.QPS, client.BURST) == (100.0, 200)
