"""What ``kubectl mlrollouts`` shows and does, on objects whose status the real engines wrote.

Each object here is produced by driving ``engine.rollout.reconcile`` / ``engine.experiment.reconcile``
with synthetic observations (as the handlers do), so the numbers shown are the engines' own.
Commands run through Click with a fake cluster that records what would be written.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from model_rollouts.analysis.stats import ProportionData
from model_rollouts.api.common import dump
from model_rollouts.api.experiment import ModelExperimentStatus
from model_rollouts.api.rollout import ModelRolloutSpec, ModelRolloutStatus
from model_rollouts.cli import app, render, view
from model_rollouts.cli.kube import CliError, Kube, manifest_owner, parse_ref
from model_rollouts.engine import experiment as xeng
from model_rollouts.engine import rollout as eng
from model_rollouts.metrics.provider import Result
from tests.unit.test_experiment_engine import make_spec, obs

T0 = datetime(2026, 1, 1, tzinfo=UTC)
CREATED = "2026-01-01T00:00:00Z"


def rollout_spec(steps: list[dict[str, Any]], **extra: Any) -> ModelRolloutSpec:
    return ModelRolloutSpec.model_validate(
        {
            "stable": {"service": "v1"},
            "candidate": {"service": "v2", "modelVersion": "2.0"},
            "trafficRouting": {"gatewayAPI": {"httpRoute": "r"}},
            "steps": steps,
            "analysis": {
                "interval": "10s",
                "prometheus": {"address": "http://prom:9090"},
                "guardrails": [{"name": "errors", "query": "q", "max": 0.05, "failureLimit": 2}],
                "comparisons": [{"name": "feedback", "successes": "s", "trials": "t", "margin": 0.05}],
            },
            **extra,
        }
    )


def drive(
    spec: ModelRolloutSpec, ticks: int, error_rate: float = 0.01, annotations: dict[str, str] | None = None
) -> tuple[ModelRolloutStatus, datetime]:
    """The handler's loop: measure when an analysis is due, 10 s apart, growing counts."""
    st, now = ModelRolloutStatus(), T0
    for i in range(ticks):
        o = None
        if eng.needs_measurement(spec, st, now):
            n = 400.0 * (i + 1)
            o = eng.Observations(
                guardrails={"errors": Result("value", error_rate)},
                comparisons={
                    "feedback": eng.ComparisonData(
                        stable=ProportionData(0.60 * n, n), candidate=ProportionData(0.61 * n / 4, n / 4)
                    )
                },
            )
        ann = annotations if i > 0 else None  # an annotation older than the revision is not acted on
        st = eng.reconcile(spec, st, now=now, generation=1, observations=o, annotations=ann).status
        now += timedelta(seconds=10)
    return st, now


def obj_of(kind: str, name: str, spec: Any, status: Any, **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mlrollouts.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": "ml", "generation": 1, "creationTimestamp": CREATED} | meta,
        "spec": dump(spec),
        "status": dump(status),
    }  # fmt: skip


GATE = [{"setWeight": 20}, {"pause": {}}, {"setWeight": 50}, {"analysis": {"duration": "1m"}}]


@pytest.fixture()
def gated() -> tuple[dict[str, Any], datetime]:
    spec = rollout_spec(GATE)
    st, now = drive(spec, 4)
    assert st.phase == "Paused" and st.currentStep == 1 and st.weight == 20
    return obj_of("ModelRollout", "fraud", spec, st), now


