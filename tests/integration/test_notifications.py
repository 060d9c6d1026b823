"""Notifications and gates on the real stack: a loopback server receives what the operator sends.

The platform's ClusterNotificationProviders point at one local HTTP server (127.0.0.1) under three
paths, one per format (the Slack one kept in a Secret of the operator's namespace, as a webhook URL
with a token would be); a fourth path is a gate whose answer the test switches.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.harness.objects import CANDIDATE, STABLE, fraud_stack, fresh_fraud, phase, rollout
from tests.harness.stack import Stack

P = "modelrollouts"
OPERATOR_NS = "model-rollouts"  # the operator's namespace (manifests/rbac.yaml): provider Secrets live here
G, V = "mlrollouts.io", "v1alpha1"
#: A path that would be a credential in a real Slack URL: it must never appear in status, Events or logs.
SLACK_PATH = "/slack/T0000/B0000/token-4f1d9c2e"


@dataclass
class Sink:
    """Records each POST's path and JSON body; answers ``answers[path]`` (default 200)."""

    answers: dict[str, int] = field(default_factory=dict)
    posts: list[tuple[str, Any]] = field(default_factory=list)

    def start(self) -> Sink:
        sink = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode(errors="replace")
                sink.posts.append((self.path, body))
                self.send_response(sink.answers.get(self.path, 200))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def bodies(self, path: str, name: str | None = None) -> list[Any]:
        out = [b for p, b in list(self.posts) if p == path]
        if name is None:
            return out
        return [b for b in out if name in json.dumps(b)]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def provider(name: str, type_: str | None = None, **spec: Any) -> dict[str, Any]:
    """A provider that admits the stack's namespace (ml): by default only the operator's may use one."""
    body = {"timeout": "2s", "allowedNamespaces": ["ml"], **spec, **({"type": type_} if type_ else {})}
    return {
        "apiVersion": f"{G}/{V}",
        "kind": "ClusterNotificationProvider",
        "metadata": {"name": name},
        "spec": body,
    }


@pytest.fixture(scope="module")
def sink() -> Iterator[Sink]:
    s = Sink().start()
    yield s
    s.close()


@pytest.fixture(scope="module")
def stack(real_components: None, sink: Sink) -> Iterator[Stack]:
    # Inline notification addresses: only the loopback sink (the default admits none).
    with fraud_stack(
        1200, operator_args=["--allowed-notification-address", re.escape(sink.url) + r"/[a-z]+"]
    ) as s:
        co = client.CustomObjectsApi(s.api)
        core = client.CoreV1Api(s.api)
        secret = client.V1Secret(
            metadata=client.V1ObjectMeta(name="slack-webhook"), string_data={"address": sink.url + SLACK_PATH}
        )
        try:
            core.create_namespaced_secret(OPERATOR_NS, secret)
        except ApiException as e:
            if e.status != 409:
                raise
        for doc in (
            provider("team-webhook", "webhook", address=sink.url + "/webhook"),
            provider("team-slack", "slack", secretRef={"name": "slack-webhook"}),
            provider("team-teams", "teams", address=sink.url + "/teams"),
            provider("qa-gate", "webhook", address=sink.url + "/gate"),
        ):
            co.create_cluster_custom_object(G, V, "clusternotificationproviders", doc)
        yield s


@pytest.fixture()
def fresh(stack: Stack) -> Iterator[Stack]:
    yield from fresh_fraud(stack, P)


