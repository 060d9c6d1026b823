"""``kubectl mlrollouts lint``: offline, each finding names its field, non-zero exit on an error.

The corpora are the ones the real API server and operator are tested with
(tests/integration/test_tenancy_hostile.py): every manifest the API server rejects, lint rejects
naming the same field; the operator's own refusals that need no cluster are found too.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from model_rollouts.cli import lint
from model_rollouts.cli.app import cli
from tests.integration.test_rollout import rollout
from tests.integration.test_tenancy_hostile import INVALID, REJECTED

REPO = Path(__file__).resolve().parents[2]
CRDS = lint.load_crds()
BASE = rollout("hostile", "http://prom.monitoring:9090", [{"setWeight": 50}, {"setWeight": 100}])


def findings(doc: Any) -> list[lint.Finding]:
    return [f for f in lint.lint_document(doc, CRDS, "t.yaml", 0) if f.severity == "error"]


def experiment(**over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "variants": [
            {"name": "control", "service": "a", "control": True},
            {"name": "b", "service": "b"},
        ],
        "trafficRouting": {"gatewayAPI": {"httpRoute": "r"}},
        "primaryMetric": {"name": "ctr", "successes": "s", "trials": "t"},
        "successCriteria": {"minimumDetectableEffect": 0.02},
        "analysis": {"prometheus": {"address": "http://prom:9090"}},
    }
    spec.update(over)
    return {
        "apiVersion": "mlrollouts.io/v1alpha1",
        "kind": "ModelExperiment",
        "metadata": {"name": "e"},
        "spec": spec,
    }


def test_the_base_manifest_and_the_shipped_examples_are_clean() -> None:
    assert findings(BASE) == []
    for path in [
        *sorted((REPO / "manifests/examples").glob("*.yaml")),
        *sorted((REPO / "manifests/tenancy").glob("*.yaml")),
    ]:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                assert [f for f in findings(doc) if f.severity == "error"] == [], (path, i)


@pytest.mark.parametrize(("label", "mutate", "fragment"), REJECTED, ids=[r[0] for r in REJECTED])
def test_what_the_api_server_rejects_lint_rejects_naming_the_field(
    label: str, mutate: Any, fragment: str
) -> None:
    doc = copy.deepcopy(BASE)
    mutate(doc)
    found = findings(doc)
    assert found, f"{label}: lint found nothing"
    assert any(fragment in f.field or fragment in f.message for f in found), [f.text() for f in found]
    assert all(f.field.startswith("spec") for f in found), [f.text() for f in found]


OFFLINE = [r for r in INVALID if r[0] not in ("address not allowed", "missing provider", "missing template",
                                               "missing namespaced template")]  # fmt: skip


@pytest.mark.parametrize(("label", "mutate", "field"), OFFLINE, ids=[r[0] for r in OFFLINE])
def test_what_the_operator_refuses_without_a_cluster_lint_refuses(
    label: str, mutate: Any, field: str
) -> None:
    doc = copy.deepcopy(BASE)
    mutate(doc)
    found = findings(doc)
    assert [f.check for f in found] == ["operator"], [f.text() for f in found]
    assert field in found[0].field


def test_what_needs_the_cluster_is_left_to_the_operator() -> None:
    doc = copy.deepcopy(BASE)
    doc["spec"]["analysis"]["guardrails"][0].pop("query")
    doc["spec"]["analysis"]["guardrails"][0]["templateRef"] = {"name": "not-checked-offline"}
    assert findings(doc) == []


def test_cel_rules_run_with_the_schema_defaults_and_kubernetes_list_sum() -> None:
    ok = experiment(variants=[
        {"name": "control", "service": "a", "control": True, "weight": 70},
        {"name": "b", "service": "b", "weight": 30},
    ])  # fmt: skip
    assert findings(ok) == []
    bad = copy.deepcopy(ok)
    bad["spec"]["variants"][1]["weight"] = 20
    assert [(f.field, f.check) for f in findings(bad)] == [("spec.variants", "cel")]
    assert "sum to 100" in findings(bad)[0].message
    # primaryMetric.type defaults to proportion, so the MDE rule applies although type is not written
    mde = experiment(successCriteria={"minimumDetectableEffect": 1.5})
    assert [(f.field, f.check) for f in findings(mde)] == [
        ("spec.successCriteria.minimumDetectableEffect", "cel")
    ]


def test_the_operator_s_experiment_checks() -> None:
    doc = experiment(guardrails=[{"name": "g", "query": "sum(x{s='{{ service }}'})", "max": 1}])
    doc["spec"]["primaryMetric"]["successes"] = "sum(x{v='{{ variant.name }}'})"
    found = findings(doc)
    assert [(f.field, f.check) for f in found] == [("spec.primaryMetric.successes", "operator")]


def test_unknown_fields_and_kinds_and_names() -> None:
    doc = copy.deepcopy(BASE)
    doc["spec"]["analysis"]["intervall"] = "10s"
    assert [(f.field, f.check) for f in findings(doc)] == [("spec.analysis.intervall", "model")]
    doc = copy.deepcopy(BASE)
    doc["metadata"]["name"] = "Bad_Name"
    assert [f.field for f in findings(doc)] == ["metadata.name"]
    doc = copy.deepcopy(BASE)
    doc["kind"] = "ModelRolout"
    assert [f.field for f in findings(doc)] == ["kind"]
    other = lint.lint_document(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}, CRDS, "t", 0
    )
    assert [f.severity for f in other] == ["info"]
    missing = copy.deepcopy(BASE)
    del missing["spec"]["stable"]
    assert any(
        f.field == "spec" and "'stable' is a required property" in f.message for f in findings(missing)
    )


def test_command_multi_document_stdin_json_and_exit_codes(tmp_path: Path) -> None:
    bad = copy.deepcopy(BASE)
    bad["metadata"]["name"] = "bad"
    bad["spec"]["steps"] = [{"setWeight": 10, "pause": {}}]
    text = yaml.safe_dump_all([BASE, bad])
    runner = CliRunner()
    res = runner.invoke(cli, ["lint", "-f", "-", "-o", "json"], input=text)
    assert res.exit_code == 1
    out = json.loads(res.output)
    assert out["errors"] == 1
    assert [(f["document"], f["name"], f["field"]) for f in out["findings"]] == [(1, "bad", "spec.steps[0]")]
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(BASE))
    res = runner.invoke(cli, ["lint", "-f", str(good)])
    assert res.exit_code == 0 and "valid" in res.output
    res = runner.invoke(cli, ["lint", "-f", str(tmp_path)])  # a directory of manifests
    assert res.exit_code == 0
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: ModelRollout\nspec: [unclosed\n")
    res = runner.invoke(cli, ["lint", "-f", str(broken), "-o", "yaml"])
    assert res.exit_code == 1
    (finding,) = yaml.safe_load(res.output)["findings"]
    assert finding["check"] == "yaml" and finding["field"].startswith("line ")


def test_crd_files_can_replace_the_built_in_ones() -> None:
    files = sorted((REPO / "crds").glob("*.yaml")) + sorted((REPO / "crds/tenancy").glob("*.yaml"))
    from_files = lint.load_crds(files)
    assert {"ModelRollout", "ModelExperiment"} <= set(from_files)
    assert from_files["ModelRollout"] == CRDS["ModelRollout"]


def test_a_platform_template_that_does_not_bind_the_namespace_is_refused() -> None:
    def cluster_template(query: str) -> dict[str, Any]:
        return {
            "apiVersion": "mlrollouts.io/v1alpha1",
            "kind": "ClusterMetricTemplate",
            "metadata": {"name": "t"},
            "spec": {"query": query},
        }

    leaky = findings(cluster_template('sum(rate(x{service="{{ service }}"}[1m]))'))
    assert [(f.field, f.check) for f in leaky] == [("spec.query", "operator")], [f.text() for f in leaky]
    assert 'namespace="{{ namespace }}"' in leaky[0].message
    assert (
        findings(cluster_template('sum(rate(x{namespace="{{ namespace }}",service="{{ service }}"}[1m]))'))
        == []
    )


def test_an_istio_routed_spec_is_clean_offline() -> None:
    doc = copy.deepcopy(BASE)
    doc["spec"]["trafficRouting"] = {"istio": {"virtualService": "fraud", "routeName": "primary"}}
    assert findings(doc) == []
    assert findings(experiment(trafficRouting={"istio": {"virtualService": "recsys"}})) == []
    doc["spec"]["trafficRouting"] = {"istio": {"routeName": "primary"}}  # the VirtualService is required
    assert any("virtualService" in f.field or "virtualService" in f.message for f in findings(doc))
