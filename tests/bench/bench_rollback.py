"""``make bench-rollback``: breach-to-weight-0 latency on the real stack.

Each run: a ModelRollout at 50% with a 5 s interval and ``failureLimit: 1``; after one healthy
analysis the candidate's error rate is raised to 50%. We time from the moment the guardrail
query (polled every 0.2 s against the same Prometheus) first shows the breach to the moment the
HTTPRoute in the API server shows candidate weight 0. Last stdout line: JSON summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from kubernetes import client

from model_rollouts.metrics.provider import render
from tests.harness.queries import ERROR_RATE
from tests.harness.stack import Stack, httproute

STABLE, CANDIDATE = "bench-v1", "bench-v2"
WINDOW = "10s"
LIMIT = 0.05


def doc(name: str, prom: str, interval: int) -> dict:  # type: ignore[type-arg]
    return {
        "apiVersion": "mlrollouts.io/v1alpha1",
        "kind": "ModelRollout",
        "metadata": {"name": name},
        "spec": {
            "stable": {"service": STABLE},
            "candidate": {"service": CANDIDATE},
            "trafficRouting": {"gatewayAPI": {"httpRoute": "bench"}},
            "steps": [{"setWeight": 50}, {"pause": {}}],
            "analysis": {
                "interval": f"{interval}s",
                "window": WINDOW,
                "prometheus": {"address": prom, "timeout": "2s"},
                "guardrails": [{"name": "error-rate", "query": ERROR_RATE, "max": LIMIT, "failureLimit": 1}],
            },
        },
    }


def one_run(stack: Stack, i: int, interval: int) -> float:
    assert stack.prom is not None
    name = f"bench-{i}"
    stack.servers[CANDIDATE].set(error_rate=0.0)
    stack.apply(httproute("bench", stack.namespace, {STABLE: 100, CANDIDATE: 0}))
    time.sleep(WINDOW_S + 1)  # let the previous run's errors leave the rate window
    stack.apply(doc(name, stack.prom.url, interval))
    stack.wait_for("modelrollouts", name, lambda o: (o.get("status") or {}).get("weight") == 50, 60, poll=0.2)
    stack.wait_for(
        "modelrollouts",
        name,
        lambda o: any(m.get("verdict") == "pass" for m in (o.get("status") or {}).get("lastAnalysis", [])),
        60,
        poll=0.2,
    )
    stack.servers[CANDIDATE].set(error_rate=0.5)
    q = render(ERROR_RATE, {"service": CANDIDATE, "window": WINDOW})
    deadline = time.monotonic() + 60
    visible = None
    zero = None
    while time.monotonic() < deadline and zero is None:
        now = time.monotonic()
        if visible is None:
            res = stack.prom.query(q)
            if res and float(res[0]["value"][1]) > LIMIT:
                visible = now
        if stack.route_weights().get(CANDIDATE) == 0:
            zero = time.monotonic()
        time.sleep(0.1)
    if visible is None or zero is None:
        raise RuntimeError(f"run {i}: breach visible={visible} weight0={zero}")
    client.CustomObjectsApi(stack.api).delete_namespaced_custom_object(
        "mlrollouts.io", "v1alpha1", stack.namespace, "modelrollouts", name
    )
    return max(0.0, zero - visible)


WINDOW_S = 10


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--interval", type=int, default=5)
    args = parser.parse_args()
    latencies = []
    with Stack(
        variants={STABLE: {}, CANDIDATE: {}}, route="bench", rps=50, max_seconds=60 + 45 * args.runs
    ) as s:
        s.start_operator()
        for i in range(args.runs):
            lat = one_run(s, i, args.interval)
            latencies.append(lat)
            print(f"run {i + 1}/{args.runs}: breach visible -> candidate weight 0 in {lat:.2f}s", flush=True)
    med, mx = statistics.median(latencies), max(latencies)
    target = args.interval + 2
    print(
        f"median {med:.2f}s, max {mx:.2f}s; target median <= interval + 2s = {target}s: "
        f"{'met' if med <= target else 'NOT met'}"
    )
    print(
        json.dumps(
            {
                "runs": len(latencies),
                "interval_s": args.interval,
                "median_s": round(med, 2),
                "max_s": round(mx, 2),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
