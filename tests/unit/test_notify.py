"""Notifications: which transitions are sent (once), the three payload formats, the background sender."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from pydantic import ValidationError

from model_rollouts.api.notification import ClusterNotificationProviderSpec, NotificationRef
from model_rollouts.api.rollout import ModelRolloutStatus
from model_rollouts.engine import rollout as eng
from model_rollouts.notify import Notice, events, slack, teams, webhook
from model_rollouts.notify import sender as snd
from tests.unit.test_rollout_engine import T0, ok, spec


def notice(**kw: Any) -> Notice:
    base: dict[str, Any] = {
        "event": "RolledBack",
        "kind": "ModelRollout",
        "namespace": "ml",
        "name": "fraud",
        "phase": "RolledBack",
        "reason": "GuardrailFailed",
        "message": "guardrail error-rate 0.31 > max 0.05",
        "severity": "warning",
        "time": "2026-01-01T00:00:00+00:00",
        "revision": "abc123",
        "weights": {"candidate": 0, "stable": 100},
    }
    return Notice(**{**base, **kw})


# -- which transitions ----------------------------------------------------------------------------
def run(breach_from: int | None = None, ticks: int = 30) -> list[Notice]:
    """Every notice of the engine's real transitions, tick by tick, as the handler publishes them."""
    s = spec([{"setWeight": 20}, {"pause": {"duration": "10s"}}, {"setWeight": 50}])
    status, now, out = ModelRolloutStatus(), T0, []
    for i in range(ticks):
        obs = None
        if eng.needs_measurement(s, status, now):
            obs = ok(0.5) if breach_from is not None and i >= breach_from else ok()
        d = eng.reconcile(s, status, now=now, generation=1, observations=obs)
        out += events.notices("ModelRollout", "ml", "fraud", status, d.status, d.actions)
        status, now = d.status, now + timedelta(seconds=10)
    return out


def test_a_promoted_rollout_notifies_started_each_step_and_promoted_once() -> None:
    got = run()
    assert [n.event for n in got] == ["Started", "Step", "Step", "Step", "Promoted"]
    assert [n.weights["candidate"] for n in got if n.event == "Step"] == [20, 50, 100]
    promoted = got[-1]
    assert (
        promoted.severity == "info" and promoted.phase == "Promoted" and promoted.reason == "AnalysisPassed"
    )
    keys = {events.key("uid", "p", n) for n in got}
    assert len(keys) == len(got), "each transition has its own dedupe key (event, reason, message, time)"


def test_a_rolled_back_rollout_notifies_rolled_back_as_a_warning_and_nothing_after() -> None:
    got = run(breach_from=2)
    assert got[0].event == "Started"
    assert got[-1].event == "RolledBack" and got[-1].severity == "warning"
    assert got[-1].reason == "GuardrailFailed" and "guardrail" in got[-1].message
    assert [n.event for n in got].count("RolledBack") == 1


def test_limits_and_reconcile_errors_are_error_notices_the_first_time_only() -> None:
    old = ModelRolloutStatus(phase="Progressing", weight=20)
    new = old.model_copy(update={"phase": "RolledBack", "weight": 0, "message": "held 1800s"})
    acts = [
        eng.Event("Warning", "ProgressDeadlineExceeded", "held"),
        eng.Event("Warning", "RolledBack", "held"),
    ]
    got = events.notices("ModelRollout", "ml", "r", old, new, acts)
    assert [n.event for n in got] == ["Error", "RolledBack"]
    first = old.model_copy(update={"reconcileErrors": 1, "lastReconcileErrorTime": T0})
    assert [
        n.event for n in events.reconcile_error("ModelRollout", "ml", "r", first, "RouteWriteFailed", "x")
    ] == ["Error"]
    again = first.model_copy(update={"reconcileErrors": 2})
    assert events.reconcile_error("ModelRollout", "ml", "r", again, "RouteWriteFailed", "x") == []


def test_an_experiment_concluding_is_promoted_and_srm_is_its_own_event() -> None:
    from model_rollouts.api.experiment import ModelExperimentStatus

    old = ModelExperimentStatus(phase="Running")
    srm = events.notices(
        "ModelExperiment", "ml", "e", old, old, [eng.Event("Warning", "SampleRatioMismatch", "p")]
    )
    assert [n.event for n in srm] == ["SRM"]
    done = old.model_copy(update={"phase": "Concluded", "message": "b wins"})
    got = events.notices(
        "ModelExperiment", "ml", "e", old, done, [eng.Event("Normal", "WinnerPromoted", "b")]
    )
    assert [(n.event, n.message) for n in got] == [("Promoted", "b wins")]


