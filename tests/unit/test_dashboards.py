"""The Grafana dashboards and the alerting rules, checked without a cluster.

Every expression parses (the promql-parser wheel, Prometheus' own grammar ported to Rust), names only
metrics that the operator declares, and every dashboard has its fixed uid, unique panel ids and the
datasource, namespace and name variables. tests/integration/test_observability.py checks the same
names against a real scrape and fires the alerts in a real Prometheus.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from model_rollouts import telemetry
from model_rollouts.api.experiment import ModelExperimentStatus
from model_rollouts.api.rollout import ModelRolloutStatus

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "dashboards"
RULES = DASHBOARDS / "alerts.rules.yaml"
UIDS = {
    "model-rollouts-overview.json": "mlrollouts-overview",
    "model-rollouts-rollout.json": "mlrollouts-rollout",
    "model-rollouts-experiment.json": "mlrollouts-experiment",
}
#: Grafana's interval macros, replaced by a duration before parsing (PromQL has no such syntax).
MACROS = {"$__rate_interval": "1m", "$__interval": "30s", "$__range": "1h"}
BUILTIN_VARS = {"__rate_interval", "__interval", "__range"}


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in board["panels"]:
        yield p
        yield from p.get("panels", [])


def exprs(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target and query variable."""
    for p in panels(board):
        for t in p.get("targets", []):
            yield f"panel {p['id']} {p['title']!r} {t['refId']}", t["expr"]
    for v in board["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"]
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", q)
            assert m, f"variable {v['name']}: {q}"
            yield f"variable {v['name']}", m.group(1)


def rule_exprs() -> Iterator[tuple[str, str]]:
    for g in yaml.safe_load(RULES.read_text())["groups"]:
        for r in g["rules"]:
            yield r["alert"], r["expr"]


def parse(expr: str) -> promql_parser.Expr:
    for macro, value in MACROS.items():
        expr = expr.replace(macro, value)
    return promql_parser.parse(expr)


def metric_names(expr: str) -> set[str]:
    names: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(parse(expr), visit)
    return names


def declared() -> set[str]:
    """Every series name the operator's metrics can have (counters' _total, histograms' _bucket ...)."""
    from prometheus_client import generate_latest

    return exported_names(generate_latest(REGISTRY).decode())


def exported_names(exposition: str) -> set[str]:
    """Series names a /metrics text declares (with HELP/TYPE), whether or not a labelled series exists."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}
    out: set[str] = set()
    for fam in text_string_to_metric_families(exposition):
        out.add(fam.name)
        out.update(fam.name + s for s in suffixes.get(fam.type, ()))
        out.update(s.name for s in fam.samples)
    return out


ALL = [
    *((f"{f}: {where}", e) for f, b in dashboards().items() for where, e in exprs(b)),
    *((f"alert {a}", e) for a, e in rule_exprs()),
]


def test_the_dashboards_are_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("generate", DASHBOARDS / "generate.py")
    assert spec and spec.loader
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert set(gen.DASHBOARDS) == set(UIDS) == set(dashboards())
    for file, make in gen.DASHBOARDS.items():
        assert (DASHBOARDS / file).read_text() == gen.render(make), (
            f"{file} is stale: python dashboards/generate.py"
        )


@pytest.mark.parametrize(("where", "expr"), ALL, ids=[w for w, _ in ALL])
def test_every_expression_parses_and_names_only_declared_metrics(where: str, expr: str) -> None:
    names = metric_names(expr)
    assert names, f"{where}: no metric in {expr}"
    unknown = names - declared()
    assert not unknown, f"{where}: {sorted(unknown)} are not metrics of the operator"


def test_a_typo_is_caught() -> None:
    """The checks above can fail: a misspelt name is unknown, broken PromQL does not parse."""
    assert metric_names("mlrollouts_wieght{x='1'}") - declared() == {"mlrollouts_wieght"}
    with pytest.raises(ValueError):
        parse('sum(rate(mlrollouts_decisions_total{name="$name"}[$__rate_interval])')


@pytest.mark.parametrize("file", sorted(UIDS))
def test_dashboard_structure(file: str) -> None:
    board = dashboards()[file]
    assert board["uid"] == UIDS[file]
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {file}"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert {"datasource", "namespace", "name"} <= set(variables)
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    for p in panels(board):
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
    used = {m for _, e in exprs(board) for m in re.findall(r"\$(\w+)", e)}
    used |= {m for p in panels(board) for m in re.findall(r"\$(\w+)", p["title"])}
    assert used - BUILTIN_VARS <= set(variables), f"{file} uses undefined variables"
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"]["uid"] == "${datasource}"


def test_the_views_show_what_the_issue_asks() -> None:
    boards = dashboards()
    text = {f: json.dumps(b) for f, b in boards.items()}
    rollout, experiment = text["model-rollouts-rollout.json"], text["model-rollouts-experiment.json"]
    overview = text["model-rollouts-overview.json"]
    for name in ("mlrollouts_phase", "mlrollouts_decisions_total", "mlrollouts_reconcile_errors_total"):
        assert name in overview
    assert "mlrollouts_analysis_duration_seconds_bucket" in overview
    for board in (rollout, experiment):
        for name in ("mlrollouts_weight", "mlrollouts_comparison_ci_low", "mlrollouts_comparison_ci_high"):
            assert name in board
        assert '"custom.fillBelowTo", "value": "ciLow"' in board  # the band is drawn between the bounds
    assert "mlrollouts_srm_p_value" in experiment and "mlrollouts_variant_requests" in experiment


def test_alert_rules_are_complete() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = {r["alert"]: r for g in groups for r in g["rules"]}
    assert set(rules) == {
        "ModelRolloutRolledBack",
        "ModelRolloutReconcileErrors",
        "ModelRolloutProgressDeadlineExceeded",
        "ModelExperimentSampleRatioMismatch",
        "ModelRolloutsNoLeader",
    }
    for name, r in rules.items():
        assert r["labels"]["severity"] in ("warning", "critical"), name
        if name == "ModelRolloutsNoLeader":  # the operator's own state, not an object's
            assert "absent(mlrollouts_leader)" in r["expr"] and r["for"] == "2m"
            continue
        assert "$labels.name" in r["annotations"]["summary"], name
        # by object, so one alert per object whichever replica's series it comes from
        assert "by (kind, namespace, name)" in r["expr"], name


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    import re

    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_alert_has_a_runbook_in_the_readme() -> None:
    """Each rule's runbook_url names an anchor of README.md; the runbook names the alert."""
    readme = (DASHBOARDS.parent / "README.md").read_text()
    headings = {github_anchor(line.lstrip("#")): line for line in readme.splitlines() if line.startswith("#")}
    groups = yaml.safe_load(RULES.read_text())["groups"]
    for r in (r for g in groups for r in g["rules"]):
        url = r["annotations"]["runbook_url"]
        assert url.startswith("https://") and "/README.md#" in url, r["alert"]
        anchor = url.split("#", 1)[1]
        assert anchor in headings, f"{r['alert']}: no README heading for #{anchor}"
        assert r["alert"] in headings[anchor], headings[anchor]


