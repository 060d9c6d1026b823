"""Stratified vs pooled comparisons on a weight ramp under a drift common to both arms.

    python -m tests.bench.ramp_stats

Weights 5 -> 10 -> 25 -> 50 -> 75% (10 looks each), no true difference, a superiority test with
margin 0 (the uncapped mixture design), lower is better, looked at every interval.  Prints the share
of runs with any decisive verdict for ``compare_*_stratified`` over the epochs and for the pooled
``compare_*`` on all counts since the start.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np

from model_rollouts.analysis import stats
from model_rollouts.analysis.stats import MeanData, ProportionData

Data = ProportionData | MeanData


def _add(a: Data, b: Data) -> Data:
    if isinstance(a, ProportionData) and isinstance(b, ProportionData):
        return ProportionData(a.successes + b.successes, a.trials + b.trials)
    assert isinstance(a, MeanData) and isinstance(b, MeanData)
    return MeanData(a.count + b.count, a.total + b.total, a.sum_squares + b.sum_squares)


def run(kind: str, runs: int, drift: float, requests: int, seed: int) -> tuple[float, float]:
    ramp, per = (5, 10, 25, 50, 75), 10
    looks = len(ramp) * per
    rng = np.random.default_rng(seed)
    strat_false = pooled_false = 0
    for _ in range(runs):
        strata: list[list[Data]] = []
        strat = pooled = False
        for look in range(looks):
            w = ramp[look // per] / 100
            t = look / (looks - 1)
            nt = int(rng.binomial(requests, w))
            nc = requests - nt
            if kind == "proportion":
                rate = 0.01 * (1 + drift * t)
                cd: Data = ProportionData(float(rng.binomial(nc, rate)), float(nc))
                td: Data = ProportionData(float(rng.binomial(nt, rate)), float(nt))
            else:
                mu = math.log(100 * (1 + drift * t)) - 0.5
                xc, xt = rng.lognormal(mu, 1, nc), rng.lognormal(mu, 1, nt)
                cd = MeanData(nc, float(xc.sum()), float((xc**2).sum()))
                td = MeanData(nt, float(xt.sum()), float((xt**2).sum()))
            if look % per == 0:
                strata.append([cd, td])
            else:
                strata[-1] = [_add(strata[-1][0], cd), _add(strata[-1][1], td)]
            pc, pt = strata[0]
            for c, tr in strata[1:]:
                pc, pt = _add(pc, c), _add(pt, tr)
            if kind == "proportion":
                r = stats.compare_proportions_stratified([(c, tr) for c, tr in strata], better="lower")  # type: ignore[misc]
                p = stats.compare_proportions(pc, pt, better="lower")  # type: ignore[arg-type]
            else:
                r = stats.compare_means_stratified([(c, tr) for c, tr in strata], better="lower")  # type: ignore[misc]
                p = stats.compare_means(pc, pt, better="lower")  # type: ignore[arg-type]
            strat = strat or r.verdict != "inconclusive"
            pooled = pooled or p.verdict != "inconclusive"
        strat_false += strat
        pooled_false += pooled
    return strat_false / runs, pooled_false / runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    for kind, drift, requests, label in (
        ("proportion", 1.0, 4000, "error rate 1.0% -> 2.0%"),
        ("proportion", -0.5, 4000, "error rate 1.0% -> 0.5%"),
        ("mean", 0.5, 1000, "lognormal latency (sigma 1), mean 100 -> 150 ms"),
    ):
        s, p = run(kind, args.runs, drift, requests, args.seed)
        se = math.sqrt(max(s * (1 - s), 1e-12) / args.runs)
        print(f"{label:<48} stratified {s:.4f} ± {se:.4f}   pooled {p:.4f}   ({args.runs} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
