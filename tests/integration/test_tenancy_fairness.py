"""One tenant cannot hurt another, on the real stack (one operator, one Prometheus, several namespaces).

- three tenants hammering the shared provider with 100 ms timeouts and slow queries do not cost a
  fourth team, on the same Prometheus through its ClusterMetricProvider, a single measurement;
- 40 objects whose queries take 4.5 s do not delay a rollback on another provider;
- a provider with ``allowInlineQueries: false`` refuses both bypasses (its address named inline, a
  tenant's MetricTemplate) with Valid=False naming the field, and nothing is asked or moved;
- the shipped platform template used with another team's Service reads nothing of it, and a platform
  template that does not bind the namespace is refused;
- an oversized query result is refused (a byte limit set low for this module).

Slow queries are made real by a loopback proxy in front of Prometheus that holds marked queries.
"""

from __future__ import annotations

import contextlib
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.harness.delayproxy import DelayProxy
from tests.harness.objects import CANDIDATE, STABLE, delete_all, guardrail, rollout
from tests.harness.stack import Stack, httproute
from tests.harness.tenancy import RecordingServer, cluster_provider

P = "modelrollouts"
G, V = "mlrollouts.io", "v1alpha1"
TENANTS = ("hasty-1", "hasty-2", "hasty-3")
OTHER = "team-b"
INTERVAL = 5.0
#: Set low for this module so that a real "many series" answer is over it.
MAX_BYTES = 8192
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stack(real_components: None) -> Iterator[Stack]:
    with Stack(
        variants={STABLE: {"error_rate": 0.0}, CANDIDATE: {"error_rate": 0.0}}, route="fraud", rps=30,
        max_seconds=1200,
    ) as s:  # fmt: skip
        core = client.CoreV1Api(s.api)
        for ns in (*TENANTS, OTHER):
            core.create_namespace(client.V1Namespace(metadata={"name": ns}))
        s.start_operator(
            [a for ns in (*TENANTS, OTHER) for a in ("--namespace", ns)]
            + ["--max-query-response-bytes", str(MAX_BYTES)]
        )
        yield s


@pytest.fixture()
def clean(stack: Stack) -> Iterator[Stack]:
    stack.servers[CANDIDATE].set(error_rate=0.0)
    stack.apply(httproute("fraud", stack.namespace, {STABLE: 100, CANDIDATE: 0}))
    yield stack
    co = client.CustomObjectsApi(stack.api)
    for ns in (*TENANTS, OTHER):
        for o in co.list_namespaced_custom_object(G, V, ns, P)["items"]:
            with contextlib.suppress(ApiException):
                co.delete_namespaced_custom_object(G, V, ns, P, o["metadata"]["name"])
    delete_all(
        stack, P, "metrictemplates", cluster=["clustermetricproviders", "clustermetrictemplates"],
        timeout=60, ignore_errors=True,
    )  # fmt: skip


