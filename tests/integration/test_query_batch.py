"""One Prometheus request per analysis, on the real Prometheus (metrics/batch.py, query_many).

The batched answers equal the single-query answers for real queries on real series, and one
analysis of a rollout with a guardrail and a comparison (five queries) is one request, counted by
Prometheus itself (``prometheus_http_requests_total{handler="/api/v1/query"}`` on its /metrics).
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator

import pytest

from model_rollouts.metrics.prometheus import PrometheusProvider
from model_rollouts.metrics.provider import render
from tests.harness.objects import CANDIDATE, STABLE, fraud_stack, fresh_fraud, phase, rollout
from tests.harness.queries import ERROR_RATE, FEEDBACK, POSITIVE, REQUESTS
from tests.harness.stack import Stack


@pytest.fixture(scope="module")
def stack(real_components: None) -> Iterator[Stack]:
    with fraud_stack(max_seconds=600) as s:
        yield s


@pytest.fixture()
def fresh(stack: Stack) -> Iterator[Stack]:
    yield from fresh_fraud(stack, "modelrollouts", restart_operator=True)


def query_requests(stack: Stack) -> float:
    """Instant-query HTTP requests Prometheus has answered (any code), from its own /metrics."""
    assert stack.prom is not None
    with urllib.request.urlopen(stack.prom.url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("prometheus_http_requests_total{") and 'handler="/api/v1/query"' in line
    )


def at(promql: str, t: int) -> str:
    """``promql`` with every range selector evaluated at the fixed time ``t`` (so that asking it a
    moment later gives the same answer)."""
    return promql.replace("]", f"] @ {t}")


def test_batched_answers_equal_single_answers_on_real_series(fresh: Stack) -> None:
    assert fresh.prom is not None
    time.sleep(12)  # ten seconds of traffic and feedback in Prometheus
    t = int(time.time()) - 2
    arms = {svc: {"service": svc, "window": "10s"} for svc in (STABLE, CANDIDATE)}
    queries = [
        at(render(ERROR_RATE, arms[STABLE]), t),
        at(render(POSITIVE, arms[STABLE]), t),
        at(render(FEEDBACK, arms[STABLE]) + "  # feedback of the stable", t),
        at(render(REQUESTS, arms[STABLE]), t),
        at(render(ERROR_RATE, arms[CANDIDATE]), t),  # no traffic on the candidate: 0/0, NaN
        'sum(model_requests_total{service="no-such-service"})',  # no data
        f'sum(model_requests_total{{service="{STABLE}"}} @ {t}) * 0 / 0',  # NaN
        f"sum by (service) (model_requests_total @ {t})",  # two series: an error
    ]
    p = PrometheusProvider(fresh.prom.url, timeout_s=5)
    alone = [p.query(q, budget="it-batch-alone") for q in queries]
    assert [r.outcome for r in alone] == ["value"] * 4 + ["nan", "noData", "nan", "error"], alone
    assert alone[2].value is not None and alone[2].value > 0, "no feedback in Prometheus yet"
    before = query_requests(fresh)
    batched = p.query_many(queries, budget="it-batch")
    assert query_requests(fresh) - before == 1
    assert batched == alone

    # A scalar subquery: label_replace refuses it (400), so each query is asked alone.
    scalar = f'scalar(sum(model_requests_total{{service="{STABLE}"}} @ {t}))'
    with_scalar = [*queries[:2], scalar, queries[5]]
    before = query_requests(fresh)
    got = p.query_many(with_scalar, budget="it-batch")
    assert query_requests(fresh) - before == 1 + len(with_scalar)
    assert got == [alone[0], alone[1], p.query(scalar, budget="it-batch-alone"), alone[5]]
    assert got[2].outcome == "value"


def test_one_analysis_of_a_guardrail_and_a_comparison_is_one_request(fresh: Stack) -> None:
    assert fresh.prom is not None
    fresh.apply(rollout("batched", fresh.prom.url, [{"setWeight": 20}, {"analysis": {"duration": "10m"}}]))

    def analysed_at() -> str | None:
        return (fresh.get("modelrollouts", "batched").get("status") or {}).get("lastAnalysisTime")

    def next_analysis(after: str | None, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = analysed_at()
            if now is not None and now != after:
                return now
            time.sleep(0.2)
        raise AssertionError(f"no analysis after {after} in {timeout}s")

    last = next_analysis(next_analysis(None, 60))  # running, at 20%, one analysis after another
    before = query_requests(fresh)
    for _ in range(3):
        last = next_analysis(last)
    sent = query_requests(fresh) - before
    obj = fresh.get("modelrollouts", "batched")
    assert phase(obj) == "Progressing", obj.get("status")
    measured = {m["name"]: m for m in obj["status"]["lastAnalysis"]}
    assert measured["error-rate"]["outcome"] == "value", measured
    assert measured["positive-feedback"]["outcome"] == "value", measured
    # Three analyses, five queries each (the guardrail, successes and trials of both arms): three requests.
    assert sent == 3, sent
