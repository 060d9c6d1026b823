"""One HTTP request per analysis (metrics/batch.py, PrometheusProvider.query_many): each query's outcome
is what asking it alone gives; a refused batch is asked one by one; a timeout is not asked again.

The HTTP tests run the real provider (prometheus-api-client, requests, the gate) against a small
loopback server that answers like Prometheus: a batched query is answered from each subquery's own
answer with the index label added, as ``label_replace(...) or ...`` does (tests/integration/
test_query_batch.py checks that against the real Prometheus).
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.parse
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from model_rollouts.api.rollout import ModelRolloutStatus
from model_rollouts.handlers import experiment as exp_handler
from model_rollouts.handlers import rollout as handler
from model_rollouts.metrics import prometheus
from model_rollouts.metrics.batch import in_one_request
from model_rollouts.metrics.prometheus import (
    BATCH_LABEL,
    PrometheusProvider,
    batched_query,
    interpret,
    split_batch,
)
from model_rollouts.metrics.provider import Budgeted, Result, Vector
from tests.unit.test_experiment_engine import make_spec as experiment_spec
from tests.unit.test_experiment_engine import started
from tests.unit.test_rollout_engine import T0, spec

T = 1700000000.0
#: Each query's answer alone (Prometheus's data.result): a value, none, NaN, two series, +Inf.
ANSWERS: dict[str, Any] = {
    "value": [{"metric": {"service": "a"}, "value": [T, "0.25"]}],
    "empty": [],
    "nan": [{"metric": {}, "value": [T, "NaN"]}],
    "two": [{"metric": {"code": "200"}, "value": [T, "1"]}, {"metric": {"code": "500"}, "value": [T, "2"]}],
    "inf": [{"metric": {"__name__": "x"}, "value": [T, "+Inf"]}],
    "zero": [{"metric": {}, "value": [T, "0"]}],
}
_SUB = re.compile(r'label_replace\(\(\n(.*?)\n\), "' + BATCH_LABEL + r'", "(\d+)", "", ""\)', re.S)


class FakePrometheus:
    """``/api/v1/query`` on loopback: single queries from ANSWERS (``scalar`` a scalar, anything else
    no data), batched ones from theirs; ``batch_status`` refuses batches, ``batch_sleep`` delays them."""

    def __init__(self) -> None:
        self.queries: list[str] = []
        self.batch_status = 200
        self.batch_sleep = 0.0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                q = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)["query"][0]
                fake.queries.append(q)
                status, body = fake.answer(q)
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (its timeout)

            do_POST = do_GET

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, q: str) -> tuple[int, dict[str, Any]]:
        subs = _SUB.findall(q)
        if not subs:
            if q == "scalar":
                return 200, {"status": "success", "data": {"resultType": "scalar", "result": [T, "3"]}}
            return 200, _vector(ANSWERS.get(q, []))
        time.sleep(self.batch_sleep)
        if self.batch_status != 200 or any(sub == "scalar" for sub, _ in subs):
            return self.batch_status if self.batch_status != 200 else 400, {
                "status": "error",
                "errorType": "bad_data",
                "error": "secret detail",
            }
        out = [
            {**s, "metric": {**s["metric"], BATCH_LABEL: i}} for sub, i in subs for s in ANSWERS.get(sub, [])
        ]
        return 200, _vector(out)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _vector(result: list[Any]) -> dict[str, Any]:
    return {"status": "success", "data": {"resultType": "vector", "result": result}}


@pytest.fixture
def prom() -> Iterator[FakePrometheus]:
    p = FakePrometheus()
    yield p
    p.close()


_budgets = iter(range(1_000_000))


def budget() -> str:
    """A budget key of its own per test (gates and cool-downs are per key, process-wide)."""
    return f"test-batch-{next(_budgets)}"


def singles(p: PrometheusProvider, promqls: list[str], key: str) -> list[Result]:
    return [p.query(q, budget=key) for q in promqls]


# -- the rewrite and the split ----------------------------------------------------------------------


def test_the_batched_query_labels_each_subquery_on_its_own_lines() -> None:
    q = batched_query(['sum(up{job="a"}) # a comment', "vector(1)"])
    assert q == (
        f'label_replace((\nsum(up{{job="a"}}) # a comment\n), "{BATCH_LABEL}", "0", "", "") or '
        f'label_replace((\nvector(1)\n), "{BATCH_LABEL}", "1", "", "")'
    )


def test_each_part_of_a_batched_answer_is_read_as_its_own_answer() -> None:
    names = list(ANSWERS)
    batched = [
        {**s, "metric": {**s["metric"], BATCH_LABEL: str(i)}} for i, n in enumerate(names) for s in ANSWERS[n]
    ]
    got = split_batch(list(reversed(batched)), len(names))
    assert got == [interpret(ANSWERS[n]) for n in names]
    assert [r.outcome for r in got] == ["value", "noData", "nan", "error", "nan", "value"]
    assert got[3].message == "the query returned 2 series; aggregate it to one (sum)"


def test_a_batched_answer_without_the_index_label_is_an_error_for_all() -> None:
    got = split_batch([{"metric": {}, "value": [T, "1"]}], 2)
    assert [r.outcome for r in got] == ["error", "error"]
    assert split_batch([{"metric": {BATCH_LABEL: "2"}, "value": [T, "1"]}], 2)[0].outcome == "error"
    assert split_batch([T, "1"], 2)[1].outcome == "error"


# -- the provider, over HTTP -------------------------------------------------------------------------


def test_one_request_answers_each_query_as_alone(prom: FakePrometheus) -> None:
    p = PrometheusProvider(prom.url, timeout_s=2)
    key = budget()
    promqls = ["value", "empty", "nan", "two", "inf", "zero", "value"]  # one repeated
    alone = singles(p, promqls, key)
    prom.queries.clear()
    assert p.query_many(promqls, budget=key) == alone
    assert len(prom.queries) == 1 and prom.queries[0] == batched_query(promqls[:-1])


def test_a_batch_of_one_is_the_query_itself(prom: FakePrometheus) -> None:
    p = PrometheusProvider(prom.url, timeout_s=2)
    assert p.query_many(["value", "value"], budget=budget()) == [Result("value", 0.25)] * 2
    assert prom.queries == ["value"]


@pytest.mark.parametrize("status", [400, 422])
def test_a_refused_batch_asks_each_query_alone(prom: FakePrometheus, status: int) -> None:
    p = PrometheusProvider(prom.url, timeout_s=2)
    key = budget()
    promqls = ["value", "empty", "two"]
    alone = singles(p, promqls, key)
    prom.queries.clear()
    prom.batch_status = status
    assert p.query_many(promqls, budget=key) == alone
    assert prom.queries == [batched_query(promqls), *promqls]


def test_a_scalar_subquery_falls_back_and_keeps_its_own_outcome(prom: FakePrometheus) -> None:
    p = PrometheusProvider(prom.url, timeout_s=2)
    got = p.query_many(["value", "scalar", "nan"], budget=budget())
    assert got == [Result("value", 0.25), Result("value", 3.0), interpret(ANSWERS["nan"])]
    assert len(prom.queries) == 4


def test_a_timed_out_batch_is_every_querys_error_and_not_asked_again(prom: FakePrometheus) -> None:
    p = PrometheusProvider(prom.url, timeout_s=0.2)
    prom.batch_sleep = 1.5
    t0 = time.monotonic()
    got = p.query_many(["value", "empty", "nan"], budget=budget())
    took = time.monotonic() - t0
    assert [r.outcome for r in got] == ["error"] * 3
    # What one query gets when its read times out (requests reports it as either, by where it waited).
    assert len({r.message for r in got}) == 1, got
    assert got[0].message in ("query failed: ReadTimeout", "query failed: ConnectionError"), got
    assert len(prom.queries) == 1  # no one-by-one after a timeout
    # The batch waited for its three queries' time (3 x 0.2 s), not one query's.
    assert 0.5 <= took < 1.4, took


def test_the_batch_waits_as_long_as_its_queries_would(prom: FakePrometheus) -> None:
    p = PrometheusProvider(prom.url, timeout_s=0.4)
    prom.batch_sleep = 0.6  # longer than one query's timeout, within three queries'
    got = p.query_many(["value", "empty", "nan"], budget=budget())
    assert got[0] == Result("value", 0.25) and got[1].outcome == "noData"


def test_server_errors_and_an_open_gate_are_every_querys_outcome(prom: FakePrometheus) -> None:
    p = PrometheusProvider(prom.url, timeout_s=2)
    key = budget()
    prom.batch_status = 503
    got = p.query_many(["value", "empty"], budget=key)
    assert got == [Result("error", message="query failed: PrometheusApiClientException (HTTP 503)")] * 2
    assert len(prom.queries) == 1
    dead = PrometheusProvider("http://127.0.0.1:9", timeout_s=1)  # nothing listens: refused, cool-down
    key = budget()
    first = dead.query_many(["a", "b"], budget=key)
    assert [r.message for r in first] == ["query failed: ConnectionError"] * 2
    again = dead.query_many(["a", "b"], budget=key)
    assert all(r.message.startswith("query failed: provider unavailable") for r in again), again


def test_the_response_limit_is_per_subquery(prom: FakePrometheus, monkeypatch: pytest.MonkeyPatch) -> None:
    p = PrometheusProvider(prom.url, timeout_s=2)
    key = budget()
    promqls = ["value", "two", "nan", "zero"]
    one = max(len(json.dumps(_vector(ANSWERS[q])).encode()) for q in promqls)
    batch = len(json.dumps(prom.answer(batched_query(promqls))[1]).encode())
    assert batch > one + 100
    # Each answer alone fits; the batch fits in four of them, not in one.
    monkeypatch.setattr(prometheus, "MAX_RESPONSE_BYTES", one + 100)
    alone = singles(p, promqls, key)
    assert all("larger than" not in r.message for r in alone)
    prom.queries.clear()
    assert p.query_many(promqls, budget=key) == alone and len(prom.queries) == 1
    # Too large even so (a subquery's own answer is too large): each is asked alone, as without batching.
    monkeypatch.setattr(prometheus, "MAX_RESPONSE_BYTES", 60)
    prom.queries.clear()
    assert p.query_many(promqls, budget=key) == singles(p, promqls, key)
    assert len(prom.queries) == 1 + 2 * len(promqls)


def test_many_queries_go_in_bounded_batches(prom: FakePrometheus) -> None:
    p = PrometheusProvider(prom.url, timeout_s=2)
    promqls = [f"value + {i}" for i in range(prometheus.MAX_BATCH + 3)]
    long = ["x" * 2500 + str(i) for i in range(4)]
    got = p.query_many(promqls + long, budget=budget())
    assert [r.outcome for r in got] == ["noData"] * len(promqls + long)
    sizes = [len(_SUB.findall(q)) or 1 for q in prom.queries]
    assert sizes[0] == prometheus.MAX_BATCH and sum(sizes) == len(promqls + long), sizes
    assert 3 <= len(sizes) < 2 + len(long), sizes  # the long ones share requests, within the URL limit
    batched = [q for q in prom.queries if _SUB.findall(q)]
    assert all(len(urllib.parse.quote_plus(q)) <= prometheus.MAX_BATCH_URL for q in batched)


def test_budgeted_batch_after_the_budget_is_skipped_for_all() -> None:
    class Never:
        def query(self, promql: str) -> Result:
            raise AssertionError("asked")

        def query_vector(self, promql: str, labels: tuple[str, ...]) -> Vector:
            raise AssertionError("asked")

    b = Budgeted(Never(), 0)  # type: ignore[arg-type]
    got = b.query_many(["a", "b"])
    assert [r.outcome for r in got] == ["error", "error"] and "budget" in got[0].message


# -- the two-pass wrapper ----------------------------------------------------------------------------


class Fake:
    """Answers by query text; records single queries and batches. ``many``: it can batch."""

    def __init__(self, answers: dict[str, Result], many: bool = True) -> None:
        self.answers, self.singles, self.batches = answers, [], []  # type: ignore[var-annotated]
        if not many:
            self.query_many = None  # type: ignore[assignment]

    def _answer(self, promql: str) -> Result:
        for marker, r in self.answers.items():
            if marker in promql:
                return r
        return Result("value", 100.0)

    def query(self, promql: str) -> Result:
        self.singles.append(promql)
        return self._answer(promql)

    def query_vector(self, promql: str, labels: tuple[str, ...]) -> Vector:
        return Vector("noData")

    def query_many(self, promqls: list[str]) -> list[Result]:  # type: ignore[no-redef]
        self.batches.append(list(promqls))
        return [self._answer(q) for q in promqls]


POS = 'sum(increase(fb{service="{{ service }}",feedback="pos"}[{{ window }}]))'
ALL = 'sum(increase(fb{service="{{ service }}"}[{{ window }}]))'
ERR = 'sum(rate(err{service="{{ service }}"}[{{ window }}]))'


def rollout_spec() -> Any:
    return spec(
        [{"setWeight": 50}, {"analysis": {"duration": "10s"}}],
        analysis={
            "guardrails": [{"name": "errors", "query": ERR, "max": 0.05}],
            "comparisons": [{"name": "ctr", "successes": POS, "trials": ALL, "margin": 0.05}],
        },
    )


CASES = {
    "all values": {},
    "stable successes fail": {'fb{service="v1",feedback': Result("error", message="query failed: x")},
    "candidate trials without data": {'fb{service="v2"}': Result("noData", message="none")},
    "guardrail NaN": {"err{": Result("nan", message="NaN")},
}


@pytest.mark.parametrize("case", list(CASES))
def test_batched_rollout_measure_observes_what_the_plain_measure_does(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(handler, "candidate_ready", lambda *_: None)
    s, st = rollout_spec(), ModelRolloutStatus(weight=50, epochStartedAt=T0, revisionStartedAt=T0)
    at = T0 + timedelta(minutes=3)
    plain = Fake(CASES[case])
    expected = handler.measure(s, st, plain, "ns", at)  # type: ignore[arg-type]
    fake = Fake(CASES[case])
    got = in_one_request(fake, lambda p: handler.measure(s, st, p, "ns", at))  # type: ignore[arg-type]
    assert got == expected
    assert fake.singles == [] and len(fake.batches) == 1
    # Every query the plain measure asked is in the one batch (and only the ones it could ask).
    assert set(plain.singles) <= set(fake.batches[0])
    assert len(fake.batches[0]) == 5  # guardrail + successes and trials of both arms
    assert len(set(plain.singles)) == (5 if case != "stable successes fail" else 2)


def test_without_query_many_the_wrapper_asks_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handler, "candidate_ready", lambda *_: None)
    s, st = rollout_spec(), ModelRolloutStatus(weight=50, epochStartedAt=T0, revisionStartedAt=T0)
    fake = Fake({}, many=False)
    got = in_one_request(fake, lambda p: handler.measure(s, st, p, "ns", T0))  # type: ignore[arg-type]
    assert got == handler.measure(s, st, Fake({}), "ns", T0)  # type: ignore[arg-type]
    assert len(fake.singles) == 5


def test_a_recording_that_raises_runs_the_plain_measure() -> None:
    calls: list[object] = []

    def measure(p: Any) -> str:
        calls.append(p)
        if len(calls) == 1:
            raise ValueError("only while recording")
        return "plain"

    fake = Fake({})
    assert in_one_request(fake, measure) == "plain"  # type: ignore[arg-type]
    assert calls[1] is fake and fake.batches == []


def test_batched_experiment_measure_observes_what_the_plain_measure_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(exp_handler, "service_ready", lambda *_: None)
    s = experiment_spec(
        3,
        analysis={"requests": 'sum(req{service="{{ service }}"})'},
        primaryMetric={
            "successes": 'sum(ok{service="{{ service }}"})',
            "trials": 'sum(n{service="{{ service }}"})',
        },
        guardrails=[{"name": "error-rate", "query": 'sum(e{service="{{ service }}"})', "max": 0.05}],
    )
    st = started(s).status
    at = T0 + timedelta(minutes=2)
    answers = {'ok{service="svc-b"}': Result("noData", message="none"), "e{": Result("value", 0.01)}
    expected = exp_handler.measure(s, st, Fake(answers), "ns", at)  # type: ignore[arg-type]
    fake = Fake(answers)
    got = in_one_request(fake, lambda p: exp_handler.measure(s, st, p, "ns", at))  # type: ignore[arg-type]
    assert got == expected
    assert fake.singles == [] and len(fake.batches) == 1
    assert len(fake.batches[0]) == 3 * 4  # per variant: successes, trials, the guardrail, requests
    assert got.variants["v1"].problem is not None and got.variants["v1"].problem.outcome == "noData"
