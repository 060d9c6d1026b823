"""The benchmark's peer judges do what their documentation says (tests/bench/bench_stats.py)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.bench import bench_stats as b


def _arms(values: list[float]) -> b.Arms:
    v = np.asarray([values], dtype=float)
    n = np.full_like(v, 100.0)
    return b.Arms(n, v * 100, v * 100)


SC = b.Scenario("t", "proportion", "higher", ((50, 12),), 200, 0.01, 0.10, extra_looks=0)


def test_flagger_race_five_failures_roll_back_ten_passes_promote() -> None:
    bad, good = 0.05, 0.10
    o = b.flagger(SC, _arms([bad, good, bad, bad, good, bad, bad, good, good, good, good, good]), 1.0)
    assert o.rollback[0] == 6 and o.promote[0] == b.NEVER  # 5th failed check at look 6
    o = b.flagger(SC, _arms([good] * 9 + [bad, good, good]), 1.0)
    assert o.promote[0] == 10 and o.rollback[0] == b.NEVER  # 10th passed check at look 10


def test_argo_fails_when_failures_exceed_the_failure_limit_else_promotes_at_the_end() -> None:
    bad, good = 0.05, 0.10
    o = b.argo(SC, _arms([bad, good, bad, bad, good, good, good, good, good, good, good, good]), 1.0)
    assert o.rollback[0] == b.NEVER and o.promote[0] == SC.step_looks - 1  # 3 failures: within the limit
    o = b.argo(SC, _arms([bad, good, bad, bad, good, bad, good, good, good, good, good, good]), 1.0)
    assert o.rollback[0] == 5


def test_hodges_lehmann_interval() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (3, 20))
    y = rng.normal(0.5, 1, (3, 20))
    lo, hi, est = b._hodges_lehmann_bounds(x, y, 0.98)
    for i in range(3):
        d = (y[i][:, None] - x[i][None, :]).ravel()
        assert est[i] == pytest.approx(np.median(d))
        assert lo[i] <= est[i] <= hi[i]
    _, far_hi, _ = b._hodges_lehmann_bounds(x, x - 10, 0.98)
    assert np.all(far_hi < 0)


def test_calibration_hits_the_target_rate() -> None:
    rng = np.random.default_rng(3)
    sc = b.Scenario("t", "proportion", "higher", ((50, 20),), 2000, 0.01, 0.10, extra_looks=0)
    c, t = b.simulate(rng, sc, 400, 0.0)
    tol = b.calibrate("flagger", sc, c, t, 0.05)
    rate = float(np.mean(b.flagger(sc, t, tol).rollback != b.NEVER))
    assert rate <= 0.05 and float(np.mean(b.flagger(sc, t, tol * 0.9).rollback != b.NEVER)) > 0.05 - 0.02
