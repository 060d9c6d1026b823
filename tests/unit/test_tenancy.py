"""Tenancy rules that need no cluster: templates, the address allowlist, what a provider may echo."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from model_rollouts import policy
from model_rollouts.api.common import AnalysisBase, PrometheusConfig
from model_rollouts.api.provider import ClusterMetricProviderSpec
from model_rollouts.handlers.common import safe_error
from model_rollouts.metrics.prometheus import PrometheusProvider
from model_rollouts.metrics.provider import TemplateError, check_template, render
from tests.harness import queries
from tests.harness.tenancy import RecordingServer

VALUES = {
    "variant": "candidate",
    "service": "fraud-v2",
    "namespace": "ml",
    "deployment": "d",
    "window": "30s",
}


@pytest.mark.parametrize(
    "template",
    [
        'sum(x{service="{{ service|upper }}"})',
        'sum(x{service="{{ service.__class__ }}"})',
        'sum(x{service="{service}"})',
        'sum(x{service="{{service}"})',
        'sum(x{service="{{ service }}}}"})',
        "sum(x) }}",
        "{{ }}",
        '{{ "a" }}',
        'sum(x{service="{{ unknown }}"})',
        'sum(x{service="{{ args.name }}"})',  # args exist only inside a metric template
        "sum(rate(x[{ window }]))",
    ],
)
def test_anything_but_an_exact_known_placeholder_is_refused(template: str) -> None:
    with pytest.raises(TemplateError):
        check_template(template)
    with pytest.raises(TemplateError):
        render(template, VALUES)


def test_the_queries_users_write_still_render() -> None:
    for name in ("ERROR_RATE", "P95_LATENCY", "DRIFT", "POSITIVE", "FEEDBACK", "REQUESTS"):
        q = getattr(queries, name)
        check_template(q)
        out = render(q, VALUES)
        assert "{{" not in out and "fraud-v2" in out
    assert render('x{a=~"b{2}"}', VALUES) == 'x{a=~"b{2}"}'  # PromQL's own braces are fine
    assert render("{{ args.n }}", {"args.n": "5m"}, extra=("args.n",)) == "5m"


@pytest.mark.parametrize("field,value", [("timeout", "0s"), ("timeout", "31s"), ("timeout", "0ms")])
def test_timeouts_must_be_positive_and_at_most_30s(field: str, value: str) -> None:
    with pytest.raises(ValidationError):
        PrometheusConfig.model_validate({"address": "http://prom:9090", field: value})
    with pytest.raises(ValidationError):
        ClusterMetricProviderSpec.model_validate(
            {"prometheus": {"address": "http://prom:9090", field: value}}
        )


@pytest.mark.parametrize("window", ["0s", "25h", "0ms"])
def test_windows_must_be_positive_and_at_most_24h(window: str) -> None:
    with pytest.raises(ValidationError):
        AnalysisBase.model_validate({"window": window, "provider": "p"})
    assert AnalysisBase.model_validate({"window": "24h", "provider": "p"}).window == "24h"


@pytest.mark.parametrize(
    "address",
    [
        "http://:9090",
        "http://",
        "http://user:pw@prom:9090",
        "http://prom:9090/?a=b",
        "ftp://prom",
        "http://prom#x",
    ],
)
def test_addresses_need_a_host_and_carry_no_user_query_or_fragment(address: str) -> None:
    with pytest.raises(ValidationError):
        PrometheusConfig.model_validate({"address": address})


@pytest.fixture()
def allow() -> Iterator[None]:
    old = (list(policy.POLICY.allowed), policy.POLICY.secret_namespace)
    policy.configure([re.escape("http://prom.monitoring:9090"), r"https://[a-z]+\.metrics\.example"], "ops")
    yield
    policy.POLICY.allowed, policy.POLICY.secret_namespace = old


def test_the_allowlist_matches_whole_addresses_only(allow: None) -> None:
    assert policy.address_allowed("http://prom.monitoring:9090", [])
    assert policy.address_allowed("http://prom.monitoring:9090/", [])
    assert policy.address_allowed("https://eu.metrics.example", [])
    assert not policy.address_allowed("http://prom.monitoring:9090.attacker.example", [])
    assert not policy.address_allowed("http://prom.monitoring:90901", [])
    assert not policy.address_allowed("https://eu.metrics.example.attacker.example", [])
    assert not policy.address_allowed("http://10.0.0.1:9090", [])
    assert policy.address_allowed("http://10.0.0.1:9090/", ["http://10.0.0.1:9090"])  # a provider's address


def test_by_default_only_provider_addresses_are_allowed() -> None:
    old = list(policy.POLICY.allowed)
    policy.configure([], "ops")
    try:
        assert not policy.address_allowed("http://prom.monitoring:9090", [])
        assert policy.address_allowed("http://prom.monitoring:9090", ["http://prom.monitoring:9090/"])
    finally:
        policy.POLICY.allowed = old


def test_an_error_page_is_reduced_to_its_http_status() -> None:
    marker = "INTERNAL-PAGE-7f3a"
    server = RecordingServer(status=403, body=f"<h1>Forbidden</h1>{marker} Authorization: Bearer x").start()
    try:
        r = PrometheusProvider(server.url, timeout_s=2).query("up")
    finally:
        server.close()
    assert r.outcome == "error"
    assert r.message == "query failed: PrometheusApiClientException (HTTP 403)"


def test_a_redirect_is_not_followed() -> None:
    target = RecordingServer(status=200, body="{}").start()
    hop = RecordingServer(status=302, body="", headers={"Location": target.url + "/api/v1/query?query=up"})
    hop.start()
    try:
        r = PrometheusProvider(hop.url, timeout_s=2, token="abc").query("up")
    finally:
        target.close()
        hop.close()
    assert hop.requests and not target.requests
    assert r.outcome == "error" and "TooManyRedirects" in r.message


def test_a_multi_line_credential_is_never_sent() -> None:
    server = RecordingServer(status=200, body="{}").start()
    try:
        p = PrometheusProvider(server.url, timeout_s=2, token="line-one\nline-two\n")
        r = p.query("up")
    finally:
        server.close()
    assert p.unusable and r.outcome == "error"
    assert "line-one" not in r.message and "line-two" not in r.message
    assert server.requests == []


def test_a_trailing_newline_is_not_part_of_the_token() -> None:
    server = RecordingServer(
        status=200, body='{"status":"success","data":{"resultType":"vector","result":[]}}'
    )
    server.start()
    try:
        r = PrometheusProvider(server.url, timeout_s=2, token="s3cret\r\n").query("up")
    finally:
        server.close()
    assert r.outcome == "noData"
    assert [q.headers.get("Authorization") for q in server.requests] == ["Bearer s3cret"]


def test_api_errors_are_described_without_their_body() -> None:
    e = ApiException(status=403, reason="Forbidden")
    e.body = '{"message": "secret-body-text"}'
    e.headers = {"Authorization": "Bearer leaked"}
    text = safe_error(e)
    assert "403" in text and "secret-body-text" not in text and "leaked" not in text


def test_a_blackholed_address_holds_one_query_at_a_time_and_fails_the_rest_at_once() -> None:
    import socket
    import threading
    import time

    from model_rollouts.metrics import prometheus

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    address = f"http://127.0.0.1:{hole.getsockname()[1]}"
    try:
        first = PrometheusProvider(address, timeout_s=1)
        failed = first.query("up").message  # waited out the timeout once
        assert failed in ("query failed: ReadTimeout", "query failed: ConnectionError"), failed
        results: list[tuple[float, str]] = []

        def ask() -> None:
            t0 = time.monotonic()
            r = PrometheusProvider(address, timeout_s=1).query("up")
            results.append((time.monotonic() - t0, r.message))

        threads = [threading.Thread(target=ask) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(took < 0.5 for took, _ in results), results  # cooling down: nobody waits
        assert all(f"provider unavailable ({failed.split(': ')[1]})" in m for _, m in results), results
        time.sleep(prometheus.COOLDOWN_SECONDS + 0.1)
        threads = [threading.Thread(target=ask) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        probes = [m for took, m in results[20:] if took >= 0.9]
        assert probes == [failed], results[20:]  # exactly one probe waited; the others failed at once
        assert all("one probe at a time" in m for took, m in results[20:] if took < 0.9), results[20:]
    finally:
        hole.close()


def test_a_healthy_address_serves_concurrent_queries() -> None:
    import threading

    body = '{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"2"]}]}}'
    server = RecordingServer(status=200, body=body).start()
    out: list[str] = []
    try:

        def ask() -> None:
            out.append(PrometheusProvider(server.url, timeout_s=2).query("up").outcome)

        threads = [threading.Thread(target=ask) for _ in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.close()
    assert out == ["value"] * 24


def _unbounded(node: object, path: str, out: list[str]) -> None:
    if not isinstance(node, dict):
        return
    t = node.get("type")
    if t == "string" and not ({"maxLength", "enum"} & node.keys()):
        out.append(path)
    if t == "array" and "maxItems" not in node:
        out.append(path)
    if t == "object" and "additionalProperties" in node and "maxProperties" not in node:
        out.append(path)
    for k, v in (node.get("properties") or {}).items():
        _unbounded(v, f"{path}.{k}", out)
    _unbounded(node.get("items"), f"{path}[]", out)
    _unbounded(node.get("additionalProperties"), f"{path}{{}}", out)


def test_every_list_string_and_map_a_user_writes_is_bounded() -> None:
    from model_rollouts.api import crdgen

    for name, crd in crdgen.all_crds().items():
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        out: list[str] = []
        _unbounded(schema, "spec", out)
        assert out == [], (name, out)


def test_a_provider_ca_bundle_verifies_the_server_and_nothing_else_does(tmp_path: Any) -> None:
    import shutil
    import ssl
    import subprocess

    from model_rollouts.metrics.resolve import _ca_file

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    key, crt = tmp_path / "key.pem", tmp_path / "crt.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(crt)],
        check=True, capture_output=True,
    )  # fmt: skip
    body = '{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"3"]}]}}'
    server = RecordingServer(status=200, body=body).start()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(crt, key)
    server._server.socket = ctx.wrap_socket(server._server.socket, server_side=True)
    url = server.url.replace("http://", "https://")
    try:
        trusted = PrometheusProvider(url, timeout_s=2, verify_tls=_ca_file(crt.read_text())).query("up")
        untrusted = PrometheusProvider(url, timeout_s=2).query("up")
    finally:
        server.close()
    assert trusted.outcome == "value" and trusted.value == 3.0
    assert untrusted.outcome == "error" and untrusted.message == "query failed: SSLError"


def test_an_analysis_stops_asking_once_its_budget_is_spent() -> None:
    import time

    from model_rollouts.metrics.provider import Budgeted, Result

    asked: list[str] = []

    class Slow:
        def query(self, promql: str) -> Result:
            asked.append(promql)
            time.sleep(0.3)
            return Result("value", 1.0)

    p = Budgeted(Slow(), 0.5)
    results = [p.query(f"q{i}") for i in range(10)]
    assert asked == ["q0", "q1"]
    assert [r.outcome for r in results] == ["value", "value"] + ["error"] * 8
    assert results[-1].message.startswith("query skipped: this analysis used its")


def test_the_tenancy_examples_are_valid_and_fill_their_templates() -> None:
    from pathlib import Path

    import yaml

    from model_rollouts.api.rollout import ModelRolloutSpec
    from model_rollouts.api.template import MetricTemplateSpec
    from model_rollouts.metrics.templates import check_platform_template, fill

    path = Path(__file__).resolve().parents[2] / "manifests" / "tenancy" / "examples.yaml"
    docs = {d["kind"]: d for d in yaml.safe_load_all(path.read_text()) if d}
    ClusterMetricProviderSpec.model_validate(docs["ClusterMetricProvider"]["spec"])
    rollout = ModelRolloutSpec.model_validate(docs["ModelRollout"]["spec"])
    cluster = MetricTemplateSpec.model_validate(docs["ClusterMetricTemplate"]["spec"])
    local = MetricTemplateSpec.model_validate(docs["MetricTemplate"]["spec"])
    g, c = rollout.analysis.guardrails[0], rollout.analysis.comparisons[0]
    assert g.templateRef is not None and c.templateRef is not None
    check_platform_template(cluster, "spec.analysis.guardrails[0].templateRef")  # binds the namespace
    q = fill(cluster, g.templateRef, ("query",))["query"]
    assert 'code="500"' in q and "[2m]" in q
    render(q, VALUES)
    counts = fill(local, c.templateRef, ("successes", "trials"))
    assert 'feedback="positive"' in counts["successes"]
    render(counts["trials"], VALUES)


def test_inline_query_fields_finds_every_inline_query_and_no_templated_one() -> None:
    from model_rollouts.api.experiment import ModelExperimentSpec
    from model_rollouts.api.provider import inline_query_fields
    from model_rollouts.api.rollout import ModelRolloutSpec

    ref = {"name": "t", "args": {}}
    rollout = ModelRolloutSpec.model_validate(
        {
            "stable": {"service": "a"},
            "candidate": {"service": "b"},
            "trafficRouting": {"gatewayAPI": {"httpRoute": "r"}},
            "steps": [{"setWeight": 50}],
            "analysis": {
                "provider": "p",
                "guardrails": [
                    {"name": "g0", "templateRef": ref, "max": 1},
                    {"name": "g1", "query": "up", "max": 1},
                ],
                "comparisons": [
                    {"name": "c0", "successes": "s", "trials": "t", "margin": 0.01},
                    {"name": "c1", "templateRef": ref, "margin": 0.01},
                ],
            },
        }
    )
    assert inline_query_fields(rollout, "spec") == [
        "spec.analysis.guardrails[1].query",
        "spec.analysis.comparisons[0].successes",
        "spec.analysis.comparisons[0].trials",
    ]
    rollout.analysis.guardrails.pop(1)
    rollout.analysis.comparisons.pop(0)
    assert inline_query_fields(rollout, "spec") == []
    experiment = ModelExperimentSpec.model_validate(
        {
            "variants": [{"name": "a", "service": "a", "control": True}, {"name": "b", "service": "b"}],
            "trafficRouting": {"gatewayAPI": {"httpRoute": "r"}},
            "primaryMetric": {"name": "ctr", "type": "proportion", "successes": "s", "trials": "t"},
            "guardrails": [{"name": "e", "templateRef": ref, "max": 1}],
            "successCriteria": {"minimumDetectableEffect": 0.05},
            "analysis": {"provider": "p"},
        }
    )
    assert inline_query_fields(experiment, "spec") == [
        "spec.primaryMetric.successes",
        "spec.primaryMetric.trials",
    ]


@pytest.mark.parametrize(
    ("value", "ok"),
    [("24h", True), ("1m", True), ("500ms", True), ("24h1s", False), ("9999h", False), ("0s", False)],
)
def test_a_duration_arg_is_a_window_and_bounded_like_one(value: str, ok: bool) -> None:
    from model_rollouts.api.common import TemplateRef
    from model_rollouts.api.template import MetricTemplateSpec
    from model_rollouts.metrics.templates import fill

    template = MetricTemplateSpec.model_validate(
        {"args": [{"name": "window", "type": "duration"}], "query": "sum(rate(x[{{ args.window }}]))"}
    )
    ref = TemplateRef.model_validate({"name": "t", "args": {"window": value}})
    if ok:
        assert fill(template, ref, ("query",))["query"] == f"sum(rate(x[{value}]))"
    else:
        with pytest.raises(TemplateError, match=r"arg window: .* at most 24h"):
            fill(template, ref, ("query",))
