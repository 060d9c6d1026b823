"""Bounded inputs (issue 15): action annotations, status texts, notification messages, the dedupe set."""

from __future__ import annotations

import gc
import json
import tracemalloc
from datetime import timedelta

from model_rollouts.api.common import (
    MAX_ANNOTATION_VALUE,
    MAX_MESSAGE,
    TRUNCATED,
    annotation_value,
    dump,
    truncate,
)
from model_rollouts.api.rollout import ANNOTATION_ABORT, ANNOTATION_PROMOTE_FULL, ANNOTATION_RETRY
from model_rollouts.engine import experiment as exp_engine
from model_rollouts.engine import rollout as eng
from model_rollouts.notify import events, slack, teams, webhook
from tests.unit.test_experiment_engine import make_spec, start, step
from tests.unit.test_notify import notice
from tests.unit.test_rollout_engine import Driver, spec

BIG = 150_000  # the issue's 150 kB annotation value
STATUS_LIMIT = 64 * 1024


def size(model: object) -> int:
    return len(json.dumps(dump(model)).encode())  # type: ignore[arg-type]


def test_a_150_kb_abort_annotation_leaves_a_rollout_status_under_64_kb() -> None:
    d = Driver(spec([{"setWeight": 20}, {"pause": {}}]))
    d.tick()
    value = "A" * BIG
    st = d.tick(annotations={ANNOTATION_ABORT: value})
    assert st.phase == "Aborted" and st.weight == 0
    n = size(st)
    print(f"\nrollout status after a {BIG} B abort annotation: {n} B (was 901,986 B before bounding)")
    assert n < 8 * 1024, n  # a handful of bounded copies, far under the 64 kB bound
    assert st.handled.abort is not None and len(st.handled.abort) == MAX_ANNOTATION_VALUE
    assert st.handled.abort.startswith("AAAA") and "…[truncated " in st.handled.abort
    assert "…[truncated " in st.message and len(st.message) <= MAX_MESSAGE
    assert all(len(h.message) <= MAX_MESSAGE for h in st.history)
    assert all(len(c.message) <= MAX_MESSAGE for c in st.conditions)


def test_two_long_annotation_values_with_the_same_start_still_act_once_each() -> None:
    """Cut values keep a digest of the whole value: a new long retry value is a new request."""
    a, b = "r" * BIG + "1", "r" * BIG + "2"
    assert annotation_value(a) != annotation_value(b)
    assert annotation_value(a) == annotation_value(a) and len(annotation_value(a)) == MAX_ANNOTATION_VALUE
    assert annotation_value("go-1") == "go-1"

    d = Driver(spec([{"setWeight": 20}, {"pause": {}}]))
    d.tick()
    assert d.tick(annotations={ANNOTATION_ABORT: a}).phase == "Aborted"
    # The same long value (as the timer sees it on every wake-up) does not keep the object active...
    raw = {"phase": "Aborted", "revision": d.status.revision, "handled": dump(d.status.handled)}
    spec_raw = d.spec.model_dump(mode="json", exclude_none=True)
    raw["handled"]["retry"] = annotation_value(a)
    assert not eng.active(spec_raw, raw, {ANNOTATION_RETRY: a})
    # ...and a different one does.
    assert eng.active(spec_raw, raw, {ANNOTATION_RETRY: b})
    st = d.tick(annotations={ANNOTATION_ABORT: a, ANNOTATION_RETRY: b})
    assert st.phase == "Progressing" and st.handled.retry == annotation_value(b)


def test_a_150_kb_annotation_leaves_an_experiment_status_under_64_kb() -> None:
    s = make_spec(2)
    d = start(s)
    d = step(s, d, 6, None, annotations={exp_engine.ANNOTATION_ABORT: "B" * BIG})
    assert d.status.phase == "Aborted"
    n = size(d.status)
    print(f"\nexperiment status after a {BIG} B abort annotation: {n} B")
    assert n < 8 * 1024, n
    assert d.status.handled.abort is not None and len(d.status.handled.abort) == MAX_ANNOTATION_VALUE


