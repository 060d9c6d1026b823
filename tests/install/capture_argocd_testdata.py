"""Capture the Argo CD test fixtures from real objects: ``python -m tests.install.capture_argocd_testdata``.

Runs the local stack (real kube-apiserver, Prometheus, model servers, traffic) and the operator,
drives ModelRollouts and ModelExperiments through their phases, and writes each object as the
API server returns it (less managedFields) into
manifests/argocd/resource_customizations/mlrollouts.io/<Kind>/testdata/, then the action
fixtures (input + the annotation the action sets) and the two test files. The expected health
comes from the phase table the README documents, not from running the Lua.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

from tests.harness.stack import Stack, httproute
from tests.install.argocd_lua import CUSTOMIZATIONS

GROUP = "mlrollouts.io"
TOKEN = "2026-01-01T00:00:00Z"  # what the actions write under the tests' frozen clock
HEALTH = {
    "Pending": "Progressing",
    "Progressing": "Progressing",
    "Running": "Progressing",
    "Paused": "Suspended",
    "Promoted": "Healthy",
    "Concluded": "Healthy",
    "Idle": "Healthy",
    "RolledBack": "Degraded",
    "Aborted": "Degraded",
    "Invalid": "Degraded",
}


def clean(obj: dict[str, Any]) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    obj["metadata"].pop("managedFields", None)
    return obj


def expected_health(obj: dict[str, Any], kind: str) -> dict[str, str]:
    """The documented semantics, written out independently of health.lua."""
    st = obj.get("status") or {}
    gen = obj["metadata"].get("generation")
    if not st.get("phase"):
        what = "rollout" if kind == "ModelRollout" else "experiment"
        return {"status": "Progressing", "message": f"Waiting for the operator to pick up the {what}"}
    if gen is not None and st.get("observedGeneration", 0) < gen:
        return {"status": "Progressing", "message": f"Waiting for the operator to observe generation {gen}"}
    valid = next((c for c in st.get("conditions", []) if c["type"] == "Valid"), None)
    message = st.get("message") or st["phase"]
    if st["phase"] == "Invalid" or (valid and valid["status"] == "False"):
        return {"status": "Degraded", "message": (valid or {}).get("message") or message}
    status = HEALTH[st["phase"]]
    if status == "Progressing" and kind == "ModelRollout" and "weight" in st:
        message = f"{message} (candidate weight {st['weight']}%)"
    return {"status": status, "message": message}


class Capture:
    def __init__(self, stack: Stack, kind: str, plural: str) -> None:
        self.stack, self.kind, self.plural = stack, kind, plural
        self.dir = CUSTOMIZATIONS / GROUP / kind
        self.cases: list[dict[str, Any]] = []
        self.objects: dict[str, dict[str, Any]] = {}

    def save(self, fixture: str, name: str) -> dict[str, Any]:
        obj = clean(self.stack.get(self.plural, name))
        path = self.dir / "testdata" / f"{fixture}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(obj, sort_keys=False))
        self.cases.append(
            {"healthStatus": expected_health(obj, self.kind), "inputPath": f"testdata/{fixture}.yaml"}
        )
        self.objects[fixture] = obj
        print(f"captured {self.kind} {fixture}: phase={(obj.get('status') or {}).get('phase')}", flush=True)
        return obj

    def wait_phase(self, name: str, phases: tuple[str, ...], timeout: float = 120) -> None:
        self.stack.wait_for(
            self.plural, name, lambda o: (o.get("status") or {}).get("phase") in phases, timeout
        )

    def write_tests(
        self, discovery: dict[str, list[tuple[str, bool]]], actions: list[tuple[str, str]]
    ) -> None:
        (self.dir / "health_test.yaml").write_text(yaml.safe_dump({"tests": self.cases}, sort_keys=False))
        adir = self.dir / "actions"
        (adir / "testdata").mkdir(parents=True, exist_ok=True)
        disc = []
        for fixture, result in discovery.items():
            (adir / "testdata" / f"{fixture}.yaml").write_text(
                yaml.safe_dump(self.objects[fixture], sort_keys=False)
            )
            disc.append(
                {
                    "inputPath": f"testdata/{fixture}.yaml",
                    "result": [{"name": n, "disabled": d} for n, d in result],
                }
            )
        tests = []
        for action, fixture in actions:
            out = copy.deepcopy(self.objects[fixture])
            out["metadata"].setdefault("annotations", {})[f"{GROUP}/{action}"] = TOKEN
            (adir / "testdata" / f"{fixture}.yaml").write_text(
                yaml.safe_dump(self.objects[fixture], sort_keys=False)
            )
            (adir / "testdata" / f"{fixture}-{action}.yaml").write_text(yaml.safe_dump(out, sort_keys=False))
            tests.append(
                {
                    "action": action,
                    "inputPath": f"testdata/{fixture}.yaml",
                    "expectedOutputPath": f"testdata/{fixture}-{action}.yaml",
                }
            )
        (adir / "action_test.yaml").write_text(
            yaml.safe_dump({"discoveryTests": disc, "actionTests": tests}, sort_keys=False)
        )


def rollouts() -> None:
    from tests.integration.test_rollout import rollout

    v1, v2 = "fraud-v1", "fraud-v2"
    with Stack(
        variants={v1: {"error_rate": 0.0}, v2: {"error_rate": 0.0}}, route="fraud", rps=50, max_seconds=900
    ) as s:
        assert s.prom is not None
        prom = s.prom.url
        cap = Capture(s, "ModelRollout", "modelrollouts")

        def on_route(name: str, steps: list[dict[str, Any]], **extra: Any) -> None:
            s.apply(httproute(name, s.namespace, {v1: 100, v2: 0}))
            doc = rollout(name, prom, steps, **extra)
            doc["spec"]["trafficRouting"] = {"gatewayAPI": {"httpRoute": name}}
            s.apply(doc)

        on_route("pending", [{"setWeight": 20}, {"pause": {}}])
        time.sleep(1)
        cap.save("pending", "pending")
        s.start_operator()
        on_route("gate", [{"setWeight": 20}, {"pause": {}}, {"setWeight": 100}])
        on_route("held", [{"setWeight": 20}, {"setWeight": 100}], paused=True)
        on_route("progressing", [{"setWeight": 20}, {"pause": {"duration": "10m"}}, {"setWeight": 100}])
        bad_query = {"guardrails": [{"name": "error-rate", "query": "{{ nope }}", "max": 0.05}]}
        on_route("invalid", [{"setWeight": 20}], analysis=bad_query)
        cap.wait_phase("gate", ("Paused",))
        cap.save("paused-manual-gate", "gate")
        cap.wait_phase("held", ("Paused",))
        cap.save("paused-by-spec", "held")
        s.wait_for("modelrollouts", "progressing", lambda o: (o.get("status") or {}).get("weight") == 20, 60)
        cap.save("progressing", "progressing")
        s.annotate("modelrollouts", "progressing", {f"{GROUP}/abort": "capture"})
        cap.wait_phase("progressing", ("Aborted",))
        cap.save("aborted", "progressing")
        cap.wait_phase("invalid", ("Invalid",))
        cap.save("invalid", "invalid")

        s.apply(
            rollout("good", prom, [{"setWeight": 50}, {"analysis": {"duration": "5s"}}, {"setWeight": 100}])
        )
        cap.wait_phase("good", ("Promoted", "RolledBack"), 180)
        cap.save("promoted", "good")
        co = client.CustomObjectsApi(s.api)
        co.delete_namespaced_custom_object(GROUP, "v1alpha1", s.namespace, "modelrollouts", "good")
        time.sleep(3)
        s.apply(httproute("fraud", s.namespace, {v1: 100, v2: 0}))
        s.servers[v2].set(error_rate=0.5)
        s.apply(rollout("bad", prom, [{"setWeight": 30}, {"pause": {"duration": "10m"}}, {"setWeight": 100}]))
        cap.wait_phase("bad", ("RolledBack",), 180)
        cap.save("rolled-back", "bad")
        s.stop_operator()
        co.patch_namespaced_custom_object(
            GROUP, "v1alpha1", s.namespace, "modelrollouts", "bad", {"spec": {"maxWeightStep": 10}}
        )
        cap.save("generation-not-observed", "bad")
        cap.write_tests(
            discovery={
                "progressing": [("promote", False), ("abort", False), ("resume", True), ("retry", True)],
                "paused-manual-gate": [
                    ("promote", False),
                    ("abort", False),
                    ("resume", False),
                    ("retry", True),
                ],
                "paused-by-spec": [("promote", False), ("abort", False), ("resume", True), ("retry", True)],
                "promoted": [("promote", True), ("abort", True), ("resume", True), ("retry", True)],
                "rolled-back": [("promote", True), ("abort", True), ("resume", True), ("retry", False)],
                "aborted": [("promote", True), ("abort", True), ("resume", True), ("retry", False)],
                "invalid": [("promote", True), ("abort", False), ("resume", True), ("retry", True)],
            },
            actions=[
                ("promote", "progressing"),
                ("abort", "progressing"),
                ("resume", "paused-manual-gate"),
                ("retry", "rolled-back"),
            ],
        )


def experiments() -> None:
    from tests.integration.test_experiment import experiment

    a, b = "rec-a", "rec-b"
    with Stack(
        variants={a: {"positive_rate": 0.5}, b: {"positive_rate": 0.8}},
        route="recsys",
        rps=72,
        max_seconds=900,
        initial_weights={a: 50, b: 50},
    ) as s:
        assert s.prom is not None
        prom = s.prom.url
        cap = Capture(s, "ModelExperiment", "modelexperiments")

        def on_route(name: str, **extra: Any) -> None:
            s.apply(httproute(name, s.namespace, {a: 50, b: 50}))
            doc = experiment(name, prom, [a, b], **extra)
            doc["spec"]["trafficRouting"] = {"gatewayAPI": {"httpRoute": name}}
            s.apply(doc)

        on_route("pending")
        time.sleep(1)
        cap.save("pending", "pending")
        s.start_operator()
        on_route("running", stoppingRules={"minSamplesPerVariant": 1000000})
        on_route("held", stoppingRules={"minSamplesPerVariant": 1000000})
        on_route("invalid", guardrails=[{"name": "error-rate", "query": "{{ nope }}", "max": 0.05}])
        cap.wait_phase("running", ("Running",))
        cap.save("running", "running")
        s.annotate("modelexperiments", "running", {f"{GROUP}/abort": "capture"})
        cap.wait_phase("running", ("Aborted",))
        cap.save("aborted", "running")
        cap.wait_phase("held", ("Running",))
        client.CustomObjectsApi(s.api).patch_namespaced_custom_object(
            GROUP, "v1alpha1", s.namespace, "modelexperiments", "held", {"spec": {"paused": True}}
        )
        cap.wait_phase("held", ("Paused",))
        cap.save("paused", "held")
        cap.wait_phase("invalid", ("Invalid",))
        cap.save("invalid", "invalid")
        s.apply(experiment("winner", prom, [a, b]))
        cap.wait_phase("winner", ("Concluded", "RolledBack"), 240)
        cap.save("concluded", "winner")
        s.stop_operator()
        client.CustomObjectsApi(s.api).patch_namespaced_custom_object(
            GROUP,
            "v1alpha1",
            s.namespace,
            "modelexperiments",
            "winner",
            {"spec": {"stoppingRules": {"minSamplesPerVariant": 300}}},
        )
        cap.save("generation-not-observed", "winner")
        cap.write_tests(
            discovery={
                "running": [("abort", False), ("resume", True), ("retry", True)],
                "paused": [("abort", False), ("resume", True), ("retry", True)],
                "concluded": [("abort", True), ("resume", True), ("retry", False)],
                "aborted": [("abort", True), ("resume", True), ("retry", False)],
            },
            actions=[("abort", "running"), ("resume", "paused"), ("retry", "aborted")],
        )


if __name__ == "__main__":
    import sys

    which = sys.argv[1:] or ["rollouts", "experiments"]
    for w in which:
        {"rollouts": rollouts, "experiments": experiments}[w]()
    print(f"fixtures written under {Path(CUSTOMIZATIONS).relative_to(Path.cwd())}")
