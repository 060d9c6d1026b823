"""Capture the Argo CD test fixtures from real objects: ``python -m tests.install.capture_argocd_testdata``.

Runs the local stack (real kube-apiserver, Prometheus, model servers, traffic) and the operator,
drives ModelRollouts and ModelExperiments through their phases, and writes each object as the
API server returns it (less managedFields) into
manifests/argocd/resource_customizations/mlrollouts.io/<Kind>/testdata/, then the action
fixtures (input + the annotation the action sets) and the two test files. The expected health
comes from the rules the README documents (expected_health), not from running the Lua.

``held`` (run after ``rollouts`` and ``experiments``, or alone: its cases are merged into the
test files) captures the states that wait for a human: a hold past progressDeadline, an
inconclusive comparison held, an error limit held, route writes refused 3 times in a row, and a
concluded experiment whose spec became invalid afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import time
from collections.abc import Iterator
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
    "Baking": "Progressing",
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


FINISHED = {"Promoted", "Idle", "Concluded", "RolledBack", "Aborted"}
PERSISTENT_RECONCILE_ERRORS = 3  # the ModelRolloutReconcileErrors alert's threshold


def expected_health(obj: dict[str, Any], kind: str) -> dict[str, str]:
    """The documented semantics, written out independently of health.lua."""
    st = obj.get("status") or {}
    gen = obj["metadata"].get("generation")
    if not st.get("phase"):
        what = "rollout" if kind == "ModelRollout" else "experiment"
        return {"status": "Progressing", "message": f"Waiting for the operator to pick up the {what}"}
    conds = {c["type"]: c for c in st.get("conditions", [])}
    valid = conds.get("Valid")
    message = st.get("message") or st["phase"]

    def why(c: dict[str, Any]) -> str:
        return f"{c['reason']}: {c['message']}" if c.get("message") else c["reason"]

    # An experiment that reached its decision keeps it, whatever is done to its spec afterwards.
    concluded = conds.get("Concluded", {}).get("status") == "True"
    # Failing again and again to apply a decision: maybe before it could observe this generation.
    rec = conds.get("ReconcileError")
    if (
        st["phase"] not in FINISHED
        and not concluded
        and rec
        and rec["status"] == "True"
        and st.get("reconcileErrors", 0) >= PERSISTENT_RECONCILE_ERRORS
    ):
        return {"status": "Degraded", "message": "ReconcileError " + why(rec)}
    if gen is not None and st.get("observedGeneration", 0) < gen:
        return {"status": "Progressing", "message": f"Waiting for the operator to observe generation {gen}"}
    if concluded:
        if st["phase"] != "Concluded":
            message = conds["Concluded"]["message"]
        if valid and valid["status"] == "False":
            message += f" (concluded; the spec is invalid since: {valid['message']})"
        return {"status": "Healthy", "message": message}
    if st["phase"] in FINISHED:  # a finished object keeps its outcome, whatever comes after
        return {"status": HEALTH[st["phase"]], "message": message}
    if st["phase"] == "Invalid" or (valid and valid["status"] == "False"):
        return {"status": "Degraded", "message": (valid or {}).get("message") or message}
    if conds.get("Healthy", {}).get("status") == "False":
        return {"status": "Degraded", "message": why(conds["Healthy"])}
    prog = conds.get("Progressing", {})
    if prog.get("status") == "False" and not (kind == "ModelExperiment" and st["phase"] == "Paused"):
        return {"status": "Suspended" if prog["reason"] == "GateClosed" else "Degraded", "message": why(prog)}
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

    def merge_tests(self) -> None:
        """Add this run's cases to health_test.yaml, replacing those with the same inputPath."""
        path = self.dir / "health_test.yaml"
        old = yaml.safe_load(path.read_text())["tests"] if path.exists() else []
        mine = {c["inputPath"] for c in self.cases}
        tests = [c for c in old if c["inputPath"] not in mine] + self.cases
        path.write_text(yaml.safe_dump({"tests": tests}, sort_keys=False))

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