def test_notices_and_every_payload_format_are_bounded() -> None:
    d = Driver(spec([{"setWeight": 20}, {"pause": {}}]))
    d.tick()
    old = d.status
    st = d.tick(annotations={ANNOTATION_PROMOTE_FULL: "P" * BIG})
    got = events.notices("ModelRollout", "ml", "fraud", old, st, [])
    assert got and all(len(n.message) <= MAX_MESSAGE for n in got)
    huge = notice(message="M" * BIG)
    n = events.notices(
        "ModelRollout", "ml", "fraud", old, old, [eng.Event("Warning", "InvalidSpec", "M" * BIG)]
    )
    assert len(n[0].message) == MAX_MESSAGE and n[0].message.endswith(TRUNCATED)
    for fmt in (webhook.payload, slack.payload, teams.payload):
        body = len(json.dumps(fmt(n[0])))
        assert body < 8 * 1024, (fmt.__module__, body)
    # A format given an unbounded notice still cuts it (chat limits).
    assert len(json.dumps(slack.payload(huge))) < 16 * 1024
    assert len(json.dumps(teams.payload(huge))) < 16 * 1024


def test_truncate_marks_what_it_cut_and_keeps_the_limit() -> None:
    assert truncate("short", 10) == "short"
    cut = truncate("x" * 100, 50)
    assert len(cut) == 50 and cut.endswith(TRUNCATED)


def test_the_dedupe_set_keeps_keys_not_messages() -> None:
    """300 notices of 150 kB held 45 MB before (the set kept each message); now ~100 B of key each."""
    dedupe = events.Dedupe()
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for i in range(300):
            n = notice(message=f"{i}:" + "m" * BIG, time=f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}+00:00")
            assert dedupe.first(events.key("uid", "team-webhook", n))
            del n
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    grew = held - before
    print(f"\ndedupe set after 300 notices of {BIG} B: {grew / 1024:.1f} KiB held ({grew / 300:.0f} B each)")
    assert grew < 512 * 1024, grew  # 45 MB before
    assert all(isinstance(k, bytes) and len(k) == 32 for k in dedupe._seen)
    # Still a set of transitions: the same one is not first again, a different message is.
    same = notice(message="0:" + "m" * BIG, time="2026-01-01T00:00:00+00:00")
    assert not dedupe.first(events.key("uid", "team-webhook", same))
    assert dedupe.first(events.key("uid", "team-webhook", notice(message="other")))


def test_the_dedupe_set_is_capped() -> None:
    dedupe = events.Dedupe(size=64)
    for i in range(200):
        dedupe.first(events.key("u", "p", notice(time=str(i))))
    assert len(dedupe._seen) == 64
    # The oldest were forgotten first; the newest are still known.
    assert not dedupe.first(events.key("u", "p", notice(time="199")))
    assert dedupe.first(events.key("u", "p", notice(time="0")))


def test_status_texts_are_bounded_even_from_a_long_internal_message() -> None:
    from model_rollouts.api.rollout import ModelRolloutStatus
    from model_rollouts.engine.status import bound_texts, invalid

    s, _ = invalid(ModelRolloutStatus(), "spec.x: " + "y" * BIG, eng.EPOCH + timedelta(0), 1)
    bound_texts(s)
    assert size(s) < 8 * 1024 and s.message.endswith(TRUNCATED)


def test_kopf_keeps_no_record_of_the_object_in_status() -> None:
    """Kopf's diffbase (status.kopf.diffbase) copied every annotation (154 kB for one 150 kB abort) and
    cost one status patch per created object. No handler of ours needs it: nothing is stored."""
    import kopf

    from model_rollouts.main import NoDiffBaseStorage

    body = kopf.Body(
        {
            "apiVersion": "mlrollouts.io/v1alpha1",
            "kind": "ModelRollout",
            "metadata": {
                "name": "r",
                "namespace": "ml",
                "annotations": {
                    ANNOTATION_ABORT: "a" * BIG,
                    **{f"team.example/k{i}": "v" * 250 for i in range(500)},
                },
                "labels": {f"l{i}": "x" * 63 for i in range(500)},
            },
            "spec": {"steps": [{"setWeight": 10}]},
            # What an older version left: ignored, never read back as the last-handled state.
            "status": {"kopf": {"diffbase": json.dumps({"spec": {"steps": []}})}},
        }
    )
    storage = NoDiffBaseStorage()
    essence = storage.build(body=body)
    patch = kopf.Patch()
    storage.store(body=body, patch=patch, essence=essence)
    assert not patch, patch  # no status write for Kopf's bookkeeping
    assert storage.fetch(body=body) is None
    assert essence == {}


