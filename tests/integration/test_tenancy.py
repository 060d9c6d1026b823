"""A shared cluster on the real stack: no Secret or network reach through a tenant's object, nothing echoed.

Every test greps what a tenant and an operator's reader can see: the object's status, its Events
and the operator's log.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.harness.objects import CANDIDATE, CLUSTER_PROVIDERS, fraud_stack, fresh_fraud, phase, rollout
from tests.harness.stack import Stack
from tests.harness.tenancy import RecordingServer, cluster_provider

P = "modelrollouts"
OPERATOR_NS = "model-rollouts"  # where manifests/rbac.yaml puts the operator; provider Secrets live here


@pytest.fixture(scope="module")
def stack(real_components: None) -> Iterator[Stack]:
    with fraud_stack(max_seconds=1200) as s:
        yield s


@pytest.fixture()
def fresh(stack: Stack) -> Iterator[Stack]:
    yield from fresh_fraud(stack, P, cluster=[CLUSTER_PROVIDERS])


def secret(stack: Stack, namespace: str, name: str, value: str) -> None:
    core = client.CoreV1Api(stack.api)
    body = client.V1Secret(metadata=client.V1ObjectMeta(name=name), string_data={"token": value})
    try:
        core.create_namespaced_secret(namespace, body)
    except ApiException as e:
        if e.status != 409:
            raise
        core.replace_namespaced_secret(name, namespace, body)


def visible(stack: Stack, name: str) -> str:
    """Everything a reader sees about the object: status, Events and the whole operator log."""
    obj = stack.get(P, name)
    events = client.CoreV1Api(stack.api).list_namespaced_event(
        stack.namespace, field_selector=f"involvedObject.name={name}"
    )
    return "\n".join(
        [
            json.dumps(obj.get("status") or {}),
            *[f"{e.reason}: {e.message}" for e in events.items],
            stack.operator_log(),
        ]
    )


def provider_rollout(
    name: str, provider: str, steps: list[dict[str, Any]], **analysis: Any
) -> dict[str, Any]:
    doc = rollout(name, "http://unused.invalid", steps, analysis=analysis)
    del doc["spec"]["analysis"]["prometheus"]
    doc["spec"]["analysis"]["provider"] = provider
    return doc


def test_an_object_naming_a_server_and_a_secret_is_invalid_and_the_server_receives_nothing(
    fresh: Stack,
) -> None:
    server = RecordingServer(status=200, body="{}").start()
    value = f"tenant-secret-{uuid.uuid4().hex}"
    secret(fresh, fresh.namespace, "db-password", value)
    try:
        doc = rollout("exfil", server.url, [{"setWeight": 20}, {"setWeight": 100}])
        doc["spec"]["analysis"]["prometheus"]["bearerTokenSecret"] = {"name": "db-password", "key": "token"}
        fresh.apply(doc)
        obj = fresh.wait_for(P, "exfil", lambda o: phase(o) == "Invalid", 30)
        msg = obj["status"]["message"]
        assert "spec.analysis.prometheus.bearerTokenSecret" in msg, msg
        valid = next(c for c in obj["status"]["conditions"] if c["type"] == "Valid")
        assert valid["status"] == "False"
        # Without the Secret the address alone is not allowed either (not on the operator's allowlist).
        plain = rollout("reach", server.url, [{"setWeight": 20}, {"setWeight": 100}])
        fresh.apply(plain)
        obj = fresh.wait_for(P, "reach", lambda o: phase(o) == "Invalid", 30)
        assert "spec.analysis.prometheus.address" in obj["status"]["message"], obj["status"]["message"]
        time.sleep(6)  # a few ticks and re-checks
        assert server.requests == []
        assert fresh.route_weights()[CANDIDATE] == 0
        assert value not in visible(fresh, "exfil")
    finally:
        server.close()
        client.CoreV1Api(fresh.api).delete_namespaced_secret("db-password", fresh.namespace)


def test_an_internal_error_page_never_appears_in_status_events_or_the_log(fresh: Stack) -> None:
    marker = f"INTERNAL-{uuid.uuid4().hex}"
    server = RecordingServer(
        status=403, body=f"<html><h1>Forbidden</h1>admin console {marker}\nAuthorization: x</html>"
    ).start()
    try:
        fresh.apply(cluster_provider("internal", server.url))
        fresh.apply(provider_rollout("page", "internal", [{"setWeight": 20}, {"pause": {}}], errorLimit=2))
        obj = fresh.wait_for(P, "page", lambda o: phase(o) == "RolledBack", 60)
        assert server.requests, "the platform's provider was asked"
        errors = [m for m in obj["status"].get("lastAnalysis") or [] if m["outcome"] == "error"]
        assert errors and all("HTTP 403" in m["message"] for m in errors), obj["status"].get("lastAnalysis")
        seen = visible(fresh, "page")
        assert marker not in seen and "admin console" not in seen
        assert fresh.route_weights()[CANDIDATE] == 0
    finally:
        server.close()


def test_a_provider_credential_is_sent_only_to_its_provider_and_never_shown(fresh: Stack) -> None:
    assert fresh.prom is not None
    token = f"tok-{uuid.uuid4().hex}"
    # A Secret written by hand usually ends in a newline: one line plus the line break works.
    secret(fresh, OPERATOR_NS, "prom-credential", token + "\r\n")
    server = RecordingServer(upstream=fresh.prom.url).start()
    try:
        fresh.apply(cluster_provider("platform-prom", server.url, token_secret="prom-credential"))
        fresh.apply(provider_rollout("withtoken", "platform-prom", [{"setWeight": 20}, {"setWeight": 100}]))
        fresh.wait_for(P, "withtoken", lambda o: phase(o) == "Promoted", 120)
        assert server.requests
        assert {r.headers.get("Authorization") for r in server.requests} == {f"Bearer {token}"}
        assert token not in visible(fresh, "withtoken")
    finally:
        server.close()


def test_a_multi_line_credential_is_never_sent_nor_shown(fresh: Stack) -> None:
    lines = [f"line-{uuid.uuid4().hex}" for _ in range(3)]
    secret(
        fresh,
        OPERATOR_NS,
        "pem-credential",
        "-----BEGIN KEY-----\n" + "\n".join(lines) + "\n-----END KEY-----\n",
    )
    server = RecordingServer(status=200, body="{}").start()
    try:
        fresh.apply(cluster_provider("keyed", server.url, token_secret="pem-credential"))
        fresh.apply(provider_rollout("multiline", "keyed", [{"setWeight": 20}, {"setWeight": 100}]))
        obj = fresh.wait_for(P, "multiline", lambda o: phase(o) == "Invalid", 30)
        assert "spec.analysis.provider" in obj["status"]["message"]
        assert "not a single line" in obj["status"]["message"]
        time.sleep(3)
        assert server.requests == []
        seen = visible(fresh, "multiline")
        assert not any(line in seen for line in lines)
        assert fresh.route_weights()[CANDIDATE] == 0
    finally:
        server.close()


def test_a_missing_provider_is_named_and_nothing_moves(fresh: Stack) -> None:
    fresh.apply(provider_rollout("orphan", "no-such-provider", [{"setWeight": 20}]))
    obj = fresh.wait_for(P, "orphan", lambda o: phase(o) == "Invalid", 30)
    assert "spec.analysis.provider" in obj["status"]["message"]
    assert "no-such-provider not found" in obj["status"]["message"]
    assert fresh.route_weights()[CANDIDATE] == 0


BAD_ANALYSIS: list[tuple[str, dict[str, Any], str]] = [
    ("zero timeout", {"prometheus": {"address": "http://prom:9090", "timeout": "0s"}}, "timeout"),
    ("timeout over 30s", {"prometheus": {"address": "http://prom:9090", "timeout": "31s"}}, "timeout"),
    ("zero window", {"window": "0s"}, "window"),
    ("window over 24h", {"window": "25h"}, "window"),
    ("address without a host", {"prometheus": {"address": "http://:9090"}}, "address"),
    ("address with a user", {"prometheus": {"address": "http://user:pw@prom:9090"}}, "address"),
    ("address with a query", {"prometheus": {"address": "http://prom:9090/?x=1"}}, "address"),
    ("provider and prometheus", {"provider": "platform"}, "provider"),
]


def test_zero_or_unbounded_durations_and_hostless_addresses_are_rejected_on_apply(stack: Stack) -> None:
    co = client.CustomObjectsApi(stack.api)
    for label, patch, field in BAD_ANALYSIS:
        doc = rollout("bad-input", "http://prom:9090", [{"setWeight": 10}])
        doc["metadata"]["namespace"] = stack.namespace
        doc["spec"]["analysis"].update(patch)
        with pytest.raises(ApiException) as e:
            co.create_namespaced_custom_object("mlrollouts.io", "v1alpha1", stack.namespace, P, doc)
        assert e.value.status == 422, (label, e.value.body)
        assert field in e.value.body, (label, e.value.body)
    bad_provider = cluster_provider("zero", "http://prom:9090")
    bad_provider["spec"]["prometheus"]["timeout"] = "0s"
    with pytest.raises(ApiException) as e:
        co.create_cluster_custom_object("mlrollouts.io", "v1alpha1", "clustermetricproviders", bad_provider)
    assert e.value.status == 422 and "timeout" in e.value.body


RATIO = (
    'sum(rate(model_requests_total{namespace="{{ namespace }}",service="{{ service }}",'
    'code="{{ args.code }}"}[{{ args.window }}])) / '
    'sum(rate(model_requests_total{namespace="{{ namespace }}",service="{{ service }}"}[{{ args.window }}]))'
)


def metric_template(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "mlrollouts.io/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec}


def templated_rollout(
    name: str, prom: str, guardrail_ref: dict[str, Any], feedback_ref: dict[str, Any]
) -> dict[str, Any]:
    doc = rollout(name, prom, [{"setWeight": 20}, {"setWeight": 60}, {"setWeight": 100}])
    doc["spec"]["analysis"]["guardrails"] = [{"name": "errors", "templateRef": guardrail_ref, "max": 0.05}]
    doc["spec"]["analysis"]["comparisons"] = [
        {"name": "feedback", "templateRef": feedback_ref, "test": "nonInferiority", "margin": 0.15}
    ]
    return doc


@pytest.fixture()
def templates(fresh: Stack) -> Iterator[Stack]:
    fresh.apply(
        metric_template(
            "ClusterMetricTemplate",
            "status-ratio",
            {
                "description": "share of requests answered with one status code",
                "args": [
                    {"name": "code", "type": "number"},
                    {"name": "window", "type": "duration", "default": "10s"},
                ],
                "query": RATIO,
            },
        )
    )
    fresh.apply(
        metric_template(
            "MetricTemplate",
            "feedback",
            {
                "args": [{"name": "kind", "type": "string"}],
                "successes": "sum(increase(model_feedback_total"
                '{service="{{ service }}",feedback="{{ args.kind }}"}[{{ window }}]))',
                "trials": 'sum(increase(model_feedback_total{service="{{ service }}"}[{{ window }}]))',
            },
        )
    )
    yield fresh
    co = client.CustomObjectsApi(fresh.api)
    co.delete_cluster_custom_object("mlrollouts.io", "v1alpha1", "clustermetrictemplates", "status-ratio")
    co.delete_namespaced_custom_object(
        "mlrollouts.io", "v1alpha1", fresh.namespace, "metrictemplates", "feedback"
    )


def test_a_rollout_using_a_cluster_metric_template_with_args_is_promoted(templates: Stack) -> None:
    s = templates
    assert s.prom is not None
    doc = templated_rollout(
        "templated",
        s.prom.url,
        {"name": "status-ratio", "args": {"code": "500", "window": "10s"}},
        {"kind": "MetricTemplate", "name": "feedback", "args": {"kind": "positive"}},
    )
    s.apply(doc)
    obj = s.wait_for(P, "templated", lambda o: phase(o) == "Promoted", 120)
    values = {m["name"]: m for m in obj["status"].get("lastAnalysis") or []}
    assert values["errors"]["outcome"] == "value" and values["errors"]["verdict"] == "pass"
    assert values["feedback"]["outcome"] == "value", values["feedback"]


def test_the_template_is_what_is_measured_a_breach_through_it_rolls_back(templates: Stack) -> None:
    s = templates
    assert s.prom is not None
    s.servers[CANDIDATE].set(error_rate=0.5)
    doc = templated_rollout(
        "templated-bad",
        s.prom.url,
        {"name": "status-ratio", "args": {"code": "500"}},  # window from the arg's default
        {"kind": "MetricTemplate", "name": "feedback", "args": {"kind": "positive"}},
    )
    s.apply(doc)
    obj = s.wait_for(P, "templated-bad", lambda o: phase(o) == "RolledBack", 60)
    errors = next(m for m in obj["status"]["lastAnalysis"] if m["name"] == "errors")
    assert errors["verdict"] == "fail" and errors["value"] > 0.05


@pytest.mark.parametrize(
    "guardrail_ref,field,text",
    [
        (
            {"name": "no-such-template"},
            "spec.analysis.guardrails[0].templateRef",
            "no-such-template not found",
        ),
        (
            {"name": "status-ratio", "args": {"code": '500"} or vector(1) #'}},
            "guardrails[0].templateRef",
            "code",
        ),
        (
            {"name": "status-ratio", "args": {"window": "10s"}},
            "guardrails[0].templateRef",
            "arg code is required",
        ),
        (
            {"name": "status-ratio", "args": {"code": "500", "x": "1"}},
            "guardrails[0].templateRef",
            "unknown arg",
        ),
        (
            {"name": "feedback", "kind": "MetricTemplate", "args": {"kind": "x"}},
            "templateRef",
            "define query",
        ),
    ],
)
def test_a_bad_template_reference_is_named_in_valid_false(
    templates: Stack, guardrail_ref: dict[str, Any], field: str, text: str
) -> None:
    s = templates
    assert s.prom is not None
    # A new name each time: a same-named object re-created right after a deletion can wait for Kopf.
    name = f"badref-{uuid.uuid4().hex[:6]}"
    doc = templated_rollout(name, s.prom.url, guardrail_ref, {"kind": "MetricTemplate", "name": "feedback"})
    doc["spec"]["analysis"]["comparisons"][0]["templateRef"]["args"] = {"kind": "positive"}
    s.apply(doc)
    obj = s.wait_for(P, name, lambda o: phase(o) == "Invalid", 30)
    assert field in obj["status"]["message"] and text in obj["status"]["message"], obj["status"]["message"]
    assert s.route_weights()[CANDIDATE] == 0


def test_a_templates_only_provider_refuses_an_inline_query_and_serves_a_templated_one(
    templates: Stack,
) -> None:
    s = templates
    assert s.prom is not None
    s.apply(cluster_provider("strict", s.prom.url, allowInlineQueries=False))
    s.apply(provider_rollout("inline", "strict", [{"setWeight": 20}, {"setWeight": 100}]))
    obj = s.wait_for(P, "inline", lambda o: phase(o) == "Invalid", 30)
    assert "spec.analysis.guardrails[0].query" in obj["status"]["message"], obj["status"]["message"]
    assert "allows only queries from a ClusterMetricTemplate" in obj["status"]["message"]
    assert s.route_weights()[CANDIDATE] == 0
    co = client.CustomObjectsApi(s.api)
    co.delete_namespaced_custom_object("mlrollouts.io", "v1alpha1", s.namespace, P, "inline")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(
        o["metadata"]["name"] == "inline"
        for o in co.list_namespaced_custom_object("mlrollouts.io", "v1alpha1", s.namespace, P)["items"]
    ):
        time.sleep(0.5)
    # Only the platform's templates: a namespace's own MetricTemplate would be refused too.
    bound = '{namespace="{{ namespace }}",service="{{ service }}"'
    s.apply(
        metric_template(
            "ClusterMetricTemplate",
            "feedback-platform",
            {
                "args": [{"name": "kind", "type": "string"}],
                "successes": f'sum(increase(model_feedback_total{bound},feedback="{{{{ args.kind }}}}"}}'
                "[{{ window }}]))",
                "trials": f"sum(increase(model_feedback_total{bound}}}[{{{{ window }}}}]))",
            },
        )
    )
    doc = templated_rollout(
        "viatemplate",
        "http://unused.invalid",
        {"name": "status-ratio", "args": {"code": "500"}},
        {"name": "feedback-platform", "args": {"kind": "positive"}},
    )
    del doc["spec"]["analysis"]["prometheus"]
    doc["spec"]["analysis"]["provider"] = "strict"
    s.apply(doc)
    try:
        s.wait_for(P, "viatemplate", lambda o: phase(o) == "Promoted", 120)
    finally:
        co.delete_cluster_custom_object(
            "mlrollouts.io", "v1alpha1", "clustermetrictemplates", "feedback-platform"
        )
