"""A corpus of invalid and hostile ModelRollouts against the real API server and operator.

Each one is rejected by the API server (422, naming the field), or accepted and then given
Valid=False naming the field by the operator, which moves no traffic and contacts nothing.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.harness.objects import CANDIDATE, STABLE, fraud_stack, rollout
from tests.harness.stack import Stack, httproute
from tests.harness.tenancy import RecordingServer

P = "modelrollouts"
Doc = dict[str, Any]


def a(d: Doc) -> Doc:
    return d["spec"]["analysis"]


def g(d: Doc) -> Doc:
    return a(d)["guardrails"][0]


def c(d: Doc) -> Doc:
    return a(d)["comparisons"][0]


def prom(d: Doc) -> Doc:
    return a(d)["prometheus"]


def setter(get: Callable[[Doc], Doc], **values: Any) -> Callable[[Doc], None]:
    return lambda d: get(d).update(values)


def drop(get: Callable[[Doc], Doc], key: str) -> Callable[[Doc], None]:
    return lambda d: get(d).pop(key)


def spec(d: Doc) -> Doc:
    return d["spec"]


REF = {"name": "t"}

# (label, mutation, a fragment of the API server's answer)
REJECTED: list[tuple[str, Callable[[Doc], None], str]] = [
    ("no steps", setter(spec, steps=[]), "steps"),
    ("1000 steps", setter(spec, steps=[{"setWeight": 1}] * 1000), "steps"),
    ("step with two actions", setter(spec, steps=[{"setWeight": 1, "pause": {}}]), "steps"),
    ("weight 101", setter(spec, steps=[{"setWeight": 101}]), "setWeight"),
    ("weight -1", setter(spec, steps=[{"setWeight": -1}]), "setWeight"),
    ("duration in words", setter(spec, steps=[{"pause": {"duration": "5 minutes"}}]), "duration"),
    ("a 5000-char query", setter(g, query="x" * 5000), "query"),
    ("uppercase guardrail name", setter(g, name="Errors"), "name"),
    ("64-char guardrail name", setter(g, name="a" * 64), "name"),
    (
        "21 guardrails",
        lambda d: a(d).update(guardrails=[dict(g(d), name=f"g{i}") for i in range(21)]),
        "guardrails",
    ),
    ("duplicate guardrails", lambda d: a(d).update(guardrails=[g(d), g(d)]), "guardrails"),
    # A nonInferiority test at margin 0 can never pass for an equal candidate: no margin, no object.
    ("nonInferiority without a margin", drop(c, "margin"), "comparisons[0].margin"),
    ("nonInferiority at margin 0", setter(c, margin=0), "comparisons[0].margin"),
    (
        "11 comparisons",
        lambda d: a(d).update(comparisons=[dict(c(d), name=f"c{i}") for i in range(11)]),
        "comparisons",
    ),
    ("guardrail without bounds", drop(g, "max"), "guardrail"),
    ("guardrail min > max", setter(g, min=1.0, max=0.5), "guardrail"),
    ("guardrail query and templateRef", setter(g, templateRef=REF), "guardrail"),
    ("guardrail without a query", drop(g, "query"), "guardrail"),
    ("failureLimit 0", setter(g, failureLimit=0), "failureLimit"),
    ("proportion without trials", drop(c, "trials"), "proportion"),
    ("comparison queries and templateRef", setter(c, templateRef=REF), "templateRef"),
    (
        "templateRef of an unknown kind",
        lambda d: g(d).pop("query") and g(d).update(templateRef={"name": "t", "kind": "Secret"}),
        "kind",
    ),
    (
        "17 template args",
        lambda d: (
            g(d).pop("query")
            and g(d).update(templateRef={"name": "t", "args": {f"a{i}": "1" for i in range(17)}})
        ),
        "args",
    ),
    (
        "a 300-char template arg",
        lambda d: g(d).pop("query") and g(d).update(templateRef={"name": "t", "args": {"a": "x" * 300}}),
        "args",
    ),
    ("interval 1s", setter(a, interval="1s"), "interval"),
    ("window 0s", setter(a, window="0s"), "window"),
    ("window 25h", setter(a, window="25h"), "window"),
    ("window 0ms", setter(a, window="0ms"), "window"),
    ("timeout 0s", setter(prom, timeout="0s"), "timeout"),
    ("timeout 31s", setter(prom, timeout="31s"), "timeout"),
    ("timeout 24h", setter(prom, timeout="24h"), "timeout"),
    ("errorLimit 0", setter(a, errorLimit=0), "errorLimit"),
    ("ftp address", setter(prom, address="ftp://prom:21"), "address"),
    ("file address", setter(prom, address="file:///etc/passwd"), "address"),
    ("address without a host", setter(prom, address="http://:9090"), "address"),
    ("address with a user", setter(prom, address="http://admin:pw@prom:9090"), "address"),
    ("address with a query", setter(prom, address="http://prom:9090/?target=http://x"), "address"),
    ("address with a fragment", setter(prom, address="http://prom:9090/#x"), "address"),
    ("address with a space", setter(prom, address="http://prom :9090"), "address"),
    ("address with a newline", setter(prom, address="http://prom:9090\nHost: x"), "address"),
    ("3000-char address", setter(prom, address="http://p" + "a" * 3000), "address"),
    ("provider and prometheus", setter(a, provider="platform"), "provider"),
    ("neither provider nor prometheus", drop(a, "prometheus"), "provider"),
    ("uppercase provider", lambda d: a(d).pop("prometheus") and a(d).update(provider="Platform"), "provider"),
    ("bad Secret name", setter(prom, bearerTokenSecret={"name": "../etc"}), "bearerTokenSecret"),
    (
        "two routers",
        lambda d: spec(d)["trafficRouting"].update(istio={"virtualService": "v"}),
        "trafficRouting",
    ),
    ("no router", setter(spec, trafficRouting={}), "trafficRouting"),
    (
        "route name with a path",
        lambda d: spec(d)["trafficRouting"]["gatewayAPI"].update(httpRoute="../x"),
        "httpRoute",
    ),
    ("rule index 64", lambda d: spec(d)["trafficRouting"]["gatewayAPI"].update(ruleIndex=64), "ruleIndex"),
    ("200-char modelVersion", lambda d: spec(d)["candidate"].update(modelVersion="v" * 200), "modelVersion"),
    ("service with a dot-dot", lambda d: spec(d)["candidate"].update(service="a..b/c"), "service"),
]


# (label, mutation, what Valid=False names); the operator judges these; ``SERVER`` is replaced by a
# recording server's address, which must receive nothing.
INVALID: list[tuple[str, Callable[[Doc], None], str]] = [
    ("filter in a placeholder", setter(g, query='sum(x{s="{{ service|upper }}"})'), "guardrails[0].query"),
    (
        "attribute in a placeholder",
        setter(g, query='sum(x{s="{{ service.__class__ }}"})'),
        "guardrails[0].query",
    ),
    ("single braces", setter(g, query='sum(x{s="{service}"})'), "guardrails[0].query"),
    ("unknown placeholder", setter(g, query='sum(x{s="{{ secret }}"})'), "guardrails[0].query"),
    ("args outside a template", setter(c, successes='sum(x{s="{{ args.x }}"})'), "comparisons[0].successes"),
    ("stray braces", setter(c, trials="sum(x) }}"), "comparisons[0].trials"),
    ("Secret and address", setter(prom, bearerTokenSecret={"name": "db-password"}), "bearerTokenSecret"),
    ("address not allowed", lambda d: None, "prometheus.address"),
    (
        "missing provider",
        lambda d: a(d).pop("prometheus") and a(d).update(provider="nope"),
        "analysis.provider",
    ),
    (
        "missing template",
        lambda d: g(d).pop("query") and g(d).update(templateRef={"name": "nope"}),
        "templateRef",
    ),
    (
        "missing namespaced template",
        lambda d: (
            c(d).update(templateRef={"name": "n", "kind": "MetricTemplate"})
            or [c(d).pop(k) for k in ("successes", "trials")]
        ),
        "comparisons[0].templateRef",
    ),
    ("unimplemented router", setter(spec, trafficRouting={"replicas": {"totalReplicas": 4}}), "replicas"),
]


@pytest.fixture(scope="module")
def stack(real_components: None) -> Iterator[Stack]:
    with fraud_stack(600, rps=5) as s:
        yield s


def test_fifty_hostile_manifests_are_rejected_or_invalid_and_never_acted_on(stack: Stack) -> None:
    assert len(REJECTED) + len(INVALID) >= 50
    co = client.CustomObjectsApi(stack.api)
    server = RecordingServer(status=200, body="{}").start()
    base = rollout("hostile", server.url, [{"setWeight": 50}, {"setWeight": 100}])
    base["metadata"]["namespace"] = stack.namespace
    accepted = []
    try:
        for label, mutate, field in REJECTED:
            doc = copy.deepcopy(base)
            mutate(doc)
            with pytest.raises(ApiException) as e:
                co.create_namespaced_custom_object("mlrollouts.io", "v1alpha1", stack.namespace, P, doc)
            assert e.value.status == 422, (label, e.value.status)
            assert field in e.value.body, (label, e.value.body[:500])
        for i, (label, mutate, field) in enumerate(INVALID):
            route = f"hostile-{i}"
            stack.apply(httproute(route, stack.namespace, {STABLE: 100, CANDIDATE: 0}))
            doc = copy.deepcopy(base)
            doc["metadata"]["name"] = route
            doc["spec"]["trafficRouting"]["gatewayAPI"]["httpRoute"] = route
            mutate(doc)
            co.create_namespaced_custom_object("mlrollouts.io", "v1alpha1", stack.namespace, P, doc)
            accepted.append((route, label, field))
        deadline = time.monotonic() + 60
        pending = list(accepted)
        while pending and time.monotonic() < deadline:
            time.sleep(1)
            pending = [
                x for x in pending if (stack.get(P, x[0]).get("status") or {}).get("phase") != "Invalid"
            ]
        assert pending == [], pending
        for route, label, field in accepted:
            status = stack.get(P, route)["status"]
            assert field in status["message"], (label, status["message"])
            valid = next(x for x in status["conditions"] if x["type"] == "Valid")
            assert valid["status"] == "False", label
            backends = co.get_namespaced_custom_object(
                "gateway.networking.k8s.io", "v1", stack.namespace, "httproutes", route
            )["spec"]["rules"][0]["backendRefs"]
            assert {b["name"]: b["weight"] for b in backends} == {STABLE: 100, CANDIDATE: 0}, label
        assert server.requests == []
    finally:
        server.close()


def test_the_tenancy_examples_are_accepted_by_the_api_server(stack: Stack) -> None:
    from pathlib import Path

    import yaml

    path = Path(__file__).resolve().parents[2] / "manifests" / "tenancy" / "examples.yaml"
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    stack.apply(httproute("fraud-scorer", stack.namespace, {"fraud-scorer-v1": 100, "fraud-scorer-v2": 0}))
    for d in docs:
        stack.apply(d)  # raises on a 422
    # Its provider's Secret is not there (only the operator's namespace is looked in): named, nothing moves.
    obj = stack.wait_for(P, "fraud-scorer", lambda o: (o.get("status") or {}).get("phase") == "Invalid", 30)
    assert "spec.analysis.provider" in obj["status"]["message"]
    assert "Secret cannot be read (HTTP 404)" in obj["status"]["message"], obj["status"]["message"]