HOSTILE = (
    "*bold* _it_ ~strike~ `code` <!channel> <!here|here> <@U0123> <http://evil.example|click here> "
    "@channel @here & [x](http://evil.example) ![i](http://evil.example/i.png)\n> quoted\n# heading\n- item"
)


def test_slack_payloads_cannot_format_mention_or_link_from_an_objects_text() -> None:
    body = slack.payload(notice(message=HOSTILE, name="fraud"))
    dumped = json.dumps(body, ensure_ascii=False)
    # Every block text is plain_text: Slack renders it as written (no formatting, mention or link).
    texts = [body["blocks"][0]["text"], body["blocks"][1]["text"], *body["blocks"][1]["fields"]]
    texts += body["blocks"][2]["elements"]
    assert all(t["type"] == "plain_text" for t in texts), texts
    assert '"mrkdwn"' not in dumped
    # The fallback text is mrkdwn: nothing in it can act.
    text = body["text"]
    for bad in ("<!", "<@", "<http", "*bold*", "_it_", "~strike~", "`code`", "@channel", "@here", "\n"):
        assert bad not in text, (bad, text)
    assert "&lt;!channel&gt;" in text and "&amp;" in text
    assert text.startswith(":warning: ") and len(text) <= slack.TEXT_MAX
    long = slack.payload(notice(message="m" * 20_000, reason="r" * 5_000))
    assert len(long["blocks"][1]["text"]["text"]) <= slack.TEXT_MAX
    assert all(len(f["text"]) <= slack.FIELD_MAX for f in long["blocks"][1]["fields"])


def test_teams_cards_cannot_format_mention_or_link_from_an_objects_text() -> None:
    card = teams.payload(notice(message=HOSTILE))
    text = card["sections"][0]["text"]
    assert "\n" not in text and "<" not in text and ">" not in text.replace("&gt;", "")
    assert "&lt;\\!channel&gt;" in text and "&amp;" in text
    # Every Markdown character is escaped: no emphasis, link, image, strike or heading.
    for i, c in enumerate(text):
        if c in "*_~`[]#!|":
            assert text[i - 1] == "\\", (c, text[max(0, i - 10) : i + 10])
    long = teams.payload(notice(message="m" * 20_000))
    assert len(long["sections"][0]["text"]) <= teams.TEXT_MAX