def promotable(enabled: bool) -> list[tuple[str, bool]]:
    """promote (past the current step) and promote-full (to 100%): offered together."""
    return [("promote", not enabled), ("promote-full", not enabled)]


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
        on_route("baking", [{"setWeight": 100}], postPromotion={"bake": "10m"})
        cap.wait_phase("baking", ("Baking",), 120)
        cap.save("baking", "baking")
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
                "progressing": [*promotable(True), ("abort", False), ("resume", True), ("retry", True)],
                "paused-manual-gate": [
                    *promotable(True),
                    ("abort", False),
                    ("resume", False),
                    ("retry", True),
                ],
                "paused-by-spec": [*promotable(True), ("abort", False), ("resume", True), ("retry", True)],
                "promoted": [*promotable(False), ("abort", True), ("resume", True), ("retry", True)],
                "baking": [
                    ("promote", True),
                    ("promote-full", False),
                    ("abort", False),
                    ("resume", True),
                    ("retry", True),
                ],
                "rolled-back": [*promotable(False), ("abort", True), ("resume", True), ("retry", False)],
                "aborted": [*promotable(False), ("abort", True), ("resume", True), ("retry", False)],
                "invalid": [*promotable(False), ("abort", False), ("resume", True), ("retry", True)],
            },
            actions=[
                ("promote", "progressing"),
                ("promote-full", "progressing"),
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


OPERATOR_USER = "system:serviceaccount:model-rollouts:model-rollouts"


@contextlib.contextmanager
def route_writes_denied(s: Stack, route: str) -> Iterator[None]:
    """A ValidatingAdmissionPolicy refusing the operator's updates of one HTTPRoute."""
    from tests.harness.cluster import kubectl_apply

    name = "capture-deny-route-writes"
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {"apiGroups": ["gateway.networking.k8s.io"], "apiVersions": ["*"],
                     "operations": ["UPDATE"], "resources": ["httproutes"]}
                ]
            },
            "validations": [
                {"expression": f"request.userInfo.username != '{OPERATOR_USER}' || "
                               f"object.metadata.name != '{route}'",
                 "message": "route writes refused by a cluster policy"}
            ],
        },
    }  # fmt: skip
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {"policyName": name, "validationActions": ["Deny"]},
    }
    kubectl_apply(s.api, [policy, binding])
    time.sleep(2)  # the policy takes effect
    try:
        yield
    finally:
        adm = client.AdmissionregistrationV1Api(s.api)
        adm.delete_validating_admission_policy_binding(name)
        adm.delete_validating_admission_policy(name)


