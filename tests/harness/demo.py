"""``make demo``: the model-improvement cycle on a real local stack, narrated.

1. A real kube-apiserver (+ etcd), the ModelRollout/ModelExperiment and Gateway API CRDs.
2. Three real model servers (v1 stable, v2 a good new version, v3 a broken one), scraped by
   a real Prometheus every second, and a traffic generator that splits requests by the
   HTTPRoute weights the operator writes.
3. The operator, as a separate process.
4. Rollout 1: v1 -> v2: first a shadow step (20% of requests mirrored to v2 through Debian's nginx
   following the HTTPRoute, v2's answers dropped, v2 judged on them at weight 0), then step by
   step, and is promoted.
   Rollout 2: the team ships v3 (stable v2 -> candidate v3); its error rate breaches the
   guardrail and it is rolled back.
Everything listens on 127.0.0.1 and is stopped at the end.
"""

from __future__ import annotations

import atexit
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from model_rollouts.cli import render as plugin_render
from model_rollouts.cli import view as plugin_view
from model_rollouts.report import write as write_report
from model_rollouts.traffic.gateway_api import GatewayAPIRouter
from tests.harness import demo_segments
from tests.harness.cluster import MissingComponent
from tests.harness.gateway import Gateway, find_nginx
from tests.harness.loadgen import LoadGenerator
from tests.harness.queries import DRIFT, ERROR_RATE, FEEDBACK, P95_LATENCY, POSITIVE
from tests.harness.stack import Stack

NS, ROUTE = "ml", "fraud-scorer"
V1, V2, V3 = "fraud-scorer-v1", "fraud-scorer-v2", "fraud-scorer-v3"


#: The promoted rollout's first step: v2 answers a mirrored copy of 20% of live requests; nobody
#: sees its answers (needs the nginx data plane: without it the step is left out).
SHADOW_STEP = {"shadow": {"percent": 20, "duration": "20s"}}


def rollout_doc(prom: str, stable: str, candidate: str, version: str, shadow: bool = False) -> dict[str, Any]:
    return {
        "apiVersion": "mlrollouts.io/v1alpha1",
        "kind": "ModelRollout",
        "metadata": {"name": "fraud-scorer", "namespace": NS},
        "spec": {
            "stable": {"service": stable},
            "candidate": {"service": candidate, "modelVersion": version},
            "trafficRouting": {"gatewayAPI": {"httpRoute": ROUTE}},
            "maxWeightStep": 25,
            "steps": [
                *([SHADOW_STEP] if shadow else []),
                {"setWeight": 10},
                {"pause": {"duration": "10s"}},
                {"setWeight": 50},
                {"analysis": {"duration": "10s"}},
                {"setWeight": 100},
            ],
            "analysis": {
                "interval": "5s",
                "window": "15s",
                "prometheus": {"address": prom, "timeout": "2s"},
                "guardrails": [
                    {"name": "error-rate", "query": ERROR_RATE, "max": 0.02, "failureLimit": 1},
                    {"name": "latency-p95", "query": P95_LATENCY, "max": 0.25, "failureLimit": 2},
                    {"name": "drift", "query": DRIFT, "max": 0.3, "failureLimit": 2},
                ],
                "comparisons": [
                    {
                        "name": "positive-feedback",
                        "successes": POSITIVE,
                        "trials": FEEDBACK,
                        "test": "nonInferiority",
                        "margin": 0.05,
                    }
                ],
            },
        },
    }


class Narrator:
    def __init__(self, stack: Stack) -> None:
        self.stack, self.t0, self.last = stack, time.monotonic(), ""
        self.timeline: list[str] = []

    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f}s] {text}"
        print(line, flush=True)
        self.timeline.append(line)

    def plugin_view(self, obj: dict[str, Any], compact: bool = False) -> None:
        """The kubectl mlrollouts view of ``obj``, indented under the timeline."""
        text = plugin_render.to_text(plugin_render.view(plugin_view.view_of(obj), compact), width=150)
        print("\n".join("    " + line.rstrip() for line in text.rstrip().splitlines()), flush=True)

    def watch(self, until: tuple[str, ...], timeout: float, generation: int = 1) -> dict[str, Any]:
        """Narrate until a phase in ``until`` is reached for ``generation`` of the spec."""
        deadline = time.monotonic() + timeout
        obj: dict[str, Any] = {}
        while time.monotonic() < deadline:
            obj = self.stack.get("modelrollouts", "fraud-scorer")
            st = obj.get("status") or {}
            state = f"{st.get('phase')} step={st.get('currentStep')} weight={st.get('weight')}"
            if state + st.get("message", "") != self.last:
                self.last = state + st.get("message", "")
                # What the plugin shows at this progress point (compact: no step table, no conditions).
                mirrors = GatewayAPIRouter(self.stack.api, NS, ROUTE).read().mirrors
                route = f"{self.stack.route_weights()}" + (f", mirror {mirrors}" if mirrors else "")
                self.say(f"$ kubectl mlrollouts get fraud-scorer    # the HTTPRoute: {route}")
                self.plugin_view(obj, compact=True)
            if st.get("phase") in until and st.get("observedGeneration", 0) >= generation:
                return obj
            time.sleep(0.5)
        raise TimeoutError(f"rollout did not reach {until} in {timeout:.0f}s: {obj.get('status')}")