def test_a_provider_admits_its_listed_and_selected_namespaces_and_by_default_only_the_operators() -> None:
    import pytest
    from pydantic import ValidationError

    from model_rollouts import policy
    from model_rollouts.api.notification import ClusterNotificationProviderSpec
    from model_rollouts.notify import sender as snd

    def spec(**kw: object) -> ClusterNotificationProviderSpec:
        return ClusterNotificationProviderSpec.model_validate(
            {"type": "webhook", "address": "http://h.example/x", **kw}
        )

    own = policy.POLICY.secret_namespace
    default = spec()
    assert default.admits(own, {}, own) and not default.admits("team-a", {}, own)
    listed = spec(allowedNamespaces=["team-a"])
    assert listed.admits("team-a", None, own) and not listed.admits("team-b", None, own)
    sel = spec(
        namespaceSelector={
            "matchLabels": {"tier": "ml"},
            "matchExpressions": [
                {"key": "env", "operator": "In", "values": ["prod", "stage"]},
                {"key": "frozen", "operator": "DoesNotExist"},
                {"key": "owner", "operator": "Exists"},
                {"key": "region", "operator": "NotIn", "values": ["cn"]},
            ],
        }
    )
    ok = {"tier": "ml", "env": "prod", "owner": "x"}
    assert sel.admits("a", ok, own)
    for bad in (
        {**ok, "tier": "web"},
        {**ok, "env": "dev"},
        {**ok, "frozen": "1"},
        {"tier": "ml", "env": "prod"},
    ):
        assert not sel.admits("a", bad, own), bad
    assert not sel.admits("a", {**ok, "region": "cn"}, own)
    by_name = spec(namespaceSelector={"matchLabels": {"kubernetes.io/metadata.name": "team-c"}})
    assert by_name.admits("team-c", None, own) and not by_name.admits("team-d", None, own)
    with pytest.raises(ValidationError, match="values"):
        spec(namespaceSelector={"matchExpressions": [{"key": "k", "operator": "In"}]})
    # The sender refuses with a fixed text; {} selects every namespace without reading its labels.
    target = snd.Target("p", "webhook", "http://h.example/x", 1.0, listed)
    why = snd.refusal(target, "team-b")
    assert why is not None and "does not admit namespace team-b" in why
    assert snd.refusal(target, "team-a") is None and snd.refusal(target, own) is None
    assert snd.refusal(snd.Target("p", "webhook", "u", 1.0, spec(namespaceSelector={})), "any") is None
    assert snd.refusal(snd.Target("p", "webhook", "u", 1.0, None), "team-a") is not None


def test_the_one_owner_check_reads_the_index_and_lists_nothing() -> None:
    """check_owner works from the Kopf indices (route -> claims); any API call would fail here."""
    import pytest

    from model_rollouts.handlers import common
    from model_rollouts.handlers.rollout import RolloutController
    from model_rollouts.traffic.router import RouterError

    def body(
        kind: str, name: str, created: str, phase: str | None, deleting: bool = False
    ) -> dict[str, object]:
        meta: dict[str, object] = {
            "name": name,
            "namespace": "ml",
            "uid": f"uid-{name}",
            "creationTimestamp": created,
        }
        if deleting:
            meta["deletionTimestamp"] = created
        return {
            "metadata": meta,
            "spec": {"trafficRouting": {"gatewayAPI": {"httpRoute": "r"}}},
            "status": {"phase": phase} if phase else {},
        }

    rollouts: dict[tuple[str, str, int], list[common.RouteClaim]] = {}
    experiments: dict[tuple[str, str, int], list[common.RouteClaim]] = {}
    docs = [
        ("ModelRollout", body("ModelRollout", "old-done", "2026-01-01T00:00:00Z", "Promoted"), rollouts),
        (
            "ModelRollout",
            body("ModelRollout", "old-going", "2026-01-01T00:00:00Z", None, deleting=True),
            rollouts,
        ),
        ("ModelExperiment", body("ModelExperiment", "exp", "2026-01-02T00:00:00Z", "Running"), experiments),
        ("ModelRollout", body("ModelRollout", "me", "2026-01-03T00:00:00Z", "Pending"), rollouts),
    ]
    for kind, doc, index in docs:
        entry = common.route_claim(kind, doc)
        assert entry is not None
        for key, claim in entry.items():
            index.setdefault(key, []).append(claim)
    assert common.route_claim("ModelRollout", {"metadata": {}, "spec": {}}) is None
    owners = common.route_owners(rollouts, experiments)
    assert {c.name for c in owners(("ml", "r", 0))} == {"old-done", "old-going", "exp", "me"}
    assert owners(("other-ns", "r", 0)) == []

    spec_ = spec([{"setWeight": 10}])
    me = docs[3][1]
    with pytest.raises(
        RouterError, match=r"already managed by ModelExperiment ml/exp; one route has one owner"
    ):
        RolloutController("ml", "me").check_owner(me, spec_, owners)
    # The older experiment is not refused by the younger rollout, nor by the finished or deleted ones.
    exp_ctl = RolloutController("ml", "exp")
    exp_ctl.kind = "ModelExperiment"
    exp_ctl.check_owner(docs[2][1], spec_, owners)