def test_rollout_view_at_a_manual_gate(gated: tuple[dict[str, Any], datetime]) -> None:
    obj, now = gated
    v = view.rollout_view(obj, now)
    st = obj["status"]
    assert v["weights"] == {"stable": 80, "candidate": 20}
    assert [s["state"] for s in v["steps"]] == ["done", "current", "pending", "pending"]
    assert [s["step"] for s in v["steps"]] == [
        "setWeight 20",
        "pause (until resumed)",
        "setWeight 50",
        "analysis 1m",
    ]
    (g,) = v["guardrails"]
    assert (g["name"], g["value"], g["max"], g["verdict"], g["failures"], g["failureLimit"]) == (
        "errors", 0.01, 0.05, "pass", 0, 2)  # fmt: skip
    (c,) = v["comparisons"]
    details = next(m for m in st["lastAnalysis"] if m["kind"] == "comparison")["details"]
    for key in ("stable", "candidate", "stableN", "candidateN", "difference", "ciLow", "ciHigh", "pValue"):
        assert c[key] == pytest.approx(details[key])
    assert c["ciLow"] < c["difference"] < c["ciHigh"]
    assert c["verdict"] == "inconclusive" and c["moreSamplesNeeded"] > 0
    # the next analysis is one interval after the later of the last analysis and the weight change
    mark = max(view.parse_time(st["lastAnalysisTime"]), view.parse_time(st["epochStartedAt"]))  # type: ignore[type-var]
    assert view.parse_time(v["nextAnalysisAt"]) == mark + timedelta(seconds=10)
    waiting = "\n".join(v["waitingFor"])
    assert "a resume at the manual gate of step 1" in waiting and "or `promote fraud`" in waiting
    assert f"about {c['moreSamplesNeeded']:,.0f} more samples (both arms)" in waiting
    assert not v["finished"] and view.outcome(obj) is None


def test_rollout_rendering_shows_arms_difference_interval_and_the_current_step(
    gated: tuple[dict[str, Any], datetime],
) -> None:
    obj, now = gated
    v = view.rollout_view(obj, now)
    text = render.to_text(render.view(v))
    c = v["comparisons"][0]
    row = next(line for line in text.splitlines() if line.strip().startswith("feedback"))
    assert render.interval(c["ciLow"], c["ciHigh"]) in row
    assert f"{c['candidate']:.4g}" in row and f"{c['stable']:.4g}" in row
    assert f"{c['candidateN']:,.0f}/{c['stableN']:,.0f}" in row and f"{c['difference']:+.3g}" in row
    assert "inconclusive" in row
    assert re.search(r"►\s+1\s+pause \(until resumed\)\s+current", text)
    assert re.search(r"✔\s+0\s+setWeight 20\s+done", text)
    assert "v1 80%  v2 20%" in text
    assert re.search(r"errors\s+candidate\s+0\.01\s+<= 0\.05\s+pass\s+0/2", text)
    assert "Waiting for" in text and "Conditions" in text


def test_finished_rollouts_and_exit_codes() -> None:
    spec = rollout_spec([{"setWeight": 50}])
    promoted, _ = drive(spec, 3, annotations={"mlrollouts.io/promote-full": "now"})
    assert promoted.phase == "Promoted"
    o = obj_of("ModelRollout", "p", spec, promoted)
    assert view.finished(o) and view.outcome(o) == 0
    assert view.rollout_view(o)["waitingFor"] == ["nothing: Promoted"]
    assert all(s["state"] == "done" for s in view.rollout_view(o)["steps"])
    # promotion made v2 the serving stable: the view still names the baseline it replaced
    assert "v1 0%  v2 100%" in render.to_text(render.view(view.rollout_view(o)))

    bad, _ = drive(rollout_spec([{"setWeight": 50}, {"pause": {"duration": "5m"}}]), 6, error_rate=0.5)
    assert bad.phase == "RolledBack"
    o = obj_of("ModelRollout", "b", spec, bad)
    o["spec"] = dump(rollout_spec([{"setWeight": 50}, {"pause": {"duration": "5m"}}]))
    v = view.rollout_view(o)
    assert view.outcome(o) == 1
    assert [(g["verdict"], g["failures"]) for g in v["guardrails"]] == [("fail", 2)]
    assert "`kubectl mlrollouts retry b` starts the steps over" in v["waitingFor"]
    # a retry the operator has not acted on yet, or a generation it has not seen: not finished
    o["metadata"]["annotations"] = {"mlrollouts.io/retry": "t1"}
    assert not view.finished(o) and view.outcome(o) is None
    del o["metadata"]["annotations"]
    o["metadata"]["generation"] = 2
    assert not view.finished(o)