def main() -> int:
    print(
        "Model Rollouts demo: starting a real local stack (kube-apiserver, etcd, Prometheus, "
        "3 model servers, traffic at 40 rps)...",
        flush=True,
    )
    variants = {V1: {"positive_rate": 0.6}, V2: {"positive_rate": 0.62}, V3: {"error_rate": 0.08}}
    with Stack(
        variants=variants,
        namespace=NS,
        route=ROUTE,
        rps=40,
        max_seconds=600,
        initial_weights={V1: 100, V2: 0, V3: 0},
        route_managed_by="ModelRollout/fraud-scorer",  # the route's opt-in: this rollout may set its weights
    ) as stack:
        assert stack.prom is not None
        n = Narrator(stack)
        n.say(
            f"control plane {stack.cluster.server}, Prometheus {stack.prom.url}, "
            f"kubeconfig {stack.cluster.kubeconfig}"
        )
        gateway = through_nginx(stack)
        shadow = gateway is not None
        stack.start_operator()
        n.say(
            "operator started; applying ModelRollout fraud-scorer: v1 -> v2 (a better model)"
            + (
                ", first as a shadow: 20% of requests mirrored to v2 for 20s, v2 at weight 0"
                if shadow
                else ""
            )
        )
        stack.apply(rollout_doc(stack.prom.url, V1, V2, "2.0.0", shadow=shadow))
        t1 = time.monotonic()
        first = n.watch(("Promoted", "RolledBack", "Aborted"), 240)
        d1 = time.monotonic() - t1
        n.say(f"==> rollout 1 ended {first['status']['phase']} after {d1:.0f}s")
        for h in first["status"]["history"]:
            if h["event"] in ("ShadowStarted", "ShadowEnded"):
                n.say(f"    {h['event']}: {h['message'][:140]}")

        n.say("the team ships v3: Git now says stable=v2, candidate=v3 (v3 has an 8% error rate)")
        doc = rollout_doc(stack.prom.url, V2, V3, "3.0.0")
        stack.apply(doc)
        t2 = time.monotonic()
        generation = stack.get("modelrollouts", "fraud-scorer")["metadata"]["generation"]
        second = n.watch(("RolledBack", "Promoted", "Aborted"), 180, generation)
        d2 = time.monotonic() - t2
        n.say(f"==> rollout 2 ended {second['status']['phase']} after {d2:.0f}s")
        third_ok = demo_segments.story(stack, n, V2, V3)  # rollout 3: harmed in one region, rolled back

        print("\n================ summary ================")
        print(f"rollout 1 (v1 -> v2): {first['status']['phase']:<10} in {d1:4.0f}s")
        print(
            f"rollout 2 (v2 -> v3): {second['status']['phase']:<10} in {d2:4.0f}s  "
            f"reason: {second['status']['message']}"
        )
        print(f"final HTTPRoute weights: {stack.wait_route({V2: 100, V3: 0})}")
        for i, obj in ((1, first), (2, second)):
            print(f"\n$ kubectl mlrollouts get fraud-scorer   # rollout {i}, as it ended")
            n.plugin_view(obj)
        print("history of the last rollout (from status.history):")
        for h in second["status"]["history"][-8:]:
            print(f"  {h['time']} {h['event']:<14} weight={h.get('weight')!s:<4} {h['message'][:110]}")
        assert stack.loadgen is not None
        print(f"traffic sent: {stack.loadgen.stats().get('sent')}")
        # The decision reports (kubectl mlrollouts report), from the objects as they ended.
        out = Path(".run/demo-reports").resolve()
        out.mkdir(parents=True, exist_ok=True)
        for i, obj in ((1, first), (2, second)):
            label = f"fraud-scorer-{i}-{obj['status']['phase'].lower()}"
            # The object as it ended, for `kubectl mlrollouts report --from-file` later.
            (out / f"{label}.yaml").write_text(yaml.safe_dump(obj, sort_keys=False))
            for fmt in ("html", "png"):
                written = write_report(obj, fmt, out / f"{label}.{fmt}")
                print(f"decision report, rollout {i} ({fmt}): {written.path}")
        ok = first["status"]["phase"] == "Promoted" and second["status"]["phase"] == "RolledBack" and third_ok
        print("demo result:", "OK (one promoted, two rolled back)" if ok else "UNEXPECTED")
        if gateway is not None:
            gateway.close()
    print("all processes stopped.")
    return 0 if ok else 1


def through_nginx(stack: Stack) -> Gateway | None:
    """Every request through Debian's nginx following the HTTPRoute (weights and the shadow step's
    mirror), instead of the generator's own split; None (and the plain generator) without nginx."""
    try:
        find_nginx()
    except MissingComponent as e:
        print(f"no nginx data plane ({e}): the shadow step is left out", flush=True)
        return None
    assert stack.loadgen is not None and stack.workdir is not None
    stack.loadgen.stop()
    backends = {svc: s.url for svc, s in stack.servers.items()}
    gateway = Gateway(stack.api, NS, ROUTE, backends, workdir=stack.workdir / "gateway").start()
    stack.loadgen = LoadGenerator(
        api=None, namespace=NS, httproute=ROUTE, backends=backends, rps=40, max_seconds=600,
        max_requests=40 * 600, workers=8, via=gateway.url,
    ).start()  # fmt: skip
    atexit.register(gateway.close)  # stopped with the demo, whatever ends it (close is idempotent)
    return gateway


if __name__ == "__main__":
    sys.exit(main())