def notified(name: str, steps: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    """A rollout (guardrail only: no comparison to wait for) notifying all three providers."""
    doc = rollout(name, "unused", steps, analysis={"comparisons": []})
    doc["spec"]["notifications"] = [
        {"provider": "team-webhook"},
        {"provider": "team-slack", "events": ["Started", "Promoted", "RolledBack", "Aborted", "Error"]},
        {"provider": "team-teams", "events": ["Promoted", "RolledBack"]},
    ]
    doc["spec"].update(spec)
    return doc


def with_prom(stack: Stack, doc: dict[str, Any]) -> dict[str, Any]:
    assert stack.prom is not None
    doc["spec"]["analysis"]["prometheus"]["address"] = stack.prom.url
    return doc


def wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def events_of(stack: Stack, name: str) -> list[Any]:
    return list(
        client.CoreV1Api(stack.api)
        .list_namespaced_event(stack.namespace, field_selector=f"involvedObject.name={name}")
        .items
    )


def test_a_promoted_rollout_is_announced_in_all_three_formats_once(fresh: Stack, sink: Sink) -> None:
    fresh.apply(with_prom(fresh, notified("note-good", [{"setWeight": 20}, {"setWeight": 50}])))
    fresh.wait_for(P, "note-good", lambda o: phase(o) == "Promoted", 120)

    def hook() -> list[Any]:
        return sink.bodies("/webhook", "note-good")

    wait(lambda: any(b["event"] == "Promoted" for b in hook()), 15, "the webhook's Promoted")
    wait(lambda: sink.bodies("/teams", "note-good") and sink.bodies(SLACK_PATH, "note-good"), 15, "chat")
    time.sleep(12)  # two more analysis intervals: nothing is re-sent on later ticks
    got = hook()
    assert [b["event"] for b in got] == ["Started", "Step", "Step", "Step", "Promoted"], got
    assert [b["weights"]["candidate"] for b in got if b["event"] == "Step"] == [20, 50, 100]
    done = got[-1]
    assert done["kind"] == "Notification" and done["apiVersion"] == f"{G}/{V}"
    assert done["object"] == {"kind": "ModelRollout", "namespace": fresh.namespace, "name": "note-good"}
    assert done["phase"] == "Promoted" and done["severity"] == "info" and done["reason"] == "AnalysisPassed"
    assert re.fullmatch(r"[0-9a-f]{10}", done["revision"])
    print("\nwebhook payload (Promoted):\n" + json.dumps(done, indent=2))

    slack = sink.bodies(SLACK_PATH, "note-good")  # subscribed to Started and Promoted only
    assert len(slack) == 2 and all(set(b) == {"text", "blocks"} for b in slack)
    assert [b["blocks"][0]["text"]["text"] for b in slack] == [
        f"ModelRollout {fresh.namespace}/note-good: Started",
        f"ModelRollout {fresh.namespace}/note-good: Promoted",
    ]
    assert [b["type"] for b in slack[1]["blocks"]] == ["header", "section", "context"]

    teams = sink.bodies("/teams", "note-good")
    assert len(teams) == 1 and teams[0]["@type"] == "MessageCard"
    assert teams[0]["themeColor"] == "2EB886" and teams[0]["sections"][0]["activitySubtitle"] == "Promoted"

    # The Slack URL is a credential: it appears in no status, Event or operator log line.
    seen = json.dumps(fresh.get(P, "note-good").get("status")) + fresh.operator_log()
    seen += "".join(f"{e.reason}{e.message}" for e in events_of(fresh, "note-good"))
    assert "token-4f1d9c2e" not in seen


def test_a_rolled_back_rollout_is_announced_as_a_warning(fresh: Stack, sink: Sink) -> None:
    doc = with_prom(fresh, notified("note-bad", [{"setWeight": 30}, {"pause": {"duration": "10m"}}]))
    fresh.apply(doc)
    fresh.wait_for(P, "note-bad", lambda o: (o.get("status") or {}).get("weight") == 30, 60)
    fresh.servers[CANDIDATE].set(error_rate=0.5)
    obj = fresh.wait_for(P, "note-bad", lambda o: phase(o) == "RolledBack", 90)
    wait(lambda: sink.bodies("/teams", "note-bad") and sink.bodies(SLACK_PATH, "note-bad"), 15, "chat")
    wait(lambda: any(b["event"] == "RolledBack" for b in sink.bodies("/webhook", "note-bad")), 15, "webhook")
    time.sleep(6)
    hook = sink.bodies("/webhook", "note-bad")
    assert [b["event"] for b in hook] == ["Started", "Step", "RolledBack"], hook
    back = hook[-1]
    assert back["severity"] == "warning" and back["reason"] == "GuardrailFailed"
    assert back["message"] == obj["status"]["message"] and "error-rate" in back["message"]
    assert back["weights"] == {"candidate": 0, "stable": 100}
    slack = sink.bodies(SLACK_PATH, "note-bad")
    assert [b["blocks"][0]["text"]["text"].rsplit(": ", 1)[1] for b in slack] == ["Started", "RolledBack"]
    assert slack[-1]["text"].startswith(":warning:")
    print("\nSlack payload (RolledBack):\n" + json.dumps(slack[-1], indent=2))
    teams = sink.bodies("/teams", "note-bad")
    assert len(teams) == 1 and teams[0]["themeColor"] == "D63333"
    facts = {f["name"]: f["value"] for f in teams[0]["sections"][0]["facts"]}
    assert facts["Phase"] == "RolledBack" and facts["Reason"] == "GuardrailFailed"


def metric(stack: Stack, name: str, labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.operator_metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(rf"^{name}\{{{labels}\}} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_a_gate_answering_403_holds_promotion_and_200_lets_it_through(fresh: Stack, sink: Sink) -> None:
    sink.answers["/gate"] = 403
    doc = with_prom(fresh, rollout("gated", "unused", [{"setWeight": 30}], analysis={"comparisons": []}))
    doc["spec"]["gates"] = [{"name": "qa-signoff", "type": "confirm-promotion", "provider": "qa-gate"}]
    fresh.apply(doc)
    obj = fresh.wait_for(P, "gated", lambda o: "qa-signoff" in (o.get("status") or {}).get("message", ""), 60)
    asked = len(sink.bodies("/gate", "gated"))
    assert asked >= 1
    request = sink.bodies("/gate", "gated")[0]
    assert request["kind"] == "GateRequest" and request["gate"] == "qa-signoff"
    assert request["type"] == "confirm-promotion" and request["weight"] == 30
    # Held over several analyses (interval 5s): asked again each time, never past 30.
    deadline = time.monotonic() + 16
    while time.monotonic() < deadline:
        obj = fresh.get(P, "gated")
        assert obj["status"]["weight"] == 30 and phase(obj) == "Progressing", obj["status"]
        assert fresh.route_weights()[CANDIDATE] == 30
        time.sleep(1)
    assert len(sink.bodies("/gate", "gated")) >= asked + 2
    st = obj["status"]
    assert "qa-signoff" in st["message"] and "HTTP 403" in st["message"]
    progressing = next(c for c in st["conditions"] if c["type"] == "Progressing")
    assert progressing["reason"] == "GateClosed" and "qa-signoff" in progressing["message"]
    assert st["gates"][0]["name"] == "qa-signoff" and st["gates"][0]["open"] is False
    closed = [e for e in events_of(fresh, "gated") if e.reason == "GateClosed"]
    assert len(closed) == 1 and "qa-signoff" in closed[0].message

    sink.answers["/gate"] = 200
    obj = fresh.wait_for(P, "gated", lambda o: phase(o) == "Promoted", 60)
    fresh.wait_route({STABLE: 0, CANDIDATE: 100})
    assert obj["status"]["gates"][0]["open"] is True
    assert "GateOpened" in {e.reason for e in events_of(fresh, "gated")}
    assert metric(fresh, "mlrollouts_notifications_total", 'result="sent"') > 0


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ({"type": "webhook", "address": "http://a.example:80/x", "secretRef": {"name": "s"}}, "exactly one"),
        ({"type": "webhook"}, "exactly one"),
        ({"type": "webhook", "address": "http://a.example:80/x", "timeout": "1m"}, "timeout"),
        ({"type": "irc", "address": "http://a.example:80/x"}, "spec.type"),
        ({"type": "slack", "address": "http://user:pw@a.example/x"}, "spec.address"),
    ],
)
def test_the_api_server_refuses_a_bad_provider_naming_the_field(
    stack: Stack, spec: dict[str, Any], says: str
) -> None:
    co = client.CustomObjectsApi(stack.api)
    with pytest.raises(ApiException) as e:
        co.create_cluster_custom_object(G, V, "clusternotificationproviders", provider("bad", **spec))
    assert e.value.status == 422 and says in str(e.value.body), e.value.body


def test_the_api_server_refuses_unbounded_or_unknown_notification_settings(stack: Stack) -> None:
    doc = rollout("bounds", "http://unused.invalid", [{"setWeight": 50}])
    doc["metadata"]["namespace"] = stack.namespace
    co = client.CustomObjectsApi(stack.api)
    for field_, value, says in (
        ("notifications", [{"provider": f"p{i}"} for i in range(9)], "spec.notifications"),
        ("notifications", [{"provider": "p", "events": ["Everything"]}], "spec.notifications[0].events[0]"),
        ("gates", [{"name": "g", "type": "confirm-everything", "provider": "p"}], "spec.gates[0].type"),
        ("gates", [{"name": "g", "provider": "p"}, {"name": "g", "provider": "q"}], "spec.gates[1]"),
    ):
        bad = json.loads(json.dumps(doc))
        bad["spec"][field_] = value
        with pytest.raises(ApiException) as e:
            co.create_namespaced_custom_object(G, V, stack.namespace, P, bad)
        assert e.value.status == 422 and says in str(e.value.body), (field_, e.value.body)


def test_paused_and_a_deadline_are_announced_as_paused_and_error(fresh: Stack, sink: Sink) -> None:
    """spec.paused gives Paused; a guardrail without data past progressDeadline: Error, then RolledBack."""
    doc = with_prom(fresh, notified("note-stuck", [{"setWeight": 20}, {"setWeight": 60}]))
    doc["spec"]["analysis"]["guardrails"] = [
        {
            "name": "missing",
            "query": 'sum(rate(no_such_metric{service="{{ service }}"}[{{ window }}]))',
            "max": 1,
        }
    ]
    doc["spec"]["notifications"] = [{"provider": "team-webhook", "events": ["Paused", "Error", "RolledBack"]}]
    doc["spec"]["paused"] = True
    doc["spec"]["progressDeadline"] = "15s"
    fresh.apply(doc)

    def hook() -> list[str]:
        return [b["event"] for b in sink.bodies("/webhook", "note-stuck")]

    wait(lambda: hook() == ["Paused"], 30, "Paused")
    obj = fresh.get(P, "note-stuck")
    assert phase(obj) == "Paused" and obj["status"]["weight"] == 0
    client.CustomObjectsApi(fresh.api).patch_namespaced_custom_object(
        G, V, fresh.namespace, P, "note-stuck", {"spec": {"paused": False}}
    )
    obj = fresh.wait_for(P, "note-stuck", lambda o: phase(o) == "RolledBack", 90)
    wait(lambda: "RolledBack" in hook(), 15, "RolledBack")
    time.sleep(6)
    assert hook() == ["Paused", "Error", "RolledBack"], sink.bodies("/webhook", "note-stuck")
    error = sink.bodies("/webhook", "note-stuck")[1]
    assert error["reason"] == "ProgressDeadlineExceeded" and error["severity"] == "warning"
    assert "progressDeadline 15s" in error["message"]


def test_the_example_providers_are_accepted_by_the_api_server(stack: Stack) -> None:
    from pathlib import Path

    import yaml

    from tests.harness.cluster import kubectl_apply

    path = Path(__file__).resolve().parents[2] / "manifests" / "examples" / "notifications.yaml"
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    kubectl_apply(stack.api, docs)  # raises on a 422
    co = client.CustomObjectsApi(stack.api)
    for d in docs[1:]:
        got = co.get_cluster_custom_object(G, V, "clusternotificationproviders", d["metadata"]["name"])
        assert got["spec"]["type"] == d["spec"]["type"]
        co.delete_cluster_custom_object(G, V, "clusternotificationproviders", d["metadata"]["name"])
