"""Tests for Thompson-sampling allocation under guardrails."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model_rollouts.analysis.stats import ProportionData
from model_rollouts.engine.bandit import thompson_weights

ARMS = {"a": ProportionData(100, 1000), "b": ProportionData(130, 1000), "c": ProportionData(90, 1000)}
EVEN = {"a": 34, "b": 33, "c": 33}


def test_sums_to_100_and_respects_min_weight_and_step() -> None:
    w = thompson_weights(ARMS, EVEN, min_weight=5, max_step=10)
    assert sum(w.values()) == 100
    assert set(w) == set(ARMS)
    assert all(v >= 5 for v in w.values())
    assert all(abs(w[k] - EVEN[k]) <= 10 for k in w)
    assert w["b"] == 43  # the clear leader takes the whole step


def test_target_is_proportional_to_probability_to_be_best_when_unconstrained() -> None:
    w = thompson_weights(ARMS, EVEN, min_weight=0, max_step=100)
    assert w["b"] >= 97


def test_excluded_arm_drops_to_zero_immediately() -> None:
    w = thompson_weights(ARMS, {"a": 10, "b": 80, "c": 10}, min_weight=5, max_step=10, excluded=["b"])
    assert w["b"] == 0
    assert sum(w.values()) == 100
    # 80 points had to go somewhere: the step limit widens just enough for the others to absorb them
    assert w == {"a": 50, "b": 0, "c": 50}


def test_exclusion_within_step_keeps_step() -> None:
    w = thompson_weights(ARMS, {"a": 45, "b": 10, "c": 45}, min_weight=5, max_step=10, excluded=["b"])
    assert w["b"] == 0 and sum(w.values()) == 100
    assert abs(w["a"] - 45) <= 10 and abs(w["c"] - 45) <= 10


def test_better_arm_gains_weight_over_updates() -> None:
    rng = np.random.default_rng(0)
    rates = {"control": 0.10, "b": 0.13}
    counts = {k: [0, 0] for k in rates}
    weights = {"control": 50, "b": 50}
    history = []
    for step in range(12):
        for k, rate in rates.items():
            n = 20 * weights[k]
            counts[k][0] += int(rng.binomial(n, rate))
            counts[k][1] += n
        arms = {k: ProportionData(s, n) for k, (s, n) in counts.items()}
        weights = thompson_weights(arms, weights, min_weight=10, max_step=10, seed=step)
        history.append(weights["b"])
        assert sum(weights.values()) == 100
    assert history[-1] == 90
    assert all(later >= earlier - 10 for earlier, later in itertools.pairwise(history))


def test_deterministic_given_seed() -> None:
    close = {"a": ProportionData(100, 1000), "b": ProportionData(104, 1000)}
    cur = {"a": 50, "b": 50}
    assert thompson_weights(close, cur, min_weight=5, max_step=50, seed=3) == thompson_weights(
        close, cur, min_weight=5, max_step=50, seed=3
    )


def test_lower_is_better() -> None:
    w = thompson_weights(ARMS, EVEN, min_weight=5, max_step=30, better="lower")
    assert w["c"] == max(w.values())


def test_current_below_floor_is_lifted() -> None:
    w = thompson_weights(ARMS, {"a": 0, "b": 100, "c": 0}, min_weight=5, max_step=2)
    assert w == {"a": 5, "b": 90, "c": 5}


def test_new_arm_missing_from_current() -> None:
    w = thompson_weights(ARMS, {"a": 50, "b": 50}, min_weight=10, max_step=10)
    assert sum(w.values()) == 100 and w["c"] >= 10


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_weight": 40, "max_step": 10}, "min_weight"),
        ({"min_weight": -1, "max_step": 10}, "min_weight"),
        ({"min_weight": 5, "max_step": -1}, "max_step"),
        ({"min_weight": 5, "max_step": 10, "excluded": ["a", "b", "c"]}, "excluded"),
    ],
)
def test_invalid(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        thompson_weights(ARMS, EVEN, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="current"):
        thompson_weights(ARMS, {"a": 150}, min_weight=5, max_step=10)
    with pytest.raises(ValueError, match="arms"):
        thompson_weights({}, {}, min_weight=5, max_step=10)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    data=st.lists(st.tuples(st.integers(0, 500), st.integers(0, 500)), min_size=2, max_size=5),
    raw=st.lists(st.integers(1, 100), min_size=5, max_size=5),
    min_weight=st.integers(0, 20),
    max_step=st.integers(0, 30),
    n_excluded=st.integers(0, 1),
)
def test_invariants(
    data: list[tuple[int, int]], raw: list[int], min_weight: int, max_step: int, n_excluded: int
) -> None:
    names = [f"v{i}" for i in range(len(data))]
    arms = {n: ProportionData(s, s + f) for n, (s, f) in zip(names, data, strict=True)}
    # a valid current split summing to 100 that respects the floor
    shares = np.array(raw[: len(names)], dtype=float)
    base = min_weight * len(names)
    if base > 100:
        return
    cur_f = min_weight + (100 - base) * shares / shares.sum()
    cur = np.floor(cur_f).astype(int)
    cur[0] += 100 - cur.sum()
    current = dict(zip(names, (int(x) for x in cur), strict=True))
    excluded = names[:n_excluded]
    w = thompson_weights(
        arms, current, min_weight=min_weight, max_step=max_step, excluded=excluded, draws=2000
    )
    assert sum(w.values()) == 100
    for n in names:
        if n in excluded:
            assert w[n] == 0
        else:
            assert w[n] >= min_weight
            if not excluded:
                assert abs(w[n] - current[n]) <= max_step
