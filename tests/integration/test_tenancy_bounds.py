"""One tenant cannot hurt another (issue 15, second half), on the real stack.

- a 150 kB action annotation leaves a status under 64 kB (and a bounded webhook body);
- 60 Invalid objects cause no LIST of ModelRollouts or ModelExperiments per tick, counted in the
  real API server's audit log (the one-owner check reads the operator's watch instead);
- a tenant naming a notification provider or gate that does not admit its namespace gets
  Valid=False naming the field, and a recording webhook server on loopback receives nothing.

One stack (API server with an audit log, Prometheus, model servers, operator) is shared by the module.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from kubernetes import client

from tests.harness.objects import (
    CANDIDATE,
    EXPERIMENTS,
    ROLLOUTS,
    STABLE,
    cond,
    experiment,
    fraud_stack,
    fresh_fraud,
    phase,
    rollout,
)
from tests.harness.stack import Stack, httproute

G, V = "mlrollouts.io", "v1alpha1"
PROVIDERS = "clusternotificationproviders"
OPERATOR_USER = "system:serviceaccount:model-rollouts:model-rollouts"
STATUS_LIMIT = 64 * 1024


class Recorder:
    """A loopback HTTP server that records each POST's path and body and answers 200."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, bytes]] = []
        rec = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                rec.posts.append((self.path, self.rfile.read(n)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def at(self, path: str) -> list[bytes]:
        return [b for p, b in list(self.posts) if p == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def provider(name: str, type_: str, address: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{G}/{V}",
        "kind": "ClusterNotificationProvider",
        "metadata": {"name": name},
        "spec": {"type": type_, "address": address, "timeout": "2s", **spec},
    }


@pytest.fixture(scope="module")
def sink() -> Iterator[Recorder]:
    r = Recorder()
    yield r
    r.close()


@pytest.fixture(scope="module")
def stack(real_components: None, sink: Recorder) -> Iterator[Stack]:
    args = ["--allowed-notification-address", re.escape(sink.url) + r"/[a-z-]+"]
    with fraud_stack(1500, operator_args=args, audit=True) as s:
        co = client.CustomObjectsApi(s.api)
        # The stack's namespace carries a label one provider selects by.
        client.CoreV1Api(s.api).patch_namespace(
            s.namespace, {"metadata": {"labels": {"tenancy-test": "yes"}}}
        )
        selector = {"matchLabels": {"tenancy-test": "yes"}}
        for doc in (
            provider("tb-own", "webhook", sink.url + "/own", allowedNamespaces=[s.namespace]),
            provider("tb-selected", "webhook", sink.url + "/selected", namespaceSelector=selector),
            provider("tb-other-chat", "slack", sink.url + "/other-chat", allowedNamespaces=["team-b"]),
            provider("tb-other-gate", "webhook", sink.url + "/other-gate", allowedNamespaces=["team-b"]),
            provider("tb-default", "webhook", sink.url + "/default"),  # neither field: the operator's only
        ):
            co.create_cluster_custom_object(G, V, PROVIDERS, doc)
        yield s


@pytest.fixture()
def fresh(stack: Stack) -> Iterator[Stack]:
    yield from fresh_fraud(stack, ROLLOUTS, EXPERIMENTS)


def prom(stack: Stack) -> str:
    assert stack.prom is not None
    return stack.prom.url


def wait(cond_: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond_():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


# -- bounded annotations ----------------------------------------------------------------------------
def test_a_150_kb_abort_annotation_leaves_a_status_under_64_kb(fresh: Stack, sink: Recorder) -> None:
    doc = rollout("huge", prom(fresh), [{"setWeight": 20}, {"pause": {}}], compare=False)
    doc["spec"]["notifications"] = [{"provider": "tb-own"}]
    fresh.apply(doc)
    fresh.wait_for(ROLLOUTS, "huge", lambda o: (o.get("status") or {}).get("weight") == 20, 60)
    value = "stop-" + "x" * 150_000
    fresh.annotate(ROLLOUTS, "huge", {"mlrollouts.io/abort": value})
    obj = fresh.wait_for(ROLLOUTS, "huge", lambda o: phase(o) == "Aborted", 60)
    fresh.wait_route({STABLE: 100, CANDIDATE: 0})
    size = len(json.dumps(obj["status"]).encode())
    parts = {k: len(json.dumps(v)) for k, v in obj["status"].items()}
    print(f"\nstatus after a {len(value)} B abort annotation: {size} B (902 kB before the bound): {parts}")
    assert size < STATUS_LIMIT, size
    handled = obj["status"]["handled"]["abort"]
    assert handled.startswith("stop-xxx") and "…[truncated " in handled and len(handled) == 256
    assert "…[truncated " in obj["status"]["message"]

    def aborted() -> list[dict[str, Any]]:
        out = [json.loads(b) for b in sink.at("/own")]
        return [b for b in out if b["object"]["name"] == "huge" and b["event"] == "Aborted"]

    wait(lambda: aborted(), 15, "the Aborted notification")
    body = next(b for p, b in list(sink.posts) if p == "/own" and b"Aborted" in b and b'"huge"' in b)
    print(f"webhook body of the Aborted notification: {len(body)} B (150 kB before)")
    assert len(body) < 4096 and "[truncated" in aborted()[0]["message"]
    events = client.CoreV1Api(fresh.api).list_namespaced_event(
        fresh.namespace, field_selector="involvedObject.name=huge"
    )
    assert all(len(e.message or "") <= 1024 for e in events.items)


# -- no LIST per tick -------------------------------------------------------------------------------
def operator_requests(stack: Stack, since: int) -> Counter[tuple[str, str]]:
    """(verb, resource) of the operator's requests for mlrollouts.io resources after event ``since``."""
    events = stack.cluster.audit_events()[since:]
    return Counter(
        (e["verb"], e.get("objectRef", {}).get("resource", ""))
        for e in events
        if e.get("user", {}).get("username") == OPERATOR_USER
    )


def test_60_invalid_objects_cause_no_list_per_tick(fresh: Stack) -> None:
    if fresh.cluster.audit_log is None:
        pytest.skip("the API server was started without an audit log")
    co = client.CustomObjectsApi(fresh.api)
    names = []
    for i in range(30):  # each names a route that does not exist: Invalid, re-checked every 15 s
        r = rollout(f"inv-r{i}", prom(fresh), [{"setWeight": 50}], route=f"missing-{i}", compare=False)
        co.create_namespaced_custom_object(G, V, fresh.namespace, ROLLOUTS, r)
        variants = [{"name": "a", "service": STABLE, "control": True}, {"name": "b", "service": CANDIDATE}]
        e = experiment(f"inv-e{i}", prom(fresh), variants, f"missing-e{i}")
        co.create_namespaced_custom_object(G, V, fresh.namespace, EXPERIMENTS, e)
        names += [(ROLLOUTS, f"inv-r{i}"), (EXPERIMENTS, f"inv-e{i}")]

    def all_invalid() -> bool:
        got = {
            (plural, o["metadata"]["name"]): phase(o)
            for plural in (ROLLOUTS, EXPERIMENTS)
            for o in co.list_namespaced_custom_object(G, V, fresh.namespace, plural)["items"]  # type: ignore[index]
        }
        return all(got.get(n) == "Invalid" for n in names)

    wait(all_invalid, 120, "60 Invalid objects")
    obj = fresh.get(ROLLOUTS, "inv-r0")
    assert "missing-0" in cond(obj, "Valid")["message"]
    start = len(fresh.cluster.audit_events())
    window = 20.0  # more than one re-check (every 15 s) of every object
    time.sleep(window)
    seen = operator_requests(fresh, start)
    writes = Counter(
        (e.get("objectRef", {}).get("name"), e.get("responseStatus", {}).get("code"))
        for e in fresh.cluster.audit_events()[start:]
        if e.get("verb") in ("update", "patch") and e.get("user", {}).get("username") == OPERATOR_USER
    )
    print(f"\nstatus writes in the window (object, HTTP code): {dict(writes)}")
    lists = sum(n for (verb, res), n in seen.items() if verb == "list")
    gets = seen[("get", ROLLOUTS)] + seen[("get", EXPERIMENTS)]
    print(f"\noperator requests in {window:.0f}s with 60 Invalid objects: {dict(seen)}")
    print(f"LISTs of mlrollouts.io resources: {lists} (120 before the index: 2 per object per 15 s)")
    # A re-check reads the object and its route from the operator's watches (handlers/scheduler.py):
    # no LIST, no GET of the object (300 in 20 s with a timer per object), and no write when it finds
    # the same problem.
    assert lists == 0 and gets == 0, dict(seen)
    assert not writes, "a re-check that finds the same problem writes nothing"
    # The re-checks do happen: once the missing route exists, the object that named it starts.
    fresh.apply(httproute("missing-0", fresh.namespace, {STABLE: 100, CANDIDATE: 0}))
    obj = fresh.wait_for(ROLLOUTS, "inv-r0", lambda o: phase(o) not in ("Invalid", "Pending", None), 45)
    assert cond(obj, "Valid")["status"] == "True", cond(obj, "Valid")


def test_one_route_has_one_owner_from_the_watch(fresh: Stack) -> None:
    """The one-owner check (now from the operator's indices) still refuses a second owner, and lets
    it take over once the first is gone."""
    fresh.apply(rollout("owner-a", prom(fresh), [{"setWeight": 20}, {"pause": {}}], compare=False))
    fresh.wait_for(ROLLOUTS, "owner-a", lambda o: (o.get("status") or {}).get("weight") == 20, 60)
    time.sleep(1)
    fresh.apply(rollout("owner-b", prom(fresh), [{"setWeight": 40}, {"pause": {}}], compare=False))
    obj = fresh.wait_for(ROLLOUTS, "owner-b", lambda o: phase(o) == "Invalid", 30)
    valid = cond(obj, "Valid")
    assert valid["status"] == "False" and "already managed by ModelRollout" in valid["message"], valid
    assert "owner-a" in valid["message"] and fresh.route_weights()[CANDIDATE] == 20
    client.CustomObjectsApi(fresh.api).delete_namespaced_custom_object(
        G, V, fresh.namespace, ROLLOUTS, "owner-a"
    )
    fresh.wait_for(ROLLOUTS, "owner-b", lambda o: (o.get("status") or {}).get("weight") == 40, 60)


# -- providers with owners --------------------------------------------------------------------------
REFUSED = [
    (
        "intruder-chat",
        {"notifications": [{"provider": "tb-other-chat"}]},
        "spec.notifications[0]",
        "/other-chat",
    ),
    (
        "intruder-default",
        {"notifications": [{"provider": "tb-default"}]},
        "spec.notifications[0]",
        "/default",
    ),
    (
        "intruder-gate",
        {"gates": [{"name": "qa", "provider": "tb-other-gate"}]},
        "spec.gates[0]",
        "/other-gate",
    ),
    (
        "intruder-second",
        {"notifications": [{"provider": "tb-own"}, {"provider": "tb-other-chat"}]},
        "spec.notifications[1]",
        "/other-chat",
    ),
]


@pytest.mark.parametrize(("name", "section", "field", "path"), REFUSED)
def test_a_provider_or_gate_that_does_not_admit_the_namespace_is_refused_and_nothing_is_sent(
    fresh: Stack, sink: Recorder, name: str, section: dict[str, Any], field: str, path: str
) -> None:
    before = len(sink.at(path))
    doc = rollout(name, prom(fresh), [{"setWeight": 30}, {"setWeight": 100}], compare=False)
    doc["spec"].update(section)
    fresh.apply(doc)
    obj = fresh.wait_for(ROLLOUTS, name, lambda o: phase(o) == "Invalid", 30)
    valid = cond(obj, "Valid")
    assert valid["status"] == "False" and valid["message"].startswith(field + ".provider: "), valid
    assert f"does not admit namespace {fresh.namespace}" in valid["message"]
    # Traffic untouched, and the provider's server hears nothing: not the InvalidSpec error, not a gate.
    time.sleep(6)
    assert fresh.route_weights() == {STABLE: 100, CANDIDATE: 0}
    assert (obj.get("status") or {}).get("weight", 0) == 0
    assert len(sink.at(path)) == before, sink.at(path)[before:]
    assert not any(name.encode() in b for b in sink.at(path))


def test_an_admitting_provider_by_list_or_selector_is_used(fresh: Stack, sink: Recorder) -> None:
    doc = rollout("admitted", prom(fresh), [{"setWeight": 50}], compare=False)
    doc["spec"]["notifications"] = [{"provider": "tb-own"}, {"provider": "tb-selected"}]
    doc["spec"]["gates"] = [{"name": "qa", "type": "confirm-promotion", "provider": "tb-selected"}]
    fresh.apply(doc)
    obj = fresh.wait_for(ROLLOUTS, "admitted", lambda o: phase(o) == "Promoted", 90)
    assert cond(obj, "Valid")["status"] == "True"

    def events(path: str) -> list[str]:
        out = [json.loads(b) for b in sink.at(path)]
        return [b.get("event") or b.get("kind") for b in out if "admitted" in json.dumps(b)]

    wait(lambda: "Promoted" in events("/own") and "Promoted" in events("/selected"), 15, "notifications")
    assert "GateRequest" in events("/selected"), "the gate was asked through the selected provider"


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ({"allowedNamespaces": ["Team_B"]}, "spec.allowedNamespaces[0]"),
        ({"allowedNamespaces": [f"ns-{i}" for i in range(257)]}, "spec.allowedNamespaces"),
        ({"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "In"}]}}, "values"),
        (
            {
                "namespaceSelector": {
                    "matchExpressions": [{"key": "t", "operator": "Exists", "values": ["a"]}]
                }
            },
            "values",
        ),
        ({"namespaceSelector": {"matchExpressions": [{"key": "t", "operator": "Near"}]}}, "operator"),
    ],
)
def test_the_api_server_refuses_a_bad_admission_naming_the_field(
    stack: Stack, sink: Recorder, spec: dict[str, Any], says: str
) -> None:
    co = client.CustomObjectsApi(stack.api)
    with pytest.raises(client.exceptions.ApiException) as e:
        co.create_cluster_custom_object(
            G, V, PROVIDERS, provider("tb-bad", "webhook", sink.url + "/bad", **spec)
        )
    assert e.value.status == 422 and says in str(e.value.body), e.value.body


def test_an_experiment_naming_a_provider_of_another_team_is_refused_and_nothing_is_sent(
    fresh: Stack, sink: Recorder
) -> None:
    before = len(sink.at("/other-chat"))
    variants = [{"name": "a", "service": STABLE, "control": True}, {"name": "b", "service": CANDIDATE}]
    doc = experiment("exp-intruder", prom(fresh), variants, "fraud")
    doc["spec"]["notifications"] = [{"provider": "tb-other-chat"}]
    fresh.apply(doc)
    obj = fresh.wait_for(EXPERIMENTS, "exp-intruder", lambda o: phase(o) == "Invalid", 30)
    valid = cond(obj, "Valid")
    assert valid["status"] == "False" and valid["message"].startswith("spec.notifications[0].provider: ")
    time.sleep(5)
    assert fresh.route_weights() == {STABLE: 100, CANDIDATE: 0}
    assert len(sink.at("/other-chat")) == before


def test_a_provider_that_starts_admitting_the_namespace_makes_the_object_valid(
    fresh: Stack, sink: Recorder
) -> None:
    co = client.CustomObjectsApi(fresh.api)
    co.create_cluster_custom_object(G, V, PROVIDERS, provider("tb-later", "webhook", sink.url + "/later"))
    try:
        doc = rollout("later", prom(fresh), [{"setWeight": 50}], compare=False)
        doc["spec"]["notifications"] = [{"provider": "tb-later"}]
        fresh.apply(doc)
        fresh.wait_for(ROLLOUTS, "later", lambda o: phase(o) == "Invalid", 30)
        assert not sink.at("/later")
        co.patch_cluster_custom_object(G, V, PROVIDERS, "tb-later", {"spec": {"allowedNamespaces": ["ml"]}})
        t0 = time.monotonic()
        # Re-checked every 15 s; the provider is re-read within 10 s.
        obj = fresh.wait_for(ROLLOUTS, "later", lambda o: cond(o, "Valid").get("status") == "True", 45)
        print(f"\nvalid {time.monotonic() - t0:.1f}s after the provider admitted the namespace")
        fresh.wait_for(ROLLOUTS, "later", lambda o: phase(o) == "Promoted", 90)
        wait(lambda: any(b'"Promoted"' in b for b in sink.at("/later")), 15, "the Promoted notification")
        assert obj["status"]["phase"] != "Invalid"
    finally:
        co.delete_cluster_custom_object(G, V, PROVIDERS, "tb-later")
