"""Thompson-sampling traffic allocation under hard guardrails: pure functions, no I/O.

The target split is proportional to each arm's posterior probability to be best (Beta(1 + s, 1 + f)
posteriors, seeded Monte Carlo), on top of a floor of ``min_weight`` for every active arm.  The
returned split is the point closest (in squared error) to that target among integer splits that

1. sum to 100,
2. give every excluded arm 0 and every active arm at least ``min_weight``, and
3. move no arm by more than ``max_step`` from ``current``.

Rules 1 and 2 are hard.  Rule 3 yields only when it cannot hold together with 1 and 2 (for example
when a guardrail exclusion frees more weight than the remaining arms may absorb in one step, or
when ``current`` is below the floor): the step limit is then widened to the smallest integer that
makes a valid split possible, and that wider limit applies to every arm.  See docs/statistics.md.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from model_rollouts.analysis.stats import Better, ProportionData, probability_to_be_best

TOTAL = 100


def thompson_weights(
    arms: Mapping[str, ProportionData],
    current: Mapping[str, int],
    *,
    min_weight: int,
    max_step: int,
    excluded: Collection[str] = (),
    better: Better = "higher",
    draws: int = 10000,
    seed: int = 0,
) -> dict[str, int]:
    """New integer percentage weights for ``arms`` (keys of the result are the keys of ``arms``)."""
    names = list(arms)
    if not names:
        raise ValueError("arms must not be empty")
    for name in names:
        if not isinstance(arms[name], ProportionData):
            raise ValueError(f"arms[{name!r}] must be ProportionData")
    _check_int(min_weight, "min_weight", 0, TOTAL)
    _check_int(max_step, "max_step", 0, TOTAL)
    for name, w in current.items():
        _check_int(w, f"current[{name!r}]", 0, TOTAL)
    excluded_set = set(excluded)
    active = [n for n in names if n not in excluded_set]
    if not active:
        raise ValueError("all arms are excluded: no arm can receive traffic")
    if min_weight * len(active) > TOTAL:
        raise ValueError(f"min_weight {min_weight} x {len(active)} active arms exceeds {TOTAL}")

    ptb = probability_to_be_best([arms[n] for n in active], better=better, draws=draws, seed=seed)
    spare = TOTAL - min_weight * len(active)
    target = np.array([min_weight + spare * p for p in ptb], dtype=np.float64)
    cur = np.array([int(current.get(n, 0)) for n in active], dtype=np.float64)

    step = _feasible_step(cur, min_weight, max_step)
    lo = np.maximum(min_weight, cur - step)
    hi = np.minimum(TOTAL, cur + step)
    real = _project(target, lo, hi)
    ints = _round_preserving_sum(real, lo, hi, active)

    out = dict.fromkeys(names, 0)
    out.update(zip(active, ints, strict=True))
    return out


def _check_int(x: object, name: str, low: int, high: int) -> None:
    if isinstance(x, bool) or not isinstance(x, int | np.integer) or not low <= int(x) <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {x!r}")


def _feasible_step(cur: np.ndarray, min_weight: int, max_step: int) -> int:
    """Smallest step >= max_step for which the box [max(min, cur - step), min(100, cur + step)]
    contains a split summing to 100."""
    for step in range(max_step, TOTAL + 1):
        lo = np.maximum(min_weight, cur - step)
        hi = np.minimum(TOTAL, cur + step)
        if lo.sum() <= TOTAL <= hi.sum():
            return step
    return TOTAL  # unreachable: with step 100 the box is [min_weight, 100] for every arm


def _project(target: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Euclidean projection of ``target`` onto {w : lo <= w <= hi, sum w = 100}: clip(target + shift)."""
    lo_shift = float(np.min(lo - target)) - 1.0
    hi_shift = float(np.max(hi - target)) + 1.0
    for _ in range(200):
        mid = (lo_shift + hi_shift) / 2.0
        if np.clip(target + mid, lo, hi).sum() < TOTAL:
            lo_shift = mid
        else:
            hi_shift = mid
    return np.asarray(np.clip(target + hi_shift, lo, hi))


def _round_preserving_sum(real: np.ndarray, lo: np.ndarray, hi: np.ndarray, names: list[str]) -> list[int]:
    """Largest-remainder rounding that stays inside the integer bounds [lo, hi]; ties broken by name."""
    base = np.clip(np.floor(real + 1e-9), lo, hi).astype(int)
    remainder = TOTAL - int(base.sum())
    frac = real - base
    if remainder > 0:
        order = sorted(range(len(names)), key=lambda i: (-frac[i], names[i]))
        for i in order:
            if remainder == 0:
                break
            if base[i] < hi[i]:
                base[i] += 1
                remainder -= 1
    elif remainder < 0:
        order = sorted(range(len(names)), key=lambda i: (frac[i], names[i]))
        for i in order:
            if remainder == 0:
                break
            if base[i] > lo[i]:
                base[i] -= 1
                remainder += 1
    return [int(x) for x in base]
