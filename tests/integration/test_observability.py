"""Dashboards and alerts against the real operator, on the real stack.

The stack's Prometheus scrapes the operator's /metrics every second and loads
dashboards/alerts.rules.yaml, the very rules file the chart's PrometheusRule carries. A rollout and
an experiment run for real; then:

- every metric a dashboard or alert names is exported by the running operator (its /metrics);
- every query of the rollout and experiment dashboards, with the variables set to those objects,
  returns data from Prometheus (so the panels, bands included, are not empty);
- each alert becomes firing in Prometheus' /api/v1/alerts for the object that caused it: a rollback,
  route writes refused by an admission policy, a passed progressDeadline, a sample-ratio mismatch;
- deleting the objects removes their series.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import objects
from tests.harness.cluster import kubectl_apply
from tests.harness.objects import delete_one, status
from tests.harness.procs import REPO
from tests.harness.queries import REQUESTS
from tests.harness.stack import Stack, httproute
from tests.unit.test_dashboards import MACROS, exported_names, metric_names, rule_exprs
from tests.unit.test_dashboards import exprs as dashboard_exprs

pytestmark = pytest.mark.integration

V1, V2, V3 = "obs-v1", "obs-v2", "obs-v3"
ROUTE = "obs"
G, V = "mlrollouts.io", "v1alpha1"
OPERATOR_USER = "system:serviceaccount:model-rollouts:model-rollouts"
DASHBOARDS = REPO / "dashboards"


@pytest.fixture(scope="module")
def stack(real_components: None) -> Iterator[Stack]:
    with Stack(
        variants={V1: {"error_rate": 0.0}, V2: {"error_rate": 0.0}, V3: {"error_rate": 0.0}},
        route=ROUTE,
        rps=72,
        max_seconds=1800,
        prometheus_rules=[DASHBOARDS / "alerts.rules.yaml"],
    ) as s:
        for svc in (V1, V2, V3):
            s.servers[svc].set(error_rate=0.0, positive_rate=0.5)
        s.start_operator()
        yield s


def rollout(name: str, prom: str, candidate: str, **extra: Any) -> dict[str, Any]:
    """V1 stable, ``candidate`` behind ROUTE; 30% then a pause unless ``steps`` says otherwise."""
    steps = extra.pop("steps", [{"setWeight": 30}, {"pause": {}}])
    return objects.rollout(
        name, prom, steps, stable=V1, candidate={"service": candidate}, route=ROUTE, **extra
    )


def experiment(name: str, prom: str) -> dict[str, Any]:
    """a (control, V1) vs b (V2), sequential; no decision before the SRM check has enough samples to speak."""
    return objects.experiment(
        name,
        prom,
        [{"name": "a", "service": V1, "control": True}, {"name": "b", "service": V2}],
        ROUTE,
        successCriteria={"method": "sequential"},
        stoppingRules={"minSamplesPerVariant": 1000},
        analysis={"requests": REQUESTS},
    )


def scrape(s: Stack) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{s.operator_metrics_port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def samples(exposition: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (x.name, frozenset(x.labels.items())): x.value
        for fam in text_string_to_metric_families(exposition)
        for x in fam.samples
    }


def alerts(s: Stack) -> list[dict[str, Any]]:
    assert s.prom is not None
    with urllib.request.urlopen(s.prom.url + "/api/v1/alerts", timeout=5) as r:
        return list(json.load(r)["data"]["alerts"])


def wait_firing(
    s: Stack, alert: str, name: str, timeout: float, plural: str = "modelrollouts"
) -> dict[str, Any]:
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        seen = [a for a in alerts(s) if a["labels"].get("alertname") == alert]
        hit = next((a for a in seen if a["labels"].get("name") == name and a["state"] == "firing"), None)
        if hit:
            return hit
        time.sleep(1)
    st = status(s.get(plural, name))
    why = {k: st.get(k) for k in ("phase", "message", "conditions", "reconcileErrors")}
    raise AssertionError(f"{alert} for {name} never fired within {timeout:.0f}s; last seen: {seen}; {why}")


def evaluate_board(s: Stack, file: str, values: dict[str, str]) -> dict[str, int]:
    """Every query of a dashboard with its variables set: the number of series Prometheus returns."""
    assert s.prom is not None
    board = json.loads((DASHBOARDS / file).read_text())
    out = {}
    for where, expr in dashboard_exprs(board):
        if where.startswith("variable"):
            continue
        for macro, value in MACROS.items():
            expr = expr.replace(macro, value)
        expr = re.sub(r"\$(\w+)", lambda m: values[m.group(1)], expr)
        out[f"{where}: {expr}"] = len(s.prom.query(expr))
    return out


def wait_board(s: Stack, file: str, values: dict[str, str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        counts = evaluate_board(s, file, values)
        empty = [q for q, n in counts.items() if n == 0]
        if not empty:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{file}: queries with no data for {values}:\n" + "\n".join(empty))
        time.sleep(2)


def test_dashboards_show_real_data_and_every_alert_fires(stack: Stack) -> None:
    s = stack
    assert s.prom is not None and s.loadgen is not None
    ns = s.namespace
    kinds = {"modelrollouts": "ModelRollout", "modelexperiments": "ModelExperiment"}

    # 1. A rollout at 30% with a comparison: the rollout dashboard's panels all have data.
    s.apply(httproute(ROUTE, ns, {V1: 100, V2: 0, V3: 0}))
    s.apply(rollout("canary", s.prom.url, V2))

    def compared(o: dict[str, Any]) -> bool:
        m = next((m for m in status(o).get("lastAnalysis", []) if m["kind"] == "comparison"), None)
        return m is not None and {"ciLow", "ciHigh"} <= set(m.get("details") or {})

    s.wait_for("modelrollouts", "canary", compared, 120)
    exposition = scrape(s)
    series = samples(exposition)
    obj_labels = {"kind": "ModelRollout", "namespace": ns, "name": "canary"}
    arm = {**obj_labels, "metric": "positive-feedback"}
    for name, labels in (
        ("mlrollouts_comparison_estimate", {**arm, "variant": "stable"}),
        ("mlrollouts_comparison_estimate", {**arm, "variant": "candidate"}),
        ("mlrollouts_comparison_ci_low", {**arm, "variant": "candidate"}),
        ("mlrollouts_comparison_ci_high", {**arm, "variant": "candidate"}),
        ("mlrollouts_guardrail_value", {**obj_labels, "guardrail": "error-rate", "variant": "candidate"}),
    ):
        assert (name, frozenset(labels.items())) in series, (name, labels)
    low = series[("mlrollouts_comparison_ci_low", frozenset({**arm, "variant": "candidate"}.items()))]
    high = series[("mlrollouts_comparison_ci_high", frozenset({**arm, "variant": "candidate"}.items()))]
    assert low < high
    assert series[("mlrollouts_weight", frozenset({**obj_labels, "variant": "candidate"}.items()))] == 30
    threshold = {**obj_labels, "guardrail": "error-rate", "bound": "max"}
    assert series[("mlrollouts_guardrail_threshold", frozenset(threshold.items()))] == 0.05
    excerpt = [ln for ln in exposition.splitlines() if 'name="canary"' in ln and "comparison_" in ln]
    print("\n" + "\n".join(excerpt))
    wait_board(
        s,
        "model-rollouts-rollout.json",
        {"namespace": ns, "name": "canary", "metric": "positive-feedback"},
    )

    # 2. The candidate breaks: rolled back, and the rollback alert fires for it.
    s.servers[V2].set(error_rate=0.5)
    s.wait_for("modelrollouts", "canary", lambda o: status(o).get("phase") == "RolledBack", 90)
    t0 = time.monotonic()
    fired = wait_firing(s, "ModelRolloutRolledBack", "canary", 60)
    print(f"\nrollback -> alert firing in {time.monotonic() - t0:.1f}s: {fired['annotations']['summary']}")
    assert fired["labels"]["namespace"] == ns and fired["labels"]["kind"] == "ModelRollout"
    s.servers[V2].set(error_rate=0.0)
    # A restarted operator exports the rolled-back object again (its guard timer), so the alert stays.
    s.stop_operator()
    s.start_operator()
    t0, rolled_back = (
        time.monotonic(),
        ("mlrollouts_phase", frozenset({**obj_labels, "phase": "RolledBack"}.items())),
    )
    while True:
        with contextlib.suppress(OSError):  # not listening yet
            if samples(scrape(s)).get(rolled_back) == 1.0:
                break
        assert time.monotonic() - t0 < 90, "the restarted operator never exported the rolled-back phase"
        time.sleep(1)
    print(f"after a restart, the rolled-back phase is exported again in {time.monotonic() - t0:.1f}s")
    delete_one(s, "modelrollouts", "canary")

    # 3. A guardrail that never has data and a short progressDeadline (hold): the deadline alert.
    late = rollout(
        "late",
        s.prom.url,
        V3,
        analysis={"guardrails": [{"name": "absent", "query": 'sum(no_such_metric{service="{{ service }}"})',
                                  "max": 1}], "comparisons": []},
        steps=[{"setWeight": 30}, {"setWeight": 60}],  # 30 -> 60 waits for data that never comes
        progressDeadline="8s",
        onProgressDeadline="hold",
    )  # fmt: skip
    s.apply(late)
    t0 = time.monotonic()
    fired = wait_firing(s, "ModelRolloutProgressDeadlineExceeded", "late", 90)
    print(f"progressDeadline 8s (hold) -> alert firing {time.monotonic() - t0:.1f}s after the apply")
    obj = s.get("modelrollouts", "late")
    assert status(obj)["phase"] == "Progressing"  # held, not rolled back: the alert is the deadline's own
    assert not any(
        a["labels"].get("name") == "late" and a["labels"]["alertname"] == "ModelRolloutRolledBack"
        for a in alerts(s)
    )
    delete_one(s, "modelrollouts", "late")

    # 4. Route writes refused by an admission policy: the operator holds and retries; the alert fires.
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": "obs-deny-route-writes"},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {"apiGroups": ["gateway.networking.k8s.io"], "apiVersions": ["*"],
                     "operations": ["UPDATE"], "resources": ["httproutes"]}
                ]
            },
            "validations": [
                {"expression": f"request.userInfo.username != '{OPERATOR_USER}'", "message": "denied by test"}
            ],
        },
    }  # fmt: skip
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": "obs-deny-route-writes"},
        "spec": {"policyName": "obs-deny-route-writes", "validationActions": ["Deny"]},
    }
    adm = client.AdmissionregistrationV1Api(s.api)
    kubectl_apply(s.api, [policy, binding])
    try:
        time.sleep(2)  # the policy takes effect
        s.apply(rollout("denied", s.prom.url, V3))
        t0 = time.monotonic()
        fired = wait_firing(s, "ModelRolloutReconcileErrors", "denied", 150)
        print(f"route writes refused -> alert firing in {time.monotonic() - t0:.1f}s (for: 30s)")
        assert float(fired["value"]) >= 3
        cond = {c["type"]: c for c in status(s.get("modelrollouts", "denied"))["conditions"]}
        assert cond["ReconcileError"]["status"] == "True"
    finally:
        adm.delete_validating_admission_policy_binding("obs-deny-route-writes")
        adm.delete_validating_admission_policy("obs-deny-route-writes")
    delete_one(s, "modelrollouts", "denied")

    # 5. An experiment whose traffic is skewed towards b: its dashboard has data, then the SRM alert.
    s.apply(httproute(ROUTE, ns, {V1: 50, V2: 50, V3: 0}))
    s.loadgen.set_skew({V2: 2.0})
    try:
        s.apply(experiment("ab", s.prom.url))

        def measured(o: dict[str, Any]) -> bool:
            st = status(o)
            m = next((m for m in st.get("lastAnalysis", []) if m["kind"] == "comparison"), None)
            has_band = m is not None and {"ciLow", "ciHigh"} <= set(m.get("details") or {})
            return (has_band and st.get("srmPValue") is not None) or st.get("phase") == "Paused"

        obj = s.wait_for("modelexperiments", "ab", measured, 150)
        wait_board(s, "model-rollouts-experiment.json", {"namespace": ns, "name": "ab", "variant": "b"})
        s.wait_for("modelexperiments", "ab", lambda o: status(o).get("phase") == "Paused", 180)
        t0 = time.monotonic()
        fired = wait_firing(s, "ModelExperimentSampleRatioMismatch", "ab", 60, "modelexperiments")
        print(f"SRM pause -> alert firing in {time.monotonic() - t0:.1f}s: {fired['annotations']['summary']}")
        assert fired["labels"]["kind"] == "ModelExperiment"
    finally:
        s.loadgen.set_skew({})

    # 6. Every metric the dashboards and alerts name is exported by the running operator.
    exported = exported_names(scrape(s))
    referenced: dict[str, set[str]] = {}
    for p in sorted(DASHBOARDS.glob("*.json")):
        for where, expr in dashboard_exprs(json.loads(p.read_text())):
            for m in metric_names(expr):
                referenced.setdefault(m, set()).add(f"{p.name} {where}")
    for alert, expr in rule_exprs():
        for m in metric_names(expr):
            referenced.setdefault(m, set()).add(f"alert {alert}")
    missing = {m: sorted(w) for m, w in referenced.items() if m not in exported}
    assert not missing, f"named but not exported by the operator: {missing}"
    print(f"{len(referenced)} metric names referenced, all exported")

    # 7. Deleting an object removes its series from /metrics.
    delete_one(s, "modelexperiments", "ab")
    for name, kind in (("canary", kinds["modelrollouts"]), ("ab", kinds["modelexperiments"])):
        left = [ln for ln in scrape(s).splitlines() if f'name="{name}"' in ln and f'kind="{kind}"' in ln]
        assert not left, left[:5]


def test_the_rules_file_is_loaded_as_prometheus_parses_it(stack: Stack) -> None:
    """Prometheus itself accepted every rule of the file (a rule it rejects would not be listed)."""
    assert stack.prom is not None
    with urllib.request.urlopen(stack.prom.url + "/api/v1/rules?type=alert", timeout=5) as r:
        groups = json.load(r)["data"]["groups"]
    loaded = {rule["name"]: rule for g in groups for rule in g["rules"]}
    assert set(loaded) == {a for a, _ in rule_exprs()}
    assert all(rule["health"] in ("ok", "unknown") for rule in loaded.values()), loaded
    assert Path(groups[0]["file"]).name == "alerts.rules.yaml"
