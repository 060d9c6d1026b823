"""``labelDelay`` on a ModelRollout comparison: the handler counts labels and trials over the label
windows of ``analysis.delay`` and gives no counts (no verdict) before the first labels are complete."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from model_rollouts.analysis.stats import ProportionData as P
from model_rollouts.api.rollout import Comparison, ModelRolloutStatus
from model_rollouts.engine import rollout as eng
from model_rollouts.handlers import common
from model_rollouts.handlers import rollout as handler
from model_rollouts.metrics.errors import ProviderError
from model_rollouts.metrics.provider import Result
from model_rollouts.metrics.resolve import check_queries
from tests.unit.test_rollout_engine import T0, spec

POS = 'sum(increase(fb{service="{{ service }}",feedback="pos"}[{{ window }}]))'
REQ = 'sum(increase(req{service="{{ service }}"}[{{ window }}] offset {{ labelDelay }}))'


def comparison(**extra: Any) -> dict[str, Any]:
    return {"name": "ctr", "successes": POS, "trials": REQ, "margin": 0.05, "labelDelay": "10m", **extra}


class Provider:
    def __init__(self) -> None:
        self.queries: list[str] = []

    def query(self, promql: str) -> Result:
        self.queries.append(promql)
        return Result("value", 30.0 if "fb{" in promql else 100.0)


def _measure(
    age: timedelta, monkeypatch: pytest.MonkeyPatch, **extra: Any
) -> tuple[eng.Observations, Provider]:
    s = spec(
        [{"setWeight": 50}, {"analysis": {"duration": "10s"}}],
        analysis={"comparisons": [comparison(**extra)]},
    )
    st = ModelRolloutStatus(weight=50, epochStartedAt=T0, revisionStartedAt=T0)
    monkeypatch.setattr(common, "now", lambda: T0 + age)
    monkeypatch.setattr(handler, "candidate_ready", lambda *_: None)
    p = Provider()
    return handler.measure(s, st, p, "ns"), p  # type: ignore[arg-type]


def test_no_counts_and_no_queries_before_the_first_labels_are_complete(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    obs, p = _measure(timedelta(minutes=9), monkeypatch)
    d = obs.comparisons["ctr"]
    assert d.stable == P(0, 0) and d.candidate == P(0, 0)
    assert not [q for q in p.queries if "fb{" in q or "req{" in q]


def test_labels_after_the_delay_and_trials_offset_by_it(monkeypatch: pytest.MonkeyPatch) -> None:
    obs, p = _measure(timedelta(minutes=25), monkeypatch)
    assert obs.comparisons["ctr"].stable == P(30, 100)
    fb = [q for q in p.queries if "fb{" in q]
    req = [q for q in p.queries if "req{" in q]
    assert len(fb) == 2 and all("[900s]" in q for q in fb)  # labels: (start + 10m, now]
    assert len(req) == 2 and all("[900s] offset 600s" in q for q in req)  # trials: (start, now - 10m]


def test_without_label_delay_the_window_is_the_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    obs, p = _measure(
        timedelta(minutes=25),
        monkeypatch,
        labelDelay=None,
        trials=REQ.replace(" offset {{ labelDelay }}", ""),
    )
    assert obs.comparisons["ctr"].stable == P(30, 100)
    assert all("[1500s]" in q for q in p.queries if "fb{" in q or "req{" in q)


def test_engine_gives_no_verdict_on_an_epoch_without_complete_labels() -> None:
    from tests.unit.test_rollout_engine import Driver, ok

    d = Driver(
        spec([{"setWeight": 50}, {"analysis": {"duration": "10s"}}], analysis={"comparisons": [comparison()]})
    )
    d.tick()
    zero = eng.ComparisonData(stable=P(0, 0), candidate=P(0, 0))
    st = d.tick(eng.Observations(guardrails=ok().guardrails, comparisons={"ctr": zero}))
    m = next(x for x in st.lastAnalysis if x.name == "ctr")
    assert m.verdict == "inconclusive" and st.phase == "Progressing" and st.weight == 50


def test_label_delay_spec() -> None:
    assert Comparison.model_validate(comparison()).labelDelay == "10m"
    with pytest.raises(ValidationError, match="24h"):
        Comparison.model_validate(comparison(labelDelay="25h"))
    s = spec([{"setWeight": 50}], analysis={"comparisons": [comparison()]})
    check_queries(handler._queries(s))  # {{ labelDelay }} is allowed with labelDelay
    plain = spec([{"setWeight": 50}], analysis={"comparisons": [comparison(labelDelay=None)]})
    with pytest.raises(ProviderError, match="labelDelay"):
        check_queries(handler._queries(plain))