# -- the exported estimates ------------------------------------------------------------------------


def scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    from prometheus_client import generate_latest

    out = {}
    for fam in text_string_to_metric_families(generate_latest(REGISTRY).decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(metric: str, /, **labels: str) -> float | None:
    return scrape().get((metric, frozenset(labels.items())))


def rollout_status(difference: float, with_srm: bool = False) -> dict[str, Any]:
    st = ModelRolloutStatus.model_validate(
        {
            "phase": "Progressing",
            "reconcileErrors": 2,
            "conditions": [
                {
                    "type": "Progressing",
                    "status": "False",
                    "reason": "ProgressDeadlineExceeded",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
            ],
            "lastAnalysis": [
                {
                    "name": "error-rate", "kind": "guardrail", "variant": "candidate", "outcome": "value",
                    "value": 0.01, "threshold": "<= 0.05", "verdict": "pass", "message": "ok",
                },
                {
                    "name": "ctr", "kind": "comparison", "variant": "candidate", "outcome": "value",
                    "value": difference, "verdict": "inconclusive", "message": "m",
                    "details": {
                        "stable": 0.5, "candidate": 0.5 + difference, "stableN": 400.0, "candidateN": 100.0,
                        "difference": difference, "ciLow": difference - 0.1, "pValue": 0.3,
                    },
                },
            ],
        }
    )  # fmt: skip
    return st.model_dump(mode="json")


def test_a_rollouts_analysis_is_exported_with_bounded_labels() -> None:
    spec = {"analysis": {"guardrails": [{"name": "error-rate", "query": "q", "max": 0.05}]}}
    obj = {"kind": "ModelRollout", "namespace": "t1", "name": "r1"}
    telemetry.record(**obj, status=rollout_status(0.02), spec=spec)
    arm = {**obj, "metric": "ctr"}
    assert value("mlrollouts_comparison_estimate", **arm, variant="stable") == 0.5
    assert value("mlrollouts_comparison_estimate", **arm, variant="candidate") == pytest.approx(0.52)
    assert value("mlrollouts_comparison_samples", **arm, variant="stable") == 400
    assert value("mlrollouts_comparison_difference", **arm, variant="candidate") == pytest.approx(0.02)
    assert value("mlrollouts_comparison_ci_low", **arm, variant="candidate") == pytest.approx(-0.08)
    # an unbounded end is not in status, so there is no series (not +Inf)
    assert value("mlrollouts_comparison_ci_high", **arm, variant="candidate") is None
    assert value("mlrollouts_guardrail_value", **obj, guardrail="error-rate", variant="candidate") == 0.01
    assert value("mlrollouts_guardrail_threshold", **obj, guardrail="error-rate", bound="max") == 0.05
    assert value("mlrollouts_guardrail_threshold", **obj, guardrail="error-rate", bound="min") is None
    assert value("mlrollouts_progress_deadline_exceeded", **obj) == 1
    assert value("mlrollouts_reconcile_errors_consecutive", **obj) == 2
    # the next analysis replaces the values; a comparison no longer measured leaves no series behind
    st = rollout_status(-0.01)
    st["lastAnalysis"] = st["lastAnalysis"][:1]
    st["conditions"] = []
    telemetry.record(**obj, status=st, spec=spec)
    assert value("mlrollouts_comparison_difference", **arm, variant="candidate") is None
    assert value("mlrollouts_progress_deadline_exceeded", **obj) == 0
    telemetry.WEIGHT.labels("ModelRollout", "t1", "r1", "candidate").set(20)
    telemetry.forget("ModelRollout", "t1", "r1")
    left = [k for k in scrape() if ("namespace", "t1") in k[1]]
    assert left == []


def test_an_experiments_variants_and_srm_are_exported() -> None:
    spec = {
        "variants": [{"name": "a", "service": "s-a", "control": True}, {"name": "b", "service": "s-b"}],
        "guardrails": [{"name": "latency", "query": "q", "min": 0.0, "max": 0.3}],
    }
    st = ModelExperimentStatus.model_validate(
        {
            "phase": "Paused",
            "srmPValue": 0.0004,
            "variants": [
                {"name": "a", "weight": 50, "requests": 1000},
                {"name": "b", "weight": 50, "requests": 2000},
            ],
            "conditions": [
                {"type": "SampleRatioMismatch", "status": "True", "reason": "SampleRatioMismatch",
                 "lastTransitionTime": "2026-01-01T00:00:00Z"},
            ],
            "lastAnalysis": [
                {"name": "latency", "kind": "guardrail", "variant": "b", "outcome": "value", "value": 0.2,
                 "verdict": "pass", "message": "m"},
                {"name": "conv", "kind": "comparison", "variant": "b", "outcome": "value", "value": 0.03,
                 "verdict": "inconclusive", "message": "m",
                 "details": {"control": 0.1, "variant": 0.13, "controlN": 500.0, "variantN": 480.0,
                             "difference": 0.03, "ciLow": -0.01, "ciHigh": 0.07, "pValue": 0.2}},
            ],
        }
    ).model_dump(mode="json")  # fmt: skip
    obj = {"kind": "ModelExperiment", "namespace": "t2", "name": "e1"}
    telemetry.record(**obj, status=st, spec=spec)
    arm = {**obj, "metric": "conv"}
    assert value("mlrollouts_comparison_estimate", **arm, variant="a") == 0.1  # the control by its name
    assert value("mlrollouts_comparison_estimate", **arm, variant="b") == 0.13
    assert value("mlrollouts_comparison_ci_high", **arm, variant="b") == 0.07
    assert value("mlrollouts_guardrail_threshold", **obj, guardrail="latency", bound="min") == 0.0
    assert value("mlrollouts_srm_p_value", **obj) == 0.0004
    assert value("mlrollouts_srm_mismatch", **obj) == 1
    assert value("mlrollouts_variant_requests", **obj, variant="b") == 2000
    assert value("mlrollouts_progress_deadline_exceeded", **obj) is None  # rollouts only
    telemetry.forget(**obj)
    assert not [k for k in scrape() if ("namespace", "t2") in k[1]]


def test_an_object_has_one_phase_series_and_a_finished_one_keeps_only_what_an_alert_reads() -> None:
    """Issue 18: per-object series are bounded; a finished object keeps its phase (the RolledBack
    alert), its deadline flag, weights and counters, and drops its analysis gauges."""
    spec = {"analysis": {"guardrails": [{"name": "error-rate", "query": "q", "max": 0.05}]}}
    obj = {"kind": "ModelRollout", "namespace": "t3", "name": "r3"}
    phases = ("Progressing", "Paused", "RolledBack", "Promoted")
    telemetry.set_phase(*obj.values(), "Progressing", phases)
    telemetry.set_phase(*obj.values(), "Paused", phases)
    mine = [k for k in scrape() if k[0] == "mlrollouts_phase" and ("namespace", "t3") in k[1]]
    assert mine == [("mlrollouts_phase", frozenset({**obj, "phase": "Paused"}.items()))]
    telemetry.record(**obj, status=rollout_status(0.02), spec=spec)
    telemetry.WEIGHT.labels(*obj.values(), "candidate").set(0)
    telemetry.DECISIONS.labels(*obj.values(), "RolledBack").inc()
    before = {k[0] for k in scrape() if ("namespace", "t3") in k[1]}
    assert "mlrollouts_comparison_estimate" in before and "mlrollouts_guardrail_value" in before
    telemetry.set_phase(*obj.values(), "RolledBack", phases)
    telemetry.record(**obj, status=rollout_status(0.02), spec=spec, finished=True)
    after = {k[0] for k in scrape() if ("namespace", "t3") in k[1]}
    assert after == {
        "mlrollouts_phase",
        "mlrollouts_weight",
        "mlrollouts_decisions_total",
        "mlrollouts_progress_deadline_exceeded",
    } | ({"mlrollouts_decisions_created"} & before)
    assert value("mlrollouts_phase", **obj, phase="RolledBack") == 1
    assert value("mlrollouts_progress_deadline_exceeded", **obj) == 1
    telemetry.forget(**obj)
    assert not [k for k in scrape() if ("namespace", "t3") in k[1]]
