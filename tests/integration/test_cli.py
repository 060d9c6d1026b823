"""``kubectl mlrollouts`` against the real stack: the installed entry point, the real operator.

``get -w`` runs in a real terminal (tmux, 160x50): the live view must show the weights and the
comparison's interval while the rollout runs, and the process must exit by itself when the rollout
finishes. ``status`` exit codes (0 promoted, 1 rolled back or aborted, 2 timeout) and every action
(promote, abort, retry, pause, resume) are checked by their effect on the real operator's object
and route.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.harness.cluster import CACHE, KUBE_VERSION
from tests.harness.objects import CANDIDATE, STABLE, fraud_stack, fresh_fraud, phase, rollout
from tests.harness.queries import ERROR_RATE, FEEDBACK, POSITIVE
from tests.harness.stack import Stack

P, X = "modelrollouts", "modelexperiments"
PLUGIN = Path(sys.executable).parent / "kubectl-mlrollouts"
TMUX = shutil.which("tmux")


@pytest.fixture(scope="module")
def stack(real_components: None) -> Iterator[Stack]:
    with fraud_stack(max_seconds=1500) as s:
        yield s


@pytest.fixture()
def fresh(stack: Stack) -> Iterator[Stack]:
    yield from fresh_fraud(stack, P, X)


def env(stack: Stack) -> dict[str, str]:
    return {**os.environ, "KUBECONFIG": str(stack.cluster.kubeconfig), "NO_COLOR": "1"}


def plugin(stack: Stack, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The installed entry point, as a user runs it (KUBECONFIG from the environment)."""
    return subprocess.run(
        [str(PLUGIN), *args, "-n", stack.namespace],
        env=env(stack),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class Tmux:
    """A detached tmux session on a private socket, 160x50, running one command."""

    def __init__(self, command: list[str], environ: dict[str, str]) -> None:
        assert TMUX is not None
        self.socket = f"mlr-{uuid.uuid4().hex[:8]}"
        exports = " ".join(f"{k}={_quote(v)}" for k, v in environ.items() if k in ("KUBECONFIG", "PATH"))
        # The pane's own size, not the test runner's COLUMNS/LINES (the tmux server inherits them).
        run = f"env -u COLUMNS -u LINES {exports} TERM=xterm-256color {' '.join(_quote(c) for c in command)}"
        shell = f"{run}; echo EXITED=$?; sleep 600"
        subprocess.run(
            [TMUX, "-L", self.socket, "new-session", "-d", "-s", "w", "-x", "160", "-y", "50", shell],
            check=True,
        )

    def capture(self) -> str:
        out = subprocess.run(
            [TMUX, "-L", self.socket, "capture-pane", "-p", "-t", "w"],
            capture_output=True,
            text=True,
            check=False,
        )
        return out.stdout

    def close(self) -> None:
        subprocess.run([TMUX, "-L", self.socket, "kill-server"], check=False, capture_output=True)


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed (apt-get install tmux)")
def test_get_watch_in_a_terminal_shows_weights_and_intervals_and_exits_when_promoted(fresh: Stack) -> None:
    assert fresh.prom is not None
    steps = [{"setWeight": 20}, {"pause": {"duration": "5s"}}, {"setWeight": 50}, {"setWeight": 100}]
    fresh.apply(rollout("good", fresh.prom.url, steps))
    fresh.wait_for(P, "good", lambda o: phase(o) == "Progressing", 30)
    term = Tmux([str(PLUGIN), "get", "good", "-w", "-n", fresh.namespace], env(fresh))
    screens: list[str] = []
    stop = threading.Event()

    def record() -> None:  # the terminal as a user sees it, every 0.3 s, whatever the test does
        while not stop.is_set():
            screens.append(term.capture())
            stop.wait(0.3)

    recorder = threading.Thread(target=record, daemon=True)
    recorder.start()
    promoted_at = None
    listed = ""
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            obj = fresh.get(P, "good")
            if not listed and phase(obj) == "Progressing" and obj["status"].get("weight", 0) > 0:
                # list and get -o json while it runs agree with the object
                out = plugin(fresh, "list")
                assert out.returncode == 0, out.stderr
                listed = out.stdout
                assert re.search(r"mro\s+good\s+Progressing", listed), listed
                got = json.loads(plugin(fresh, "get", "rollout", "good", "-o", "json").stdout)
                assert got["kind"] == "ModelRollout" and got["weights"]["candidate"] in (20, 50, 100)
            if phase(obj) == "Promoted" and promoted_at is None:
                promoted_at = time.monotonic()
            if screens and "EXITED=" in screens[-1]:
                break
            time.sleep(0.5)
        stop.set()
        recorder.join(5)
        final = term.capture()
    finally:
        stop.set()
        term.close()
    if os.environ.get("MLR_CLI_DUMP"):
        Path(os.environ["MLR_CLI_DUMP"]).write_text("\n=====\n".join(screens))
    assert promoted_at is not None, "the rollout was not promoted"
    assert "EXITED=0" in final, f"get -w did not exit by itself after Promoted:\n{final}"
    assert time.monotonic() - promoted_at < 60
    assert "finished: Promoted" in final
    # While it ran, the live view showed the split the operator set, and the comparison's interval.
    running = [s for s in screens if "Progressing" in s]
    assert running, "no live screen while Progressing"
    shown = {
        (int(m[1]), int(m[2]))
        for s in running
        for m in re.finditer(rf"Weights:.*{STABLE} (\d+)%\s+{CANDIDATE} (\d+)%", s)
    }
    assert shown & {(80, 20), (50, 50)}, running[-1]
    assert shown <= {(100, 0), (80, 20), (50, 50), (0, 100)}, shown
    number = r"[-+][\d.e-]+"
    ci = re.compile(
        r"positive-feedback\s+nonInferiority m=0\.15\s+\S+\s+\S+\s+[\d,]+/[\d,]+\s+\S+\s+"
        rf"\[{number}, {number}\]"
    )
    assert any(ci.search(s) for s in running), running[-1]
    assert any("Waiting for" in s and "the next analysis at" in s for s in running)
    assert any(re.search(r"►\s+\d+\s+(setWeight|pause)", s) for s in running)
    assert listed
    # status on the finished rollout: exit code 0 at once
    t0 = time.monotonic()
    done = plugin(fresh, "status", "good", "--timeout", "30s")
    assert done.returncode == 0, done.stdout + done.stderr
    assert time.monotonic() - t0 < 20 and "Promoted" in done.stdout


def test_status_exits_1_on_rollback_then_retry_and_abort_act(fresh: Stack) -> None:
    assert fresh.prom is not None
    fresh.servers[CANDIDATE].set(error_rate=0.5)
    steps = [{"setWeight": 20}, {"pause": {"duration": "60s"}}, {"setWeight": 50}]
    fresh.apply(rollout("bad", fresh.prom.url, steps))
    status = subprocess.Popen(
        [str(PLUGIN), "status", "bad", "--timeout", "180s", "-n", fresh.namespace],
        env=env(fresh),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = status.communicate(timeout=200)
    assert status.returncode == 1, out + err
    assert "RolledBack" in out.splitlines()[-1]
    assert phase(fresh.get(P, "bad")) == "RolledBack"
    view = plugin(fresh, "get", "bad")
    assert view.returncode == 0, view.stderr
    assert re.search(r"error-rate\s+candidate\s+[\d.]+\s+<= 0\.05\s+fail\s+1/1", view.stdout), view.stdout
    assert "kubectl mlrollouts retry bad" in view.stdout
    # promote/abort/pause of a finished rollout are refused without touching it
    for action in ("abort", "pause"):
        refused = plugin(fresh, action, "bad")
        assert refused.returncode == 1 and "has finished (RolledBack)" in refused.stderr
    # retry: the operator starts the steps over
    fresh.servers[CANDIDATE].set(error_rate=0.0)
    rv = fresh.get(P, "bad")["metadata"]["resourceVersion"]
    retried = plugin(fresh, "retry", "bad", "-o", "json")
    assert retried.returncode == 0, retried.stderr
    token = json.loads(retried.stdout)["mlrollouts.io/retry"]
    assert fresh.get(P, "bad")["metadata"]["resourceVersion"] != rv
    obj = fresh.wait_for(
        P,
        "bad",
        lambda o: o["status"].get("handled", {}).get("retry") == token and phase(o) == "Progressing",
        30,
    )
    assert any(h["reason"] == "RetryRequested" for h in obj["status"]["history"])
    fresh.wait_route({CANDIDATE: 20}, timeout=30)
    # abort: all traffic back to stable, Aborted; status exits 1
    aborted = plugin(fresh, "abort", "bad")
    assert aborted.returncode == 0, aborted.stderr
    fresh.wait_for(P, "bad", lambda o: phase(o) == "Aborted", 30)
    fresh.wait_route({STABLE: 100, CANDIDATE: 0}, timeout=15)
    done = plugin(fresh, "status", "bad", "--timeout", "10s", "-o", "yaml")
    assert done.returncode == 1
    assert yaml.safe_load(done.stdout)["phase"] == "Aborted"


def test_status_timeout_gate_promote_pause_resume_and_promote_full(fresh: Stack) -> None:
    assert fresh.prom is not None
    # a manual gate, then five weight steps (one per 5 s analysis), then a second gate
    ramp = [{"setWeight": w} for w in (20, 30, 40, 50, 60)]
    steps = [{"setWeight": 10}, {"pause": {}}, *ramp, {"pause": {}}]
    last_gate = len(steps) - 1
    fresh.apply(rollout("gate", fresh.prom.url, steps))
    fresh.wait_for(P, "gate", lambda o: phase(o) == "Paused" and o["status"]["currentStep"] == 1, 60)
    # status: still waiting at --timeout -> exit 2
    t0 = time.monotonic()
    waited = plugin(fresh, "status", "gate", "--timeout", "3s")
    assert waited.returncode == 2, waited.stdout + waited.stderr
    assert 3 <= time.monotonic() - t0 < 30
    assert "timed out after 3s" in waited.stderr
    shown = plugin(fresh, "get", "gate").stdout
    assert "a resume at the manual gate of step 1" in shown
    # promote (not --full) at a manual gate moves past it (mlrollouts.io/promote): the ramp starts
    assert plugin(fresh, "promote", "gate").returncode == 0
    fresh.wait_for(P, "gate", lambda o: o["status"]["currentStep"] >= 2, 30)
    # pause: spec.paused by server-side apply as kubectl-mlrollouts; the operator stops the ramp
    paused = plugin(fresh, "pause", "gate")
    assert paused.returncode == 0, paused.stderr
    obj = fresh.wait_for(
        P, "gate", lambda o: "paused by spec.paused" in (o["status"].get("message") or ""), 40
    )
    assert obj["status"]["currentStep"] < last_gate, "the ramp ended before the pause took effect"
    owners = [
        (m["manager"], m["operation"])
        for m in obj["metadata"]["managedFields"]
        if "f:paused" in m["fieldsV1"].get("f:spec", {})
    ]
    assert owners == [("kubectl-mlrollouts", "Apply")]
    held = obj["status"]["weight"]
    time.sleep(12)  # more than two analysis intervals: unpaused, the ramp would have moved twice
    assert fresh.get(P, "gate")["status"]["weight"] == held
    assert fresh.route_weights()[CANDIDATE] == held
    # resume: gives spec.paused back (the CRD's default, false); the ramp goes on to the second gate
    resumed = plugin(fresh, "resume", "gate")
    assert resumed.returncode == 0, resumed.stderr
    obj = fresh.get(P, "gate")
    assert obj["spec"]["paused"] is False
    assert not any("f:paused" in m["fieldsV1"].get("f:spec", {}) for m in obj["metadata"]["managedFields"])
    fresh.wait_for(P, "gate", lambda o: o["status"]["weight"] > held, 40)
    fresh.wait_for(P, "gate", lambda o: phase(o) == "Paused" and o["status"]["currentStep"] == last_gate, 90)
    # promote --full at the second gate: Promoted, the candidate gets all traffic; status exits 0
    assert plugin(fresh, "promote", "gate", "--full").returncode == 0
    obj = fresh.wait_for(P, "gate", lambda o: phase(o) == "Promoted", 30)
    assert obj["status"]["weight"] == 100
    fresh.wait_route({CANDIDATE: 100}, timeout=15)
    assert plugin(fresh, "status", "gate", "--timeout", "10s").returncode == 0


def test_promote_moves_past_one_timed_pause_or_analysis_step_and_the_steps_go_on(fresh: Stack) -> None:
    """`promote` (mlrollouts.io/promote) ends the current pause or analysis step, one step only: the
    next weight still comes from a passing analysis, and it never jumps to 100 as `--full` does."""
    assert fresh.prom is not None
    steps = [
        {"setWeight": 10}, {"pause": {"duration": "1h"}}, {"setWeight": 30},
        {"analysis": {"duration": "1h"}}, {"setWeight": 50}, {"pause": {}},
    ]  # fmt: skip
    fresh.apply(rollout("steps", fresh.prom.url, steps))
    fresh.wait_for(
        P,
        "steps",
        lambda o: (o.get("status") or {}).get("currentStep") == 1 and o["status"]["weight"] == 10,
        60,
    )
    refused = plugin(fresh, "promote", "steps", "--context", "no-such-context")
    assert refused.returncode == 1 and "no-such-context" in refused.stderr
    done = plugin(fresh, "promote", "steps")
    assert done.returncode == 0 and "step 1 (pause 1h)" in done.stdout, done.stdout + done.stderr
    obj = fresh.wait_for(P, "steps", lambda o: o["status"]["currentStep"] == 3, 40)
    assert obj["status"]["weight"] == 30 and phase(obj) == "Progressing"
    fresh.wait_route({STABLE: 70, CANDIDATE: 30}, timeout=15)
    skipped = [h for h in obj["status"]["history"] if h["reason"] == "PromoteRequested"]
    assert len(skipped) == 1 and "pause step 1 skipped" in skipped[0]["message"]
    time.sleep(12)  # the 1 h analysis step holds: two more analyses and no move
    assert fresh.get(P, "steps")["status"]["weight"] == 30
    # At the analysis step promote ends it; the next weight comes from the passing analysis.
    assert plugin(fresh, "promote", "steps").returncode == 0
    obj = fresh.wait_for(P, "steps", lambda o: phase(o) == "Paused" and o["status"]["currentStep"] == 5, 40)
    assert obj["status"]["weight"] == 50
    fresh.wait_route({STABLE: 50, CANDIDATE: 50}, timeout=15)
    weights = [h.get("weight") for h in obj["status"]["history"] if h["event"] == "WeightChanged"]
    assert weights == [10, 30, 50], obj["status"]["history"]


def test_promote_full_below_100_leaves_no_traffic_on_the_replaced_stable(fresh: Stack) -> None:
    assert fresh.prom is not None
    fresh.apply(rollout("early", fresh.prom.url, [{"setWeight": 40}, {"pause": {}}]))
    fresh.wait_for(P, "early", lambda o: phase(o) == "Paused" and o["status"]["currentStep"] == 1, 60)
    fresh.wait_route({STABLE: 60, CANDIDATE: 40}, timeout=15)
    assert plugin(fresh, "promote", "early", "--full").returncode == 0
    fresh.wait_for(P, "early", lambda o: phase(o) == "Promoted", 30)
    fresh.wait_route({STABLE: 0, CANDIDATE: 100}, timeout=15)


def test_pause_is_refused_when_a_manifest_owns_spec_paused(fresh: Stack) -> None:
    """Git's spec.paused (server-side applied, as Argo CD does, or in kubectl apply's record) is not
    the plugin's to change; pause is refused and the object is left exactly as it is."""
    assert fresh.prom is not None
    co = client.CustomObjectsApi(fresh.api)
    ssa = rollout("by-argo", fresh.prom.url, [{"pause": {}}], paused=False)
    ssa["metadata"]["namespace"] = fresh.namespace
    ssa["spec"]["trafficRouting"] = {"gatewayAPI": {"httpRoute": "no-such-route"}}
    co.patch_namespaced_custom_object(
        "mlrollouts.io", "v1alpha1", fresh.namespace, P, "by-argo", ssa,
        field_manager="argocd-controller", _content_type="application/apply-patch+yaml",
    )  # fmt: skip
    csa = rollout("by-kubectl", fresh.prom.url, [{"pause": {}}], paused=False)
    csa["spec"]["trafficRouting"] = {"gatewayAPI": {"httpRoute": "no-such-route"}}
    csa["metadata"]["annotations"] = {"kubectl.kubernetes.io/last-applied-configuration": json.dumps(csa)}
    fresh.apply(csa)
    for name, owner in (("by-argo", "'argocd-controller'"), ("by-kubectl", "kubectl apply")):
        before = fresh.get(P, name)
        refused = plugin(fresh, "pause", name)
        assert refused.returncode == 1, refused.stdout
        assert f"spec.paused of ModelRollout {name} is set by" in refused.stderr and owner in refused.stderr
        after = fresh.get(P, name)
        assert after["metadata"]["generation"] == before["metadata"]["generation"]
        assert after["spec"]["paused"] is False


def test_kubectl_finds_the_plugin_and_lint_needs_no_cluster(fresh: Stack, tmp_path: Path) -> None:
    kubectl = CACHE / "kube" / KUBE_VERSION / "bin" / "kubectl"
    if kubectl.exists():
        path = f"{PLUGIN.parent}:{os.environ.get('PATH', '')}"
        out = subprocess.run(
            [str(kubectl), "mlrollouts", "list", "-n", fresh.namespace, "-o", "json"],
            env={**env(fresh), "PATH": path},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert isinstance(json.loads(out.stdout), list)
    # lint: no KUBECONFIG at all, and the API server's verdict on the same documents agrees
    assert fresh.prom is not None
    good = rollout("lint-good", fresh.prom.url, [{"setWeight": 10}])
    bad = rollout("lint-bad", fresh.prom.url, [{"setWeight": 10, "pause": {}}])
    f = tmp_path / "m.yaml"
    f.write_text(yaml.safe_dump_all([good, bad]))
    out = subprocess.run(
        [str(PLUGIN), "lint", "-f", str(f), "-o", "json"],
        env={k: v for k, v in os.environ.items() if k != "KUBECONFIG"} | {"HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 1, out.stderr
    findings = json.loads(out.stdout)["findings"]
    assert [(x["name"], x["field"], x["check"]) for x in findings] == [("lint-bad", "spec.steps[0]", "cel")]
    co = client.CustomObjectsApi(fresh.api)
    with pytest.raises(client.exceptions.ApiException) as e:
        co.create_namespaced_custom_object(
            "mlrollouts.io", "v1alpha1", fresh.namespace, P, bad, dry_run="All"
        )
    assert e.value.status == 422 and "each step sets exactly one of setWeight, pause, analysis" in str(
        e.value.body
    )
    co.create_namespaced_custom_object("mlrollouts.io", "v1alpha1", fresh.namespace, P, good, dry_run="All")


def experiment(name: str, prom: str, route: str = "fraud") -> dict[str, Any]:
    """Control a (stable) vs b (candidate); too many samples needed to decide within the test."""
    return {
        "apiVersion": "mlrollouts.io/v1alpha1",
        "kind": "ModelExperiment",
        "metadata": {"name": name},
        "spec": {
            "variants": [
                {"name": "a", "service": STABLE, "control": True},
                {"name": "b", "service": CANDIDATE},
            ],
            "trafficRouting": {"gatewayAPI": {"httpRoute": route}},
            "primaryMetric": {"name": "positive-feedback", "successes": POSITIVE, "trials": FEEDBACK},
            "guardrails": [{"name": "error-rate", "query": ERROR_RATE, "max": 0.05}],
            "successCriteria": {"minimumDetectableEffect": 0.01},
            "stoppingRules": {"minSamplesPerVariant": 1000000},
            "analysis": {"interval": "5s", "window": "30s", "prometheus": {"address": prom, "timeout": "2s"}},
        },
    }


def test_experiment_get_abort_status_and_retry(fresh: Stack) -> None:
    assert fresh.prom is not None
    fresh.apply(experiment("ab", fresh.prom.url))
    fresh.wait_for(
        X,
        "ab",
        lambda o: phase(o) == "Running" and all(v.get("n", 0) > 0 for v in o["status"]["variants"]),
        90,
    )
    got = plugin(fresh, "get", "ab", "-o", "json")  # the kind is found by the name
    assert got.returncode == 0, got.stderr
    v = json.loads(got.stdout)
    assert v["kind"] == "ModelExperiment" and v["weights"] == {"a": 50, "b": 50}
    assert [(x["name"], x["control"]) for x in v["variants"]] == [("a", True), ("b", False)]
    assert all(x["n"] > 0 for x in v["variants"])
    assert any("minSamplesPerVariant 1000000" in w for w in v["waitingFor"])
    text = plugin(fresh, "get", "experiment", "ab").stdout
    assert re.search(r"a \(control\)\s+50%", text) and re.search(r"\n\s*b\s+50%", text), text
    refused = plugin(fresh, "promote", "ab")
    assert refused.returncode == 1 and "has no promote" in refused.stderr
    # abort: all traffic to the control, Aborted; status exits 1; retry starts it again
    assert plugin(fresh, "abort", "mexp/ab").returncode == 0
    fresh.wait_for(X, "ab", lambda o: phase(o) == "Aborted", 30)
    fresh.wait_route({STABLE: 100, CANDIDATE: 0}, timeout=15)
    assert plugin(fresh, "status", "ab", "--timeout", "10s").returncode == 1
    retried = plugin(fresh, "retry", "ab", "-o", "yaml")
    assert retried.returncode == 0, retried.stderr
    token = yaml.safe_load(retried.stdout)["mlrollouts.io/retry"]
    fresh.wait_for(
        X, "ab", lambda o: phase(o) == "Running" and o["status"]["handled"].get("retry") == token, 30
    )
    assert plugin(fresh, "status", "ab", "--timeout", "2s").returncode == 2
    # a rollout of the same name: NAME alone is ambiguous, the kind says which
    assert fresh.prom is not None
    doc = rollout("ab", fresh.prom.url, [{"setWeight": 10}])
    doc["spec"]["trafficRouting"] = {"gatewayAPI": {"httpRoute": "no-such-route"}}
    fresh.apply(doc)
    both = plugin(fresh, "get", "ab")
    assert both.returncode == 1 and "get rollout ab" in both.stderr and "get experiment ab" in both.stderr
    assert json.loads(plugin(fresh, "get", "rollout", "ab", "-o", "json").stdout)["kind"] == "ModelRollout"
