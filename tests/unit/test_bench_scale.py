"""The pure parts of ``make bench-scale``: the JSON of issue 18, p95, gaps, audit and metrics parsing."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.bench.bench_scale import (
    OPERATOR_USER,
    analysis_gaps,
    audit_events,
    count_requests,
    p95,
    proc_cpu_seconds,
    prometheus_queries,
    result,
    rss_mib,
    series_left,
)

T0 = datetime(2026, 12, 7, 13, 0, tzinfo=UTC)


def ev(verb: str, resource: str, *, stage: str = "ResponseComplete", at: float = 1.0, **kw: object) -> dict:  # type: ignore[type-arg]
    ref = {"resource": resource, "namespace": "ml", "name": "x"}
    if "subresource" in kw:
        ref["subresource"] = str(kw.pop("subresource"))
    return {
        "kind": "Event",
        "level": "Metadata",
        "stage": stage,
        "verb": verb,
        "user": {"username": kw.pop("user", OPERATOR_USER)},
        "objectRef": ref,
        "responseStatus": {"code": kw.pop("code", 200)},
        "requestReceivedTimestamp": (T0 + timedelta(seconds=at)).isoformat().replace("+00:00", "Z"),
    }


def test_result_has_exactly_the_issue_shape() -> None:
    out = result(
        100,
        30,
        {"cpu_s_per_min": 1.5, "rss_mib": 120.0, "api_requests_per_min": 300.0, "api_writes_per_min": 90.0,
         "queries_per_min": 400.0, "extra": 1.0},
        {"interval_s": 5, "apply_to_first_weight_s": 1.2, "breach_to_zero_s": 4.0},
        31.0,
        {"cpu_s_per_min": 0.5},
        {"cpu_s_per_min": 0.1, "series_left": 0},
    )  # fmt: skip
    back = json.loads(json.dumps(out))
    assert list(back) == [
        "n",
        "interval_s",
        "active",
        "probe",
        "analysis_gap_p95_s",
        "finished",
        "after_delete",
    ]
    assert list(back["active"]) == [
        "cpu_s_per_min",
        "rss_mib",
        "api_requests_per_min",
        "api_writes_per_min",
        "queries_per_min",
    ]
    assert list(back["probe"]) == ["interval_s", "apply_to_first_weight_s", "breach_to_zero_s"]
    assert list(back["finished"]) == ["cpu_s_per_min", "api_requests_per_min"]
    assert list(back["after_delete"]) == ["cpu_s_per_min", "series_left"]
    assert back["n"] == 100 and back["active"]["api_writes_per_min"] == 90.0
    # A measurement a phase could not make is null, never a made-up number.
    assert back["finished"]["api_requests_per_min"] is None


def test_p95_nearest_rank() -> None:
    assert p95([]) is None
    assert p95([7.0]) == 7.0
    assert p95(range(1, 101)) == 95
    assert p95([30.0] * 19 + [90.0]) == 30.0
    assert p95([30.0] * 18 + [90.0, 95.0]) == 90.0


def test_analysis_gaps_per_object_from_distinct_times() -> None:
    t = [T0 + timedelta(seconds=s) for s in (0, 30, 30, 62, 92)]
    gaps = analysis_gaps({"a": t, "b": [T0], "c": [T0 + timedelta(seconds=5), T0]})
    assert sorted(gaps) == [5.0, 30.0, 30.0, 32.0]


def test_count_requests_by_user_verb_window_and_stage() -> None:
    events = [
        ev("get", "modelrollouts"),
        ev("get", "httproutes", at=2),
        ev("update", "modelrollouts", subresource="status", at=3),
        ev("patch", "httproutes", at=4),
        ev("list", "endpointslices", at=5, code=500),
        # a watch is counted once, when it starts
        ev("watch", "modelrollouts", stage="ResponseStarted", at=6),
        ev("watch", "modelrollouts", stage="ResponseComplete", at=6),
        # not the operator, out of the window, a stage that is not the answer
        ev("get", "modelrollouts", user="admin"),
        ev("get", "modelrollouts", at=61),
        ev("get", "modelrollouts", at=-1),
        ev("get", "modelrollouts", stage="ResponseStarted"),
    ]
    r = count_requests(events, OPERATOR_USER, T0, T0 + timedelta(seconds=60))
    assert r.total == 6
    assert r.writes == 2
    assert r.by_verb == {"get": 2, "update": 1, "patch": 1, "list": 1, "watch": 1}
    assert r.by_call["update modelrollouts/status"] == 1
    assert r.by_call["get httproutes"] == 1
    assert dict(r.failed) == {500: 1}


def test_proc_parsers() -> None:
    # A process name with spaces and parentheses; utime 250 and stime 50 ticks.
    stat = "4242 (python (op) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 100 1000 2000"
    assert proc_cpu_seconds(stat, 100) == pytest.approx(3.0)
    assert rss_mib("Name:\tpython\nVmRSS:\t  204800 kB\nThreads: 3\n") == 200.0
    with pytest.raises(ValueError):
        rss_mib("Name:\tpython\n")


def test_prometheus_queries_counts_query_handlers_only() -> None:
    text = (
        "# HELP prometheus_http_requests_total Counter of HTTP requests.\n"
        "# TYPE prometheus_http_requests_total counter\n"
        'prometheus_http_requests_total{code="200",handler="/api/v1/query"} 40\n'
        'prometheus_http_requests_total{code="400",handler="/api/v1/query"} 2\n'
        'prometheus_http_requests_total{code="200",handler="/api/v1/query_range"} 3\n'
        'prometheus_http_requests_total{code="200",handler="/metrics"} 100\n'
    )
    assert prometheus_queries(text) == 45


def test_series_left_counts_only_the_named_objects() -> None:
    text = (
        "# TYPE mlrollouts_phase gauge\n"
        'mlrollouts_phase{kind="ModelRollout",namespace="ml",name="scale-1",phase="Aborted"} 1\n'
        'mlrollouts_phase{kind="ModelRollout",namespace="ml",name="scale-1",phase="Paused"} 0\n'
        'mlrollouts_phase{kind="ModelRollout",namespace="other",name="scale-1",phase="Paused"} 0\n'
        'mlrollouts_phase{kind="ModelRollout",namespace="ml",name="keep",phase="Paused"} 1\n'
        "# TYPE mlrollouts_leader gauge\n"
        "mlrollouts_leader 1\n"
    )
    assert series_left(text, "ml", ["scale-0", "scale-1"]) == 2
    assert series_left(text, "ml", []) == 0


def test_audit_events_streams_rotated_files_first_and_skips_partial_lines(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    (tmp_path / "audit-2026-12-07T13-00-00.000.log").write_text(json.dumps(ev("get", "a")) + "\n")
    log.write_text(json.dumps(ev("get", "b")) + "\n" + '{"kind": "Ev')
    (tmp_path / "audit-policy.json").write_text("{}")
    got = [e["objectRef"]["resource"] for e in audit_events(log)]
    assert got == ["a", "b"]