def experiment_obj(ticks: int, v1_rate: float = 0.11) -> dict[str, Any]:
    spec = make_spec(3)
    st, now = ModelExperimentStatus(), T0
    for i in range(ticks):
        n = 200.0 * (i + 1)
        o = obs({"control": ProportionData(0.10 * n, n), "v1": ProportionData(v1_rate * n, n),
                 "v2": ProportionData(0.10 * n, n)}) if i else None  # fmt: skip
        if o is not None and not xeng.analysis_due(spec, st, now):
            o = None
        st = xeng.reconcile(spec, st, now=now, generation=1, observations=o).status
        now += timedelta(seconds=5)
    return obj_of("ModelExperiment", "ab", spec, st)


def test_experiment_view_and_rendering() -> None:
    o = experiment_obj(4)
    v = view.experiment_view(o)
    assert [x["name"] for x in v["variants"]] == ["control", "v1", "v2"]
    assert sum(v["weights"].values()) == 100
    assert {c["arm"] for c in v["comparisons"]} == {"v1", "v2"}
    for c in v["comparisons"]:
        m = next(
            x for x in o["status"]["lastAnalysis"] if x["kind"] == "comparison" and x["variant"] == c["arm"]
        )
        for k in ("control", "variant", "controlN", "variantN"):
            assert c[k] == pytest.approx(m["details"][k])
        assert c["adjustedPValue"] == pytest.approx(m["details"]["adjustedPValue"])
    text = render.to_text(render.view(v))
    v1 = next(c for c in v["comparisons"] if c["arm"] == "v1")
    row = next(line for line in text.splitlines() if line.strip().startswith("v1 ") and "/" in line)
    assert render.interval(v1["ciLow"], v1["ciHigh"]) in row and render.num(v1["adjustedPValue"], 3) in row
    assert "Variants" in text and "control (control)" in text


def test_experiment_that_concludes_exits_0() -> None:
    for ticks in range(2, 60, 2):
        o = experiment_obj(ticks, v1_rate=0.16)
        if o["status"]["phase"] == "Concluded":
            break
    assert o["status"]["phase"] == "Concluded", o["status"]["message"]
    v = view.experiment_view(o)
    assert v["finished"] and view.outcome(o) == 0 and v["winner"] == "v1"
    assert v["waitingFor"][0] == "nothing: Concluded (winner v1)"


def test_parse_ref() -> None:
    assert parse_ref(("fraud",)) == (None, "fraud")
    assert parse_ref(("rollout", "fraud")) == ("ModelRollout", "fraud")
    assert parse_ref(("mexp/ab",)) == ("ModelExperiment", "ab")
    with pytest.raises(CliError, match="unknown kind"):
        parse_ref(("deployment", "x"))


def test_manifest_owner_of_spec_paused() -> None:
    def mf(manager: str, op: str) -> dict[str, Any]:
        return {"manager": manager, "operation": op, "fieldsV1": {"f:spec": {"f:paused": {}}}}

    created = {"metadata": {"managedFields": [mf("kubectl-create", "Update")]}}
    assert manifest_owner(created) is None  # a create owns the defaulted field: no declaration
    argo = {"metadata": {"managedFields": [mf("argocd-controller", "Apply")]}}
    assert "argocd-controller" in (manifest_owner(argo) or "")
    ours = {"metadata": {"managedFields": [mf("kubectl-mlrollouts", "Apply")]}}
    assert manifest_owner(ours) is None
    last = json.dumps({"spec": {"paused": False}})
    csa = {"metadata": {"annotations": {"kubectl.kubernetes.io/last-applied-configuration": last}}}
    assert "kubectl apply" in (manifest_owner(csa) or "")