@contextlib.contextmanager
def prometheus_stopped(s: Stack) -> Iterator[None]:
    """SIGSTOP the stack's Prometheus: every query times out until SIGCONT."""
    assert s.prom is not None and s.prom._proc is not None
    pid = s.prom._proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def condition(o: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next((c for c in (o.get("status") or {}).get("conditions", []) if c["type"] == ctype), {})


def held_rollouts() -> None:
    from tests.integration.test_rollout import rollout

    v1, v2 = "fraud-v1", "fraud-v2"
    with Stack(
        variants={v1: {"error_rate": 0.0}, v2: {"error_rate": 0.0}}, route="fraud", rps=50, max_seconds=600
    ) as s:
        assert s.prom is not None
        prom = s.prom.url
        cap = Capture(s, "ModelRollout", "modelrollouts")
        s.start_operator()

        def on_route(name: str, steps: list[dict[str, Any]], **extra: Any) -> None:
            s.apply(httproute(name, s.namespace, {v1: 100, v2: 0}))
            doc = rollout(name, prom, steps, **extra)
            doc["spec"]["trafficRouting"] = {"gatewayAPI": {"httpRoute": name}}
            s.apply(doc)

        # A guardrail that never has data, held past a short progressDeadline (onProgressDeadline hold).
        absent = {"name": "absent", "query": 'sum(no_such_metric{service="{{ service }}"})', "max": 1}
        on_route(
            "late",
            [{"setWeight": 30}, {"setWeight": 60}],
            analysis={"guardrails": [absent], "comparisons": []},
            progressDeadline="8s",
            onProgressDeadline="hold",
        )
        # Equal versions and a tiny margin: the comparison stays undecided before 100% (onInconclusive hold).
        tight = rollout("tight", prom, [{"setWeight": 50}, {"setWeight": 100}], progressDeadline="20s")
        tight["spec"]["analysis"]["comparisons"][0]["margin"] = 0.001
        tight["spec"]["analysis"]["onInconclusive"] = "hold"
        s.apply(tight)
        with route_writes_denied(s, "denied"):
            on_route("denied", [{"setWeight": 20}, {"setWeight": 100}])
            s.wait_for(
                "modelrollouts",
                "denied",
                lambda o: (o.get("status") or {}).get("reconcileErrors", 0) >= 3,
                120,
            )
            cap.save("reconcile-error", "denied")
        s.wait_for("modelrollouts", "late", lambda o: condition(o, "Progressing").get("reason") ==
                   "ProgressDeadlineExceeded", 120)  # fmt: skip
        cap.save("deadline-held", "late")
        s.wait_for("modelrollouts", "tight", lambda o: condition(o, "Progressing").get("reason") ==
                   "Inconclusive", 180)  # fmt: skip
        cap.save("inconclusive-held", "tight")
        frozen = rollout(
            "frozen",
            prom,
            [{"setWeight": 20}, {"setWeight": 100}],
            analysis={"errorLimit": 2, "onErrorLimit": "hold"},
        )
        frozen["spec"]["analysis"]["prometheus"]["timeout"] = "1s"
        frozen["spec"]["trafficRouting"] = {"gatewayAPI": {"httpRoute": "frozen"}}
        s.apply(httproute("frozen", s.namespace, {v1: 100, v2: 0}))
        s.apply(frozen)
        s.wait_for("modelrollouts", "frozen", lambda o: (o.get("status") or {}).get("weight") == 20, 60)
        with prometheus_stopped(s):
            s.wait_for("modelrollouts", "frozen", lambda o: condition(o, "Healthy").get("reason") ==
                       "ErrorLimitReached", 60)  # fmt: skip
            cap.save("error-limit-held", "frozen")
        cap.merge_tests()


def held_experiments() -> None:
    from tests.integration.test_experiment import experiment

    a, b = "rec-a", "rec-b"
    with Stack(
        variants={a: {"positive_rate": 0.5}, b: {"positive_rate": 0.8}},
        route="recsys",
        rps=72,
        max_seconds=600,
        initial_weights={a: 50, b: 50},
    ) as s:
        assert s.prom is not None
        prom = s.prom.url
        cap = Capture(s, "ModelExperiment", "modelexperiments")
        s.start_operator()
        s.apply(httproute("frozen", s.namespace, {a: 50, b: 50}))
        frozen = experiment("frozen", prom, [a, b], stoppingRules={"minSamplesPerVariant": 1000000},
                            analysis={"errorLimit": 2, "onErrorLimit": "hold"})  # fmt: skip
        frozen["spec"]["analysis"]["prometheus"]["timeout"] = "1s"
        frozen["spec"]["trafficRouting"] = {"gatewayAPI": {"httpRoute": "frozen"}}
        s.apply(frozen)
        cap.wait_phase("frozen", ("Running",))
        with prometheus_stopped(s):
            s.wait_for("modelexperiments", "frozen", lambda o: condition(o, "Healthy").get("reason") ==
                       "ErrorLimitReached", 60)  # fmt: skip
            cap.save("error-limit-held", "frozen")
        # A concluded experiment whose spec later becomes invalid: still concluded (and Healthy).
        s.apply(experiment("winner", prom, [a, b]))
        cap.wait_phase("winner", ("Concluded",), 300)
        # The primary metric is part of the revision: the operator looks at the edit, and refuses it.
        doc = s.get("modelexperiments", "winner")
        doc["spec"]["primaryMetric"]["successes"] = "sum(model_feedback_total{service='{{ nope }}'})"
        client.CustomObjectsApi(s.api).patch_namespaced_custom_object(
            GROUP, "v1alpha1", s.namespace, "modelexperiments", "winner",
            {"spec": {"primaryMetric": doc["spec"]["primaryMetric"]}},
        )  # fmt: skip
        s.wait_for(
            "modelexperiments", "winner", lambda o: condition(o, "Valid").get("status") == "False", 120
        )
        cap.save("concluded-then-invalid", "winner")
        cap.merge_tests()


def rederive() -> None:
    """Recompute every health case's expected value from its fixture (after a change of the rules)."""
    for kind_dir in sorted((CUSTOMIZATIONS / GROUP).iterdir()):
        path = kind_dir / "health_test.yaml"
        tests = yaml.safe_load(path.read_text())["tests"]
        for case in tests:
            obj = yaml.safe_load((kind_dir / case["inputPath"]).read_text())
            case["healthStatus"] = expected_health(obj, kind_dir.name)
        path.write_text(yaml.safe_dump({"tests": tests}, sort_keys=False))


def held() -> None:
    held_rollouts()
    held_experiments()


if __name__ == "__main__":
    import sys

    which = sys.argv[1:] or ["rollouts", "experiments", "held"]
    for w in which:
        {
            "rollouts": rollouts,
            "experiments": experiments,
            "held": held,
            "held-rollouts": held_rollouts,
            "held-experiments": held_experiments,
            "rederive": rederive,
        }[w]()
    print(f"fixtures written under {Path(CUSTOMIZATIONS).relative_to(Path.cwd())}")
