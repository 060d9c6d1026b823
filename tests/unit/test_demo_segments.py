"""The demo's segment story (tests/harness/demo_segments.py) sets up what it tells."""

from __future__ import annotations

import pytest

from model_rollouts.api.rollout import ModelRolloutSpec
from tests.harness import demo_segments as d


def test_the_candidate_is_better_overall_and_two_margins_worse_in_one_region() -> None:
    rates = d.CANDIDATE_RATES
    assert set(rates) == set(d.REGIONS)
    assert sum(rates.values()) / len(rates) > d.STABLE_RATE  # better on average (equal traffic)
    assert rates[d.HARMED] == pytest.approx(d.STABLE_RATE - 2 * d.MARGIN)
    assert all(rates[r] > d.STABLE_RATE for r in d.REGIONS if r != d.HARMED)


def test_the_rollout_is_a_valid_segmented_comparison_on_the_demo_route() -> None:
    doc = d.rollout_doc("http://127.0.0.1:9090", "fraud-scorer-v2", "fraud-scorer-v3")
    spec = ModelRolloutSpec.model_validate(doc["spec"])
    [c] = spec.analysis.comparisons
    assert c.segments is not None and c.segments.label == "region"
    assert list(c.segments.values) == list(d.REGIONS) and c.margin == d.MARGIN
    assert doc["metadata"]["name"] == "fraud-scorer"  # the route's one owner, a new revision


def test_segment_rows_are_read_from_the_last_analysis() -> None:
    row = {"segment": "west", "status": "fail", "stableN": 200.0, "candidateN": 190.0}
    obj = {"status": {"lastAnalysis": [{"name": "positive-feedback", "segments": [row]}]}}
    assert d.segment_rows(obj) == [row]
    assert d.segment_rows({"status": {}}) == []