def test_subscriptions_filter_by_event() -> None:
    refs = events.subscriptions(
        {"notifications": [{"provider": "chat", "events": ["RolledBack"]}, {"provider": "all"}]}
    )
    assert [r.provider for r in refs] == ["chat", "all"]
    assert not events.wants(refs[0], "Step") and events.wants(refs[0], "RolledBack")
    assert events.wants(refs[1], "Step")
    assert events.subscriptions({"notifications": [{"provider": "BAD NAME"}]}) == []


# -- formats --------------------------------------------------------------------------------------
def test_webhook_payload_is_flat_json_with_the_object_and_weights() -> None:
    body = webhook.payload(notice())
    assert body["kind"] == "Notification" and body["event"] == "RolledBack"
    assert body["object"] == {"kind": "ModelRollout", "namespace": "ml", "name": "fraud"}
    assert body["weights"] == {"candidate": 0, "stable": 100} and body["revision"] == "abc123"
    json.dumps(body)


def test_slack_payload_has_text_and_blocks_and_escapes_mentions() -> None:
    body = slack.payload(notice(message="<!channel> look at <http://evil|this> & that"))
    assert "<!channel>" not in json.dumps(body)
    assert "&lt;!channel&gt;" in body["text"] and "&amp;" in body["text"]
    types = [b["type"] for b in body["blocks"]]
    assert types == ["header", "section", "context"]
    assert body["blocks"][0]["text"] == {"type": "plain_text", "text": "ModelRollout ml/fraud: RolledBack"}
    assert body["text"].startswith(":warning:")
    long = slack.payload(notice(message="x" * 10_000))
    assert len(long["blocks"][1]["text"]["text"]) <= slack.TEXT_MAX


def test_teams_payload_is_a_message_card_coloured_by_outcome() -> None:
    bad = teams.payload(notice())
    assert bad["@type"] == "MessageCard" and bad["@context"] == "https://schema.org/extensions"
    assert bad["themeColor"] == teams.COLOURS["warning"]
    facts = {f["name"]: f["value"] for f in bad["sections"][0]["facts"]}
    assert facts["Phase"] == "RolledBack" and facts["Weights"] == "candidate 0%, stable 100%"
    good = teams.payload(notice(event="Promoted", phase="Promoted", severity="info"))
    assert good["themeColor"] == teams.COLOURS["good"]
    assert teams.payload(notice(message="**bold** [x](y)"))["sections"][0]["text"] == r"\*\*bold\*\* \[x\](y)"


# -- provider model -------------------------------------------------------------------------------
def test_a_provider_has_exactly_one_of_address_and_secret_and_a_bounded_timeout() -> None:
    ClusterNotificationProviderSpec.model_validate({"type": "slack", "secretRef": {"name": "hook"}})
    with pytest.raises(ValidationError, match="timeout"):
        ClusterNotificationProviderSpec.model_validate(
            {"type": "webhook", "address": "http://a:1", "timeout": "1m"}
        )
    with pytest.raises(ValidationError):
        ClusterNotificationProviderSpec.model_validate({"type": "irc", "address": "http://a:1"})
    with pytest.raises(ValidationError):
        NotificationRef.model_validate({"provider": "p", "events": ["Everything"]})