def get(stack: Stack, ns: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = client.CustomObjectsApi(stack.api).get_namespaced_custom_object(G, V, ns, P, name)
    return obj


def st(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("status") or {}


def weights(stack: Stack, ns: str, route: str) -> dict[str, int]:
    r = client.CustomObjectsApi(stack.api).get_namespaced_custom_object(
        "gateway.networking.k8s.io", "v1", ns, "httproutes", route
    )
    return {b["name"]: b["weight"] for b in r["spec"]["rules"][0]["backendRefs"]}


def tenant_rollout(
    stack: Stack, ns: str, name: str, analysis: dict[str, Any], steps: list[dict[str, Any]] | None = None
) -> None:
    """A rollout in ``ns`` on its own route ``name`` (fraud-v1 at 100), with ``analysis`` merged in."""
    stack.apply(httproute(name, ns, {STABLE: 100, CANDIDATE: 0}))
    doc = rollout(name, "http://unused.invalid", steps or [{"setWeight": 10}, {"pause": {}}], compare=False)
    doc["metadata"]["namespace"] = ns
    doc["spec"]["trafficRouting"]["gatewayAPI"]["httpRoute"] = name
    a = doc["spec"]["analysis"]
    if "provider" in analysis:
        del a["prometheus"]
    a.update(analysis)
    stack.apply(doc)


def wait(stack: Stack, ns: str, name: str, ok: Any, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    obj = get(stack, ns, name)
    while not ok(obj):
        if time.monotonic() > deadline:
            log = "\n".join(stack.operator_log().splitlines()[-15:])
            raise AssertionError(f"{ns}/{name} not there in {timeout}s: {st(obj)}\noperator log:\n{log}")
        time.sleep(0.5)
        obj = get(stack, ns, name)
    return obj


def measurement_errors(stack: Stack, ns: str, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.operator_metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        mine = f'namespace="{ns}"' in line and f'name="{name}"' in line
        if line.startswith("mlrollouts_measurement_errors_total{") and mine:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_three_hasty_tenants_cost_a_fourth_team_on_the_same_prometheus_no_measurement(clean: Stack) -> None:
    s = clean
    assert s.prom is not None
    proxy = DelayProxy(s.prom.url, delays={"hasty_marker": 1.0}).start()
    try:
        # The platform's provider for everyone; the hasty tenants name its address inline, 100 ms timeout.
        provider = cluster_provider("shared", proxy.url)
        provider["spec"]["prometheus"]["timeout"] = "5s"
        s.apply(provider)
        slow = {"name": "slow", "query": 'sum(up{hasty_marker="1"})', "max": 1.0}
        for ns in TENANTS:
            for j in range(2):
                tenant_rollout(
                    s,
                    ns,
                    f"hammer-{j}",
                    {
                        "prometheus": {"address": proxy.url, "timeout": "100ms"},
                        "guardrails": [slow, {**slow, "name": "slow-2"}, {**slow, "name": "slow-3"}],
                        "errorLimit": 1000,
                        "onErrorLimit": "hold",
                    },
                )
        deadline = time.monotonic() + 60
        while proxy.delayed < 6 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert proxy.delayed >= 6, "the hasty tenants did not start asking"

        steps = [{"setWeight": 20}, {"setWeight": 50}, {"setWeight": 100}]
        doc = rollout("fourth", "http://unused.invalid", steps, compare=False)
        del doc["spec"]["analysis"]["prometheus"]
        doc["spec"]["analysis"].update(provider="shared", guardrails=[guardrail()])
        t0 = time.monotonic()
        s.apply(doc)
        seen: list[dict[str, Any]] = []
        deadline = t0 + 90
        obj = get(s, s.namespace, "fourth")
        while st(obj).get("phase") != "Promoted" and time.monotonic() < deadline:
            seen += st(obj).get("lastAnalysis") or []
            time.sleep(0.3)
            obj = get(s, s.namespace, "fourth")
        took = time.monotonic() - t0
        seen += st(obj).get("lastAnalysis") or []
        assert st(obj).get("phase") == "Promoted", st(obj)
        errors = [m for m in seen if m.get("outcome") == "error"]
        assert errors == [], errors
        assert measurement_errors(s, s.namespace, "fourth") == 0
        # The hasty tenants really were failing (their own budget) during all of it.
        hasty = [get(s, ns, f"hammer-{j}") for ns in TENANTS for j in range(2)]
        assert all(st(o).get("consecutiveErrors", 0) >= 1 for o in hasty), [st(o) for o in hasty]
        # On schedule: three steps of one 5 s analysis each, plus the shared CPU's noise.
        assert took <= 3 * INTERVAL + 20, took
        print(f"\nfourth team promoted in {took:.1f}s with 0 failed measurements; "
              f"{proxy.delayed} slow hasty queries")  # fmt: skip
    finally:
        proxy.close()


def test_forty_objects_with_slow_queries_do_not_delay_a_rollback_elsewhere(clean: Stack) -> None:
    s = clean
    assert s.prom is not None
    proxy = DelayProxy(s.prom.url, delays={"slow45": 4.5}).start()
    co = client.CustomObjectsApi(s.api)
    try:
        provider = cluster_provider("slowprom", proxy.url)
        provider["spec"]["prometheus"]["timeout"] = "10s"
        s.apply(provider)
        slow = {"name": "slow", "query": 'sum(up{slow45="1"})', "max": 1.0}
        for i in range(40):
            tenant_rollout(
                s,
                s.namespace,
                f"sl-{i}",
                {
                    "provider": "slowprom",
                    "guardrails": [{**slow, "name": f"slow-{k}"} for k in range(4)],
                    "errorLimit": 1000,
                    "onErrorLimit": "hold",
                    "noData": "hold",
                },
            )
        deadline = time.monotonic() + 90
        while proxy.delayed < 20 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert proxy.delayed >= 20, proxy.delayed

        s.servers[CANDIDATE].set(error_rate=0.5)
        s.apply(rollout("breach", s.prom.url, [{"setWeight": 20}, {"pause": {}}]))
        start = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            w = weights(s, s.namespace, "fraud").get(CANDIDATE, 0)
            if start is None and w > 0:
                start = time.monotonic()
            if start is not None and w == 0:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"not rolled back in 60 s: {st(get(s, s.namespace, 'breach'))}")
        took = time.monotonic() - start
        wait(s, s.namespace, "breach", lambda o: st(o).get("phase") == "RolledBack", 10)
        assert took <= INTERVAL + 2.0, f"traffic on the breaching candidate for {took:.1f}s"
        items = co.list_namespaced_custom_object(G, V, s.namespace, P)["items"]
        held = [st(o).get("phase") for o in items if o["metadata"]["name"].startswith("sl-")]
        assert len(held) == 40 and set(held) <= {"Progressing", "Paused"}, held
        print(f"\nrolled back {took:.1f}s after the breach began; 40 objects with 4.5 s queries "
              f"({proxy.delayed} asked, at most {proxy.max_inflight} in flight at the proxy)")  # fmt: skip
    finally:
        s.servers[CANDIDATE].set(error_rate=0.0)
        proxy.close()


def test_both_bypasses_of_a_templates_only_provider_are_refused(clean: Stack) -> None:
    s = clean
    assert s.prom is not None
    server = RecordingServer(upstream=s.prom.url).start()
    try:
        s.apply(cluster_provider("strict", server.url, allowInlineQueries=False))
        time.sleep(11)  # the operator's list of providers (for inline addresses) is reused for 10 s
        # (a) the provider's address named inline, with an inline query
        tenant_rollout(
            s,
            OTHER,
            "bypass-a",
            {"prometheus": {"address": server.url, "timeout": "2s"}, "guardrails": [guardrail()]},
            [{"setWeight": 10}, {"setWeight": 100}],
        )
        # (b) the provider by name, with a templateRef to the tenant's own MetricTemplate (any PromQL)
        s.apply(
            {
                "apiVersion": f"{G}/{V}",
                "kind": "MetricTemplate",
                "metadata": {"name": "anything", "namespace": OTHER},
                "spec": {"query": "sum(up)"},
            }
        )
        tenant_rollout(
            s,
            OTHER,
            "bypass-b",
            {
                "provider": "strict",
                "guardrails": [
                    {"name": "g", "templateRef": {"kind": "MetricTemplate", "name": "anything"}, "max": 1e9}
                ],
            },
            [{"setWeight": 10}, {"setWeight": 100}],
        )
        for name, field in (
            ("bypass-a", "spec.analysis.prometheus.address"),
            ("bypass-b", "spec.analysis.guardrails[0].templateRef"),
        ):
            obj = wait(s, OTHER, name, lambda o: st(o).get("phase") == "Invalid", 30)
            assert field in st(obj)["message"], st(obj)["message"]
            valid = next(c for c in st(obj)["conditions"] if c["type"] == "Valid")
            assert valid["status"] == "False" and field in valid["message"]
        time.sleep(3)
        for name in ("bypass-a", "bypass-b"):
            assert weights(s, OTHER, name) == {STABLE: 100, CANDIDATE: 0}
        assert server.requests == [], server.requests
    finally:
        server.close()
        client.CustomObjectsApi(s.api).delete_namespaced_custom_object(
            G, V, OTHER, "metrictemplates", "anything"
        )


def _shipped(kind: str) -> dict[str, Any]:
    docs = yaml.safe_load_all((REPO / "manifests" / "tenancy" / "examples.yaml").read_text())
    return next(d for d in docs if d and d["kind"] == kind)


def test_a_platform_template_used_with_another_teams_service_cannot_read_it(clean: Stack) -> None:
    s = clean
    assert s.prom is not None
    s.servers[CANDIDATE].set(error_rate=0.5)  # team ml's candidate: something worth reading
    s.apply(httproute("fraud", s.namespace, {STABLE: 50, CANDIDATE: 50}))  # and it serves traffic
    s.apply(_shipped("ClusterMetricTemplate"))
    leaky = {
        "apiVersion": f"{G}/{V}",
        "kind": "ClusterMetricTemplate",
        "metadata": {"name": "leaky"},
        "spec": {
            "args": [{"name": "code", "type": "number"}],
            "query": 'sum(rate(model_requests_total{service="{{ service }}",code="{{ args.code }}"}[10s]))',
        },
    }
    s.apply(leaky)
    # In ml itself the shipped template reads its own candidate.
    ref = {"name": "status-ratio", "args": {"code": "500", "window": "10s"}}
    tenant_rollout(
        s, s.namespace, "own", {"prometheus": {"address": s.prom.url, "timeout": "2s"},
                                "guardrails": [{"name": "errors", "templateRef": ref, "max": 0.05}]},
    )  # fmt: skip
    # team-b names ml's Services (fraud-v1, fraud-v2) in its own route and rollout.
    tenant_rollout(
        s, OTHER, "snoop", {"prometheus": {"address": s.prom.url, "timeout": "2s"},
                            "guardrails": [{"name": "errors", "templateRef": ref, "max": 1.0}]},
    )  # fmt: skip
    leaky_ref = {"name": "leaky", "args": {"code": "500"}}
    tenant_rollout(
        s, OTHER, "snoop-leaky", {"prometheus": {"address": s.prom.url, "timeout": "2s"},
                                  "guardrails": [{"name": "errors", "max": 1e9, "templateRef": leaky_ref}]},
    )  # fmt: skip
    own = wait(s, s.namespace, "own", lambda o: st(o).get("phase") == "RolledBack", 60)
    errors = next(m for m in st(own)["lastAnalysis"] if m["name"] == "errors")
    assert errors["outcome"] == "value" and errors["value"] > 0.05, errors
    snoop = wait(s, OTHER, "snoop", lambda o: bool(st(o).get("lastAnalysis")), 60)
    time.sleep(2 * INTERVAL)
    snoop = get(s, OTHER, "snoop")
    seen = [m for m in st(snoop)["lastAnalysis"] if m["name"] == "errors"]
    assert seen and all(m["outcome"] == "noData" and m.get("value") is None for m in seen), st(snoop)
    leaked = wait(s, OTHER, "snoop-leaky", lambda o: st(o).get("phase") == "Invalid", 30)
    msg = st(leaked)["message"]
    assert "spec.analysis.guardrails[0].templateRef" in msg and 'namespace="{{ namespace }}"' in msg, msg
    assert weights(s, OTHER, "snoop-leaky") == {STABLE: 100, CANDIDATE: 0}
    s.servers[CANDIDATE].set(error_rate=0.0)


def test_an_oversized_result_is_refused_and_the_rollout_holds(clean: Stack) -> None:
    s = clean
    assert s.prom is not None
    everything = s.prom.query('{__name__=~".+"}')
    assert len(everything) > 50, len(everything)  # many series: far over the module's 8 kB limit
    tenant_rollout(
        s,
        s.namespace,
        "huge",
        {
            "prometheus": {"address": s.prom.url, "timeout": "5s"},
            "guardrails": [{"name": "all", "query": '{__name__=~".+"}', "max": 1.0}],
            "errorLimit": 100,
        },
    )
    obj = wait(s, s.namespace, "huge", lambda o: bool(st(o).get("lastAnalysis")), 60)
    m = next(x for x in st(obj)["lastAnalysis"] if x["name"] == "all")
    assert m["outcome"] == "error" and f"larger than {MAX_BYTES} bytes" in m["message"], m
    assert re.search(r"aggregate the query to one series", m["message"])
    with pytest.raises(ApiException):  # nothing else was created by it
        get(s, s.namespace, "huge-other")
