"""One tenant's blackholed provider does not delay another tenant's rollback (real stack)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from kubernetes import client

from tests.harness.objects import CANDIDATE, STABLE, fraud_stack, rollout
from tests.harness.stack import Stack, httproute
from tests.harness.tenancy import cluster_provider

P = "modelrollouts"
BLACKHOLED = 40
INTERVAL = 5.0


@pytest.fixture(scope="module")
def stack(real_components: None) -> Iterator[Stack]:
    with fraud_stack(900) as s:
        yield s


def test_forty_objects_on_a_blackholed_provider_do_not_delay_a_rollback(stack: Stack) -> None:
    assert stack.prom is not None
    # A listening socket that never accepts: connections complete, requests are never answered.
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(4096)
    try:
        provider = cluster_provider("blackhole", f"http://127.0.0.1:{hole.getsockname()[1]}")
        provider["spec"]["prometheus"]["timeout"] = "30s"  # the longest a provider may have
        stack.apply(provider)
        co = client.CustomObjectsApi(stack.api)
        for i in range(BLACKHOLED):
            stack.apply(httproute(f"bh-{i}", stack.namespace, {STABLE: 100, CANDIDATE: 0}))
            doc = rollout(f"bh-{i}", "http://unused.invalid", [{"setWeight": 10}, {"pause": {}}])
            doc["spec"]["trafficRouting"]["gatewayAPI"]["httpRoute"] = f"bh-{i}"
            analysis = doc["spec"]["analysis"]
            del analysis["prometheus"]
            analysis.update(provider="blackhole", errorLimit=1000, onErrorLimit="hold")
            stack.apply(doc)
        # Every blackholed object is past its first analysis and keeps measuring.
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            items = co.list_namespaced_custom_object("mlrollouts.io", "v1alpha1", stack.namespace, P)["items"]
            if (
                sum(1 for o in items if (o.get("status") or {}).get("consecutiveErrors", 0) >= 1)
                >= BLACKHOLED
            ):
                break
            time.sleep(1)
        else:
            raise AssertionError("the blackholed objects did not all reach their first analysis")

        stack.servers[CANDIDATE].set(error_rate=0.5)
        stack.apply(rollout("healthy", stack.prom.url, [{"setWeight": 20}, {"pause": {}}]))
        start = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            w = stack.route_weights().get(CANDIDATE, 0)
            if start is None and w > 0:
                start = time.monotonic()
            if start is not None and w == 0:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"not rolled back in 60 s; status={stack.get(P, 'healthy').get('status')}")
        took = time.monotonic() - start
        # The route is written first, then status.
        stack.wait_for(P, "healthy", lambda o: (o.get("status") or {}).get("phase") == "RolledBack", 10)
        assert took <= INTERVAL + 2.0, f"traffic on the breaching candidate for {took:.1f}s"
        # The blackholed objects are still held by their provider, not rolled back or promoted.
        items = co.list_namespaced_custom_object("mlrollouts.io", "v1alpha1", stack.namespace, P)["items"]
        held = [o["status"]["phase"] for o in items if o["metadata"]["name"].startswith("bh-")]
        assert len(held) == BLACKHOLED and set(held) <= {"Progressing", "Paused"}, held
        print(f"\nrolled back {took:.1f}s after the breach began; {BLACKHOLED} blackholed objects")
    finally:
        hole.close()
        stack.servers[CANDIDATE].set(error_rate=0.0)
