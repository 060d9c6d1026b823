"""A tick reads its provider, template and credential from the operator's watches (issue 18), counted by
the real API server.

The API server logs (audit, Metadata level) every request for the mlrollouts.io kinds and for
Secrets. A rollout measures through a ClusterMetricProvider with a bearer-token Secret and a
ClusterMetricTemplate; once it runs, its ticks (cut at its status writes) send no GET (or LIST) of
ClusterMetricProviders, metric templates or Secrets: before, each tick GOT the provider and its
Secret and (every 5 s) the template. A change still takes effect at the next tick: a new token in
the Secret is the one sent next, and a deleted provider makes the object ``Valid=False`` naming
``spec.analysis.provider``.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.harness.cluster import ControlPlane
from tests.harness.objects import (
    CANDIDATE,
    CLUSTER_PROVIDERS,
    ROLLOUTS,
    ROUTE,
    STABLE,
    fresh_fraud,
    phase,
    weight,
)
from tests.harness.stack import Stack
from tests.harness.tenancy import RecordingServer, cluster_provider
from tests.integration.test_tenancy import OPERATOR_NS, RATIO, metric_template, provider_rollout, secret
from tests.integration.test_tenancy_bounds import OPERATOR_USER

AUDIT_RULES: list[dict[str, Any]] = [
    {"level": "Metadata", "resources": [{"group": "mlrollouts.io"}]},
    {"level": "Metadata", "resources": [{"group": "", "resources": ["secrets"]}]},
    {"level": "None"},
]
#: What a tick used to read: the provider, its Secret, the templates.
WATCHED = ("clustermetricproviders", "clustermetrictemplates", "metrictemplates", "secrets")
PROVIDER, TEMPLATE, TOKEN_SECRET, NAME = "watched-prom", "watched-ratio", "watched-token", "watched"


@pytest.fixture(scope="module")
def stack(real_components: None) -> Iterator[Stack]:
    with Stack(
        variants={STABLE: {"error_rate": 0.0}, CANDIDATE: {"error_rate": 0.0}},
        route=ROUTE,
        rps=50,
        max_seconds=600,
        cluster=ControlPlane(audit=True, audit_rules=AUDIT_RULES),
    ) as s:
        s.start_operator()
        yield s


@pytest.fixture()
def fresh(stack: Stack) -> Iterator[Stack]:
    yield from fresh_fraud(stack, ROLLOUTS, cluster=[CLUSTER_PROVIDERS])
    co = client.CustomObjectsApi(stack.api)
    with contextlib.suppress(ApiException):
        co.delete_cluster_custom_object("mlrollouts.io", "v1alpha1", "clustermetrictemplates", TEMPLATE)


def ticks(stack: Stack, since: int) -> list[Counter[str]]:
    """The operator's requests after audit event ``since``, cut at its status writes of the rollout:
    per tick, the requests for what a tick used to read, by ``verb resource`` (a tick still under way
    at the end is left out). Watches are not counted: they are the cache."""
    out: list[Counter[str]] = []
    tick: Counter[str] = Counter()
    for e in stack.cluster.audit_events()[since:]:
        if e.get("user", {}).get("username") != OPERATOR_USER:
            continue
        ref = e.get("objectRef") or {}
        if ref.get("resource") in WATCHED and e["verb"] in ("get", "list"):
            tick[f"{e['verb']} {ref['resource']}"] += 1
        elif (ref.get("resource"), ref.get("subresource"), ref.get("name")) == (
            ROLLOUTS,
            "status",
            NAME,
        ) and e["verb"] in ("patch", "update"):
            out.append(tick)
            tick = Counter()
    return out


def reads(stack: Stack, since: int, until: int) -> Counter[str]:
    """The operator's GETs and LISTs of what a tick used to read, in audit events [since, until)."""
    out: Counter[str] = Counter()
    for e in stack.cluster.audit_events()[since:until]:
        ref = e.get("objectRef") or {}
        ours = e.get("user", {}).get("username") == OPERATOR_USER
        if ours and ref.get("resource") in WATCHED and e["verb"] in ("get", "list"):
            out[f"{e['verb']} {ref['resource']}"] += 1
    return out