class FakeKube(Kube):
    """The cluster as a dict; records annotations and spec.paused applies."""

    def __init__(self, objects: list[dict[str, Any]]) -> None:
        super().__init__(api=None, namespace="ml")  # type: ignore[arg-type]
        self.objects = {(o["kind"], o["metadata"]["name"]): o for o in objects}
        self.written: list[tuple[str, str, Any]] = []

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((kind, name))

    def list(self, all_namespaces: bool) -> list[dict[str, Any]]:
        return list(self.objects.values())

    def annotate(self, obj: dict[str, Any], key: str) -> str:
        self.written.append((obj["metadata"]["name"], key, "token"))
        return "token"

    def set_paused(self, obj: dict[str, Any], paused: bool) -> None:
        self.written.append((obj["metadata"]["name"], "spec.paused", paused))


@pytest.fixture()
def cluster(monkeypatch: pytest.MonkeyPatch, gated: tuple[dict[str, Any], datetime]) -> FakeKube:
    spec = rollout_spec([{"setWeight": 50}])
    promoted, _ = drive(spec, 3, annotations={"mlrollouts.io/promote-full": "now"})
    bad_spec = rollout_spec([{"setWeight": 50}, {"pause": {"duration": "5m"}}])
    bad, _ = drive(bad_spec, 6, error_rate=0.5)
    fake = FakeKube([gated[0], obj_of("ModelRollout", "done", spec, promoted),
                     obj_of("ModelRollout", "bad", bad_spec, bad), experiment_obj(4)])  # fmt: skip
    monkeypatch.setattr(app, "connect", lambda **_: fake)
    return fake


def run(*args: str) -> Any:
    return CliRunner().invoke(app.cli, list(args))


def test_status_exit_codes(cluster: FakeKube) -> None:
    assert run("status", "done").exit_code == 0
    res = run("status", "bad")
    assert res.exit_code == 1 and "RolledBack" in res.output
    res = run("status", "fraud", "--timeout", "1s", "--interval", "0.2")
    assert res.exit_code == 2 and "timed out after 1s" in res.output
    assert run("status", "nope").exit_code == 3
    res = run("status", "fraud", "--timeout", "soon")
    assert res.exit_code == 3 and "--timeout: invalid duration 'soon'" in res.output  # not a timeout
    data = json.loads(run("status", "bad", "-o", "json").output)
    assert data["exitCode"] == 1 and data["phase"] == "RolledBack"


def test_get_and_list_outputs(cluster: FakeKube) -> None:
    data = yaml.safe_load(run("get", "rollout", "fraud", "-o", "yaml").output)
    assert data["weights"] == {"stable": 80, "candidate": 20} and data["comparisons"][0]["ciLow"] is not None
    assert json.loads(run("get", "ab", "-o", "json").output)["kind"] == "ModelExperiment"
    res = run("get", "fraud")
    assert res.exit_code == 0 and "Comparisons: candidate vs stable" in res.output
    res = run("get", "-w", "done")  # finished: the live view draws once and exits
    assert res.exit_code == 0 and "finished: Promoted" in res.output
    rows = json.loads(run("list", "-o", "json").output)
    listed = {(r["kind"], r["name"], r["phase"]) for r in rows}
    assert listed >= {("ModelRollout", "done", "Promoted"), ("ModelExperiment", "ab", "Running")}
    assert run("get", "nope").exit_code == 1


