"""One HTTP request for the scalar queries of one analysis, without changing what it measures.

A measurement (a rollout's or an experiment's ``measure``) asks its provider one query at a time and
stops early where a measurement fails (no trials query after a failed successes query). To send its
queries together, :func:`in_one_request` runs it twice:

1. with a recording provider that answers every scalar query with a value (so nothing stops early:
   the queries recorded are every query it could ask) and every vector query with no data;
2. once ``provider.query_many`` has answered all of them in one request (metrics/prometheus.py:
   the same instant, each query's own outcome), with a provider that replays those answers and
   forwards to the real provider anything else (a query the first run did not ask, every vector
   query of the model judges).

What the second run observes is what it would have observed asking one query at a time, at the
instant of the batch. The measurement must be a function of its provider's answers (take "now" once,
before both runs: a window rendered a second later would be another query).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from model_rollouts.metrics.provider import MetricProvider, Result, Vector, ask_many

T = TypeVar("T")

#: What the recording provider answers every scalar query (any value passes the outcome checks that
#: decide whether a measurement goes on).
_RECORDED = Result("value", value=1.0)


class _Recording:
    """Answers every scalar query with a value and keeps its text; vector queries have no data."""

    def __init__(self) -> None:
        self.promqls: list[str] = []

    def query(self, promql: str) -> Result:
        self.promqls.append(promql)
        return _RECORDED

    def query_vector(self, promql: str, labels: tuple[str, ...]) -> Vector:
        return Vector("noData", message="not asked while recording")

    def query_many(self, promqls: Sequence[str]) -> list[Result]:
        return [self.query(q) for q in promqls]


class _Replaying:
    """Answers from a batch; anything not in it goes to the real provider."""

    def __init__(self, inner: MetricProvider, answers: Mapping[str, Result]) -> None:
        self.inner, self.answers = inner, answers

    def query(self, promql: str) -> Result:
        answer = self.answers.get(promql)
        return answer if answer is not None else self.inner.query(promql)

    def query_vector(self, promql: str, labels: tuple[str, ...]) -> Vector:
        return self.inner.query_vector(promql, labels)

    def query_many(self, promqls: Sequence[str]) -> list[Result]:
        return [self.query(q) for q in promqls]


def in_one_request(provider: MetricProvider, measure: Callable[[MetricProvider], T]) -> T:
    """``measure(provider)``, its scalar queries asked through one ``query_many`` (see the module).

    If the recording run raises (a template that fails only past an early stop), ``measure`` runs as
    it is, one query at a time, and its own outcome or exception is the result."""
    recording = _Recording()
    try:
        measure(recording)
    except Exception:
        return measure(provider)
    promqls = list(dict.fromkeys(recording.promqls))
    if not promqls:
        return measure(provider)
    answers = dict(zip(promqls, ask_many(provider, promqls), strict=True))
    return measure(_Replaying(provider, answers))
