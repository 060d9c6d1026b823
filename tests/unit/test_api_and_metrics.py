"""API models, generated CRDs, query templates and the Prometheus result interpretation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from model_rollouts.api import crdgen
from model_rollouts.api.common import format_duration, parse_duration
from model_rollouts.api.rollout import ModelRolloutSpec
from model_rollouts.metrics.prometheus import interpret
from model_rollouts.metrics.provider import TemplateError, check_template, render
from tests.harness.procs import REPO


def test_crds_in_repo_are_generated_from_the_models() -> None:
    assert crdgen.main(["--out", str(REPO / "crds"), "--check"]) == 0, "crds/ is stale: run `make crds`"


def test_crd_schema_is_structural_and_carries_cel_rules() -> None:
    doc = crdgen.all_crds()["modelrollouts.yaml"]
    version = doc["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert doc["spec"]["names"]["shortNames"] == ["mro"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    text = str(spec)
    assert "$ref" not in text and "anyOf" not in text
    assert spec["properties"]["steps"]["minItems"] == 1
    assert any(
        "duration(self.interval)" in r["rule"]
        for r in spec["properties"]["analysis"]["x-kubernetes-validations"]
    )
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase",
        "Step",
        "Weight",
        "Age",
        "Message",
    ]
    assert crdgen.all_crds()["modelexperiments.yaml"]["spec"]["names"]["shortNames"] == ["mexp"]


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("5m", 300), ("1h30m", 5400), ("500ms", 0.5)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_bad_duration_is_rejected_by_the_model_naming_the_field() -> None:
    with pytest.raises(ValidationError) as e:
        ModelRolloutSpec.model_validate(
            {
                "stable": {"service": "a"},
                "candidate": {"service": "b"},
                "trafficRouting": {"gatewayAPI": {"httpRoute": "r"}},
                "steps": [{"pause": {"duration": "soon"}}],
                "analysis": {"prometheus": {"address": "http://p"}},
            }
        )
    assert "steps.0.pause.duration" in str(e.value)
    assert format_duration(12.4) == "12s" and format_duration(0) == "1s"


def test_render_fills_placeholders_and_refuses_injection() -> None:
    q = 'rate(x{service="{{ service }}",ns="{{namespace}}"}[{{ window }}])'
    assert (
        render(q, {"service": "fraud-v2", "namespace": "ml", "window": "30s"})
        == 'rate(x{service="fraud-v2",ns="ml"}[30s])'
    )
    with pytest.raises(TemplateError, match="unsafe"):
        render(q, {"service": 'x"} or vector(1) #', "namespace": "ml", "window": "30s"})
    with pytest.raises(TemplateError, match="unknown placeholder"):
        check_template("up{job='{{ job }}'}")


@pytest.mark.parametrize(
    ("data", "outcome", "value"),
    [
        ([{"metric": {}, "value": [1, "0.25"]}], "value", 0.25),
        ([], "noData", None),
        ([{"metric": {}, "value": [1, "NaN"]}], "nan", None),
        ([{"metric": {}, "value": [1, "+Inf"]}], "nan", None),
        (
            [{"metric": {"a": "1"}, "value": [1, "1"]}, {"metric": {"a": "2"}, "value": [1, "2"]}],
            "error",
            None,
        ),
        ([1.0, "3"], "value", 3.0),
        ("garbage", "error", None),
    ],
)
def test_prometheus_outcomes_are_distinct(data: object, outcome: str, value: float | None) -> None:
    r = interpret(data)
    assert r.outcome == outcome and r.value == value
    assert r.ok == (outcome == "value")


def test_unreachable_prometheus_is_an_error_not_no_data() -> None:
    from model_rollouts.metrics.prometheus import PrometheusProvider
    from tests.harness.procs import free_port

    r = PrometheusProvider(f"http://127.0.0.1:{free_port()}", timeout_s=1).query("up")
    assert r.outcome == "error" and not r.ok and "Connection" in r.message


def test_bearer_token_and_query_reach_the_prometheus_api() -> None:
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import parse_qs, urlsplit

    from model_rollouts.metrics.prometheus import PrometheusProvider

    seen: dict[str, str] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen["auth"] = self.headers.get("Authorization", "")
            seen["query"] = parse_qs(urlsplit(self.path).query)["query"][0]
            body = json.dumps(
                {
                    "status": "success",
                    "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1, "0.5"]}]},
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        p = PrometheusProvider(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=2, token="s3cret")
        r = p.query("sum(up)")
    finally:
        server.shutdown()
    assert r.outcome == "value" and r.value == 0.5
    assert seen == {"auth": "Bearer s3cret", "query": "sum(up)"}


def _with_comparison(comparison: dict[str, object]) -> dict[str, object]:
    return {
        "stable": {"service": "a"},
        "candidate": {"service": "b"},
        "trafficRouting": {"gatewayAPI": {"httpRoute": "r"}},
        "steps": [{"setWeight": 50}],
        "analysis": {
            "provider": "p",
            "comparisons": [{"name": "fb", "successes": "s", "trials": "t", **comparison}],
        },
    }


@pytest.mark.parametrize("comparison", [{}, {"margin": 0}, {"test": "nonInferiority", "margin": 0.0}])
def test_non_inferiority_without_a_positive_margin_is_refused_naming_the_field(
    comparison: dict[str, object],
) -> None:
    # At margin 0 a candidate equal to stable can never show non-inferiority: the default test would
    # hold every healthy rollout until its deadline. No default margin fits every metric's scale.
    with pytest.raises(ValidationError) as e:
        ModelRolloutSpec.model_validate(_with_comparison(comparison))
    assert "analysis.comparisons.0.margin" in str(e.value) and "must be > 0" in str(e.value)
    root = crdgen.all_crds()["modelrollouts.yaml"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    item = root["properties"]["spec"]["properties"]["analysis"]["properties"]["comparisons"]["items"]
    rule = next(r for r in item["x-kubernetes-validations"] if r.get("fieldPath") == ".margin")
    assert "nonInferiority" in rule["rule"]
    assert "default" not in item["properties"]["margin"]


def test_a_superiority_comparison_needs_no_margin() -> None:
    spec = ModelRolloutSpec.model_validate(_with_comparison({"test": "superiority"}))
    assert spec.analysis.comparisons[0].margin is None
    ok = ModelRolloutSpec.model_validate(_with_comparison({"margin": 0.01}))
    assert ok.analysis.comparisons[0].margin == 0.01