def test_actions_write_the_documented_annotations_and_refuse_what_cannot_act(cluster: FakeKube) -> None:
    res = run("promote", "fraud")  # at the manual gate: move past it (one step)
    assert res.exit_code == 0 and "manual gate" in res.output
    assert cluster.written[-1] == ("fraud", "mlrollouts.io/promote", "token")
    assert run("promote", "fraud", "--full").exit_code == 0
    assert cluster.written[-1] == ("fraud", "mlrollouts.io/promote-full", "token")
    assert run("abort", "fraud", "-o", "json").exit_code == 0
    assert cluster.written[-1] == ("fraud", "mlrollouts.io/abort", "token")
    assert run("pause", "fraud").exit_code == 0
    assert cluster.written[-1] == ("fraud", "spec.paused", True)
    assert run("resume", "fraud").exit_code == 0
    assert cluster.written[-1] == ("fraud", "mlrollouts.io/resume", "token")
    assert run("retry", "bad").exit_code == 0
    assert cluster.written[-1] == ("bad", "mlrollouts.io/retry", "token")
    n = len(cluster.written)
    for args, why in [
        (("promote", "ab"), "has no promote"),
        (("promote", "done"), "has finished (Promoted)"),
        (("abort", "bad"), "has finished (RolledBack)"),
        (("retry", "fraud"), "only after RolledBack or Aborted"),
        (("resume", "ab"), "nothing to resume"),
    ]:
        res = run(*args)
        assert res.exit_code == 1 and why in res.output, (args, res.output)
    assert len(cluster.written) == n  # nothing written by a refused action


def test_namespace_and_context_come_from_the_kubeconfig(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def ctx(name: str, ns: str | None) -> dict[str, Any]:
        return {"name": name, "context": {"cluster": "c", "user": "u", **({"namespace": ns} if ns else {})}}

    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "x"}}],
        "contexts": [ctx("team-a", "team-a"), ctx("bare", None)],
        "current-context": "team-a",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(cfg))
    assert Kube.connect(str(path), None, None).namespace == "team-a"
    assert Kube.connect(str(path), "bare", None).namespace == "default"
    assert Kube.connect(str(path), None, "ml").namespace == "ml"
    monkeypatch.setenv("KUBECONFIG", str(path))
    seen: list[str] = []
    monkeypatch.setattr(app, "connect", lambda **kw: seen.append(kw["kubeconfig"]) or FakeKube([]))
    assert run("list").exit_code == 0 and seen == [str(path)]


def test_status_of_an_idle_rollout_exits_0(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = rollout_spec([{"setWeight": 50}])
    spec = spec.model_copy(update={"candidate": spec.stable})
    idle, _ = drive(spec, 1)
    assert idle.phase == "Idle"  # the candidate is what serves: nothing to roll out
    monkeypatch.setattr(app, "connect", lambda **_: FakeKube([obj_of("ModelRollout", "same", spec, idle)]))
    res = run("status", "same")
    assert res.exit_code == 0 and "Idle" in res.output


def test_an_unreachable_api_server_is_an_error_not_a_rollback(tmp_path: Any) -> None:
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],  # nothing listens
        "users": [{"name": "u", "user": {"token": "x"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u", "namespace": "ml"}}],
        "current-context": "c",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(cfg))
    res = run("status", "fraud", "--kubeconfig", str(path))
    assert res.exit_code == 3, res.output  # 1 would read as RolledBack in a CI script
    assert "error: cannot reach the Kubernetes API server" in res.output and "Traceback" not in res.output
    for command in ("abort", "report"):
        res = run(command, "fraud", "--kubeconfig", str(path))
        assert res.exit_code == 1 and "cannot reach the Kubernetes API server" in res.output, res.output
        assert "Traceback" not in res.output


def test_promote_is_refused_at_a_weight_step_and_names_the_step(cluster: FakeKube) -> None:
    obj = cluster.objects[("ModelRollout", "fraud")]
    obj["status"] = {**obj["status"], "currentStep": 0, "phase": "Progressing"}  # setWeight 20
    n = len(cluster.written)
    res = run("promote", "fraud")
    assert res.exit_code == 1 and "step 0 is not a pause or analysis step" in res.output
    assert "promote --full" in res.output and len(cluster.written) == n
    obj["status"]["currentStep"] = 1  # the manual gate again: accepted, one step
    res = run("promote", "fraud", "-o", "json")
    assert res.exit_code == 0 and json.loads(res.output)["mlrollouts.io/promote"] == "token"