def wait_ticks(stack: Stack, since: int, n: int, timeout: float) -> list[Counter[str]]:
    deadline = time.monotonic() + timeout
    found = ticks(stack, since)
    while time.monotonic() < deadline and len(found) < n:
        time.sleep(1)
        found = ticks(stack, since)
    return found


def test_ticks_read_provider_template_and_secret_from_the_watch_and_see_their_changes(fresh: Stack) -> None:
    if fresh.cluster.audit_log is None:
        pytest.skip("the API server was started without an audit log")
    assert fresh.prom is not None
    since = len(fresh.cluster.audit_events())
    first, second = f"tok-{uuid.uuid4().hex}", f"tok-{uuid.uuid4().hex}"
    secret(fresh, OPERATOR_NS, TOKEN_SECRET, first)
    server = RecordingServer(upstream=fresh.prom.url).start()
    try:
        fresh.apply(cluster_provider(PROVIDER, server.url, token_secret=TOKEN_SECRET))
        fresh.apply(
            metric_template(
                "ClusterMetricTemplate",
                TEMPLATE,
                {
                    "args": [{"name": "code", "type": "number"}],
                    "query": RATIO.replace("{{ args.window }}", "10s"),
                },
            )
        )
        doc = provider_rollout(NAME, PROVIDER, [{"setWeight": 20}, {"pause": {}}])
        doc["spec"]["analysis"]["guardrails"] = [
            {"name": "errors", "templateRef": {"name": TEMPLATE, "args": {"code": "500"}}, "max": 0.05}
        ]
        doc["spec"]["analysis"].pop("comparisons", None)
        fresh.apply(doc)
        fresh.wait_for(
            ROLLOUTS, NAME, lambda o: weight(o) == 20 and bool(o["status"].get("lastAnalysis")), 90
        )

        # Running: several analyses (5 s apart), none of them reads a provider, template or Secret.
        start = len(fresh.cluster.audit_events())
        # The count can see such reads: the first look-up of the Secret (which the watch of the
        # operator's namespace keeps only once a provider asks for it) was one GET.
        begun = reads(fresh, since, start)
        assert begun["get secrets"] >= 1, begun
        found = wait_ticks(fresh, start, 5, 90)
        print(f"\n{len(found)} ticks after the start; requests per tick: {[dict(t) for t in found]}")
        assert len(found) >= 4, f"too few ticks to judge: {found}"
        assert not any(found), f"ticks that read what the watch holds: {found}"
        values = {m["name"]: m for m in fresh.get(ROLLOUTS, NAME)["status"]["lastAnalysis"]}
        assert values["errors"]["outcome"] == "value", values  # measured through the template
        assert {r.headers.get("Authorization") for r in server.requests} == {f"Bearer {first}"}

        # The Secret changes: the next analyses send the new token, still without reading the Secret.
        secret(fresh, OPERATOR_NS, TOKEN_SECRET, second)
        changed = len(server.requests)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
            r.headers.get("Authorization") == f"Bearer {second}" for r in server.requests[changed:]
        ):
            time.sleep(0.5)
        after = server.requests[changed:]
        assert any(r.headers.get("Authorization") == f"Bearer {second}" for r in after), after
        resent = [r for r in after if r.headers.get("Authorization") == f"Bearer {first}"]
        assert len(resent) <= 2, f"the old token was still sent {len(resent)} times after the change"
        found = ticks(fresh, start)
        assert not any(found), f"ticks that read what the watch holds: {found}"

        # The provider is deleted: the next tick says so, naming the field, and traffic stays.
        client.CustomObjectsApi(fresh.api).delete_cluster_custom_object(
            "mlrollouts.io", "v1alpha1", CLUSTER_PROVIDERS, PROVIDER
        )
        obj = fresh.wait_for(ROLLOUTS, NAME, lambda o: phase(o) == "Invalid", 30)
        valid = next(c for c in obj["status"]["conditions"] if c["type"] == "Valid")
        assert valid["status"] == "False"
        assert "spec.analysis.provider" in valid["message"] and f"{PROVIDER} not found" in valid["message"]
        assert fresh.route_weights()[CANDIDATE] == 20
    finally:
        server.close()
        client.CoreV1Api(fresh.api).delete_namespaced_secret(TOKEN_SECRET, OPERATOR_NS)