# -- the sender -----------------------------------------------------------------------------------
class Sink:
    """A loopback server that records JSON bodies and answers ``status`` (after ``delay`` seconds)."""

    def __init__(self, status: int = 200, delay: float = 0.0) -> None:
        self.status, self.delay, self.bodies = status, delay, []  # type: ignore[var-annotated]
        sink = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                sink.bodies.append(json.loads(self.rfile.read(n)))
                time.sleep(sink.delay)
                self.send_response(sink.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.close()


def wait_for(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def target(name: str, type_: str, url: str, timeout: float) -> snd.Target:
    """A resolved provider that admits the namespace of :func:`notice` (ml)."""
    spec = ClusterNotificationProviderSpec.model_validate(
        {"type": type_, "address": "http://unused.example/x", "allowedNamespaces": ["ml"]}
    )
    return snd.Target(name, type_, url, timeout, spec)


def counter(result: str) -> float:
    from model_rollouts import telemetry

    return telemetry.NOTIFICATIONS.labels(result)._value.get()


def test_the_sender_posts_each_transition_once_in_the_providers_format(sink: Sink) -> None:
    targets = {"chat": target("chat", "slack", sink.url, 2.0)}
    sender = snd.Sender(lambda name: targets[name])
    refs = [NotificationRef(provider="chat")]
    sent = counter("sent")
    n = notice()
    assert sender.publish("uid-1", refs, [n]) == 1
    assert sender.publish("uid-1", refs, [n]) == 0, "the same transition again is not re-sent"
    later = notice(time="2026-01-01T00:05:00+00:00")
    assert sender.publish("uid-1", refs, [later]) == 1, "a new transition (new history time) is sent"
    wait_for(lambda: len(sink.bodies) == 2)
    assert all(set(b) == {"text", "blocks"} for b in sink.bodies)
    wait_for(lambda: counter("sent") == sent + 2)


def test_publish_never_blocks_and_failures_are_counted_and_logged_without_the_url(
    caplog: pytest.LogCaptureFixture,
) -> None:
    slow = Sink(status=500, delay=1.5)
    try:
        url = slow.url + "/secret-token-xyz"
        sender = snd.Sender(lambda name: target(name, "webhook", url, 0.5), workers=1, maxsize=2)
        failed, dropped = counter("failed"), counter("dropped")
        refs = [NotificationRef(provider="hook")]
        t0 = time.monotonic()
        for i in range(10):
            sender.publish("uid-2", refs, [notice(time=f"t{i}")])
        assert time.monotonic() - t0 < 0.5, "publishing waits for no server"
        assert counter("dropped") - dropped >= 5
        wait_for(lambda: counter("failed") - failed >= 3, timeout=15)
        assert "secret-token-xyz" not in caplog.text
        assert "no answer within 0.5s" in caplog.text or "answered HTTP 500" in caplog.text
    finally:
        slow.close()


def test_an_inline_address_needs_the_allowlist(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = {"spec": {"type": "webhook", "address": "http://hooks.internal:8080/x"}}

    class Api:
        def get_cluster_custom_object(self, *a: Any, **k: Any) -> dict[str, Any]:
            return raw

    monkeypatch.setattr(snd.client, "CustomObjectsApi", lambda api: Api())
    monkeypatch.setattr(snd, "ALLOWED", [])
    with pytest.raises(
        snd.ProviderError, match=r"spec.address is not allowed.*--allowed-notification-address"
    ):
        snd.Resolver(lambda: None)("hook")  # type: ignore[arg-type,return-value]
    snd.configure([r"http://hooks\.internal:8080/.*"])
    try:
        target = snd.Resolver(lambda: None)("hook")  # type: ignore[arg-type,return-value]
        assert (target.type, target.url, target.timeout) == ("webhook", "http://hooks.internal:8080/x", 5.0)
    finally:
        snd.configure([])


def test_a_gate_is_open_only_on_a_2xx_from_a_webhook_provider(
    monkeypatch: pytest.MonkeyPatch, sink: Sink
) -> None:
    kinds = {"gate": "webhook", "chat": "slack"}
    monkeypatch.setattr(snd, "_resolver", lambda name: target(name, kinds[name], sink.url, 1.0))
    assert snd.ask("gate", {"gate": "qa"}, "ml") == snd.GateReply(True, "answered 2xx")
    assert sink.bodies[-1] == {"gate": "qa"}
    sink.status = 403
    assert snd.ask("gate", {"gate": "qa"}, "ml") == snd.GateReply(False, "answered HTTP 403")
    reply = snd.ask("chat", {}, "ml")
    assert not reply.open and "a gate needs webhook" in reply.message
    sink.status, sink.delay = 200, 2.0
    reply = snd.ask("gate", {}, "ml")
    assert not reply.open and not reply.busy and reply.message == "no answer within 1s"


def test_the_shared_sender_and_resolver_are_made_once() -> None:
    done: list[object] = []
    t = threading.Thread(target=lambda: done.append(snd.sender()), daemon=True)
    t.start()
    t.join(5)
    assert done and done[0] is snd.sender() and snd.sender().resolve is snd.resolver()


def test_a_gate_that_does_not_answer_holds_one_thread_and_the_others_are_held_at_once(
    monkeypatch: pytest.MonkeyPatch, sink: Sink
) -> None:
    monkeypatch.setattr(snd, "_resolver", lambda name: target(name, "webhook", sink.url + "/slow", 3.0))
    sink.delay = 1.5
    first: list[snd.GateReply] = []
    t = threading.Thread(target=lambda: first.append(snd.ask("gate", {}, "ml")))
    t.start()
    wait_for(lambda: len(sink.bodies) == 1)
    t0 = time.monotonic()
    busy = snd.ask("gate", {}, "ml")
    assert not busy.open and busy.busy, "busy for another object: held, not an answer of the gate"
    assert "not been answered yet" in busy.message
    assert time.monotonic() - t0 < 0.5
    t.join(10)
    assert first == [snd.GateReply(True, "answered 2xx")]
    sink.delay = 0.0
    assert snd.ask("gate", {}, "ml") == snd.GateReply(True, "answered 2xx"), "free again once answered"


def test_an_objects_notices_to_a_provider_arrive_in_order_whatever_the_workers(sink: Sink) -> None:
    sink.delay = 0.05
    sender = snd.Sender(lambda name: target(name, "webhook", sink.url, 2.0), workers=4)
    refs = [NotificationRef(provider="hook")]
    sent = [
        notice(event=e, time=f"t{i}")
        for i, e in enumerate(["Started", "Step", "Step", "Error", "RolledBack"])
    ]
    for n in sent:
        sender.publish("uid-order", refs, [n])
    wait_for(lambda: len(sink.bodies) == len(sent))
    assert [(b["event"], b["time"]) for b in sink.bodies] == [(n.event, n.time) for n in sent]


def test_the_example_providers_and_the_rollout_fields_in_its_comment_are_valid() -> None:
    import re as re_
    from pathlib import Path

    import yaml

    from model_rollouts.api.rollout import ModelRolloutSpec

    path = Path(__file__).resolve().parents[2] / "manifests" / "examples" / "notifications.yaml"
    text = path.read_text()
    docs = [d for d in yaml.safe_load_all(text) if d]
    providers = [ClusterNotificationProviderSpec.model_validate(d["spec"]) for d in docs[1:]]
    assert [p.type for p in providers] == ["slack", "webhook"]
    assert providers[0].secretRef is not None and providers[0].secretRef.name == docs[0]["metadata"]["name"]
    # The commented spec excerpt, uncommented, is a valid part of a ModelRollout spec.
    excerpt = "\n".join(line[4:] for line in text.splitlines() if line.startswith("#     "))
    fields = yaml.safe_load(excerpt)
    base = {
        "stable": {"service": "a"},
        "candidate": {"service": "b"},
        "trafficRouting": {"gatewayAPI": {"httpRoute": "r"}},
        "steps": [{"setWeight": 100}],
        "analysis": {"provider": "prom"},
    }
    spec_ = ModelRolloutSpec.model_validate({**base, **fields})
    assert [n.provider for n in spec_.notifications] == ["ml-alerts", "release-board"]
    assert spec_.gates[0].provider == "release-board"
    allowed = re_.search(r"--allowed-notification-address '([^']+)'", text)
    assert allowed is not None and re_.fullmatch(allowed.group(1), str(providers[1].address))


def test_a_provider_that_does_not_admit_the_namespace_is_never_posted_to(sink: Sink) -> None:
    """Checked again at send time: a notice of an object in a namespace the provider does not admit
    (here: it admits only team-b) is counted as refused and nothing reaches the server."""
    spec = ClusterNotificationProviderSpec.model_validate(
        {"type": "webhook", "address": "http://unused.example/x", "allowedNamespaces": ["team-b"]}
    )
    sender = snd.Sender(lambda name: snd.Target(name, "webhook", sink.url, 1.0, spec))
    refused = counter("refused")
    assert sender.publish("uid-refused", [NotificationRef(provider="other-team")], [notice()]) == 1
    wait_for(lambda: counter("refused") == refused + 1)
    time.sleep(0.3)
    assert sink.bodies == []


def test_a_gate_that_does_not_admit_the_namespace_is_closed_and_never_asked(
    monkeypatch: pytest.MonkeyPatch, sink: Sink
) -> None:
    spec = ClusterNotificationProviderSpec.model_validate(
        {"type": "webhook", "address": "http://unused.example/x", "allowedNamespaces": ["team-b"]}
    )
    monkeypatch.setattr(snd, "_resolver", lambda name: snd.Target(name, "webhook", sink.url, 1.0, spec))
    reply = snd.ask("their-gate", {"gate": "qa"}, "ml")
    assert not reply.open and not reply.busy and "does not admit namespace ml" in reply.message
    assert snd.check("their-gate", "ml") == reply.message and snd.check("their-gate", "team-b") is None
    assert sink.bodies == []
