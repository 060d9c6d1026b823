"""Benchmark of the sequential test against common canary judges.

Run from the repository root::

    python -m tests.bench.bench_stats                 # 10,000 experiments per cell
    python -m tests.bench.bench_stats --experiments 200

A seeded, vectorised simulation of two-arm experiments on a proportion metric (higher is better),
looked at ``--looks`` times at equal intervals up to the sample cap.  Every method sees the same
simulated data.  Methods:

* ``ours``: ``compare_proportions(method="sequential", max_samples=cap)``, vectorised (the unit tests
  check that it agrees with the scalar function), with the cap planned by
  ``sample_size_sequential_proportions``.
* ``naive``: the fixed-horizon two-proportion z test applied at every look, stopping at the first
  p < alpha.
* ``threshold``: a Flagger-style judge.  Each look checks the candidate's rate *in that interval*
  against the stable's known baseline -/+ a tolerance; 5 failed checks (Flagger's ``threshold``,
  5 in its documented examples) roll back.  For the superiority metrics it is mirrored: 5 checks above
  baseline + tolerance declare the candidate better.
* ``mannwhitney``: a Kayenta-style judge.  Each look's interval is split into sub-buckets, giving a
  short series of rates per arm, and a two-sided Mann-Whitney U test at Kayenta's 95% confidence
  classifies the look High/Low/Pass; the first High is a pass, the first Low a rollback.

Metrics (fractions of simulated experiments):

* ``type1_error``: no true difference, any pass or fail before the cap (two-sided false positive).
* ``power_at_mde``: true improvement of one MDE, verdict pass before the cap.
* ``en_ratio_1x``/``en_ratio_2x``: E[samples per arm at the first decisive verdict, or the cap] at an
  improvement of 1x/2x the MDE, divided by the fixed-horizon n from ``sample_size_proportions``.
* ``false_rollback_rate``: no true difference, a fail (rollback) before the cap; passes do not stop
  this harm monitor.
* ``miss_rate``: true regression of 2x the MDE, no fail (rollback) by the cap.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from model_rollouts.engine.stats import (
    MIN_SAMPLES_PER_ARM,
    sample_size_proportions,
    sample_size_sequential_proportions,
    sequential_critical_z,
)

METHODS = ("ours", "naive", "threshold", "mannwhitney")
METRICS = ("type1_error", "power_at_mde", "en_ratio_1x", "en_ratio_2x", "false_rollback_rate", "miss_rate")
NEVER = np.iinfo(np.int64).max
SWEEP_TOLERANCES = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
SWEEP_ALPHAS = (0.05, 0.02, 0.01)


@dataclass(frozen=True)
class Settings:
    experiments: int = 10000
    looks: int = 30
    seed: int = 20240601
    baseline: float = 0.10
    mde: float = 0.01
    alpha: float = 0.05
    power: float = 0.8
    sub_buckets: int = 10
    failure_threshold: int = 5
    tolerance_mdes: float = 1.0  # threshold judge tolerance, in MDEs
    mannwhitney_alpha: float = 0.05


@dataclass
class Events:
    """Look index (0-based) of the first pass and first fail per experiment; NEVER if none."""

    first_pass: np.ndarray
    first_fail: np.ndarray


def _first_true(flags: np.ndarray) -> np.ndarray:
    """Index of the first True along the last axis, NEVER where there is none."""
    hit = flags.any(axis=-1)
    return np.where(hit, flags.argmax(axis=-1), NEVER)


def _first_count(flags: np.ndarray, count: int) -> np.ndarray:
    """Index at which the running number of True values along the last axis reaches ``count``."""
    return _first_true(np.cumsum(flags, axis=-1) >= count)


def _proportion_variance(successes: np.ndarray, trials: np.ndarray) -> np.ndarray:
    """Per-observation variance exactly as ``compare_proportions`` computes it."""
    p = successes / trials
    q = 0.5 / (trials + 1.0)
    return np.where((p > 0) & (p < 1), p * (1 - p), q * (1 - q))


def ours_events(s_c: np.ndarray, s_t: np.ndarray, n_per_arm: np.ndarray, cap: float, alpha: float) -> Events:
    """Vectorised ``compare_proportions(method='sequential', max_samples=cap)`` on cumulative counts.

    ``s_c``/``s_t``: cumulative successes, shape (experiments, looks); ``n_per_arm``: cumulative trials
    per arm at each look, shape (looks,).
    """
    n = n_per_arm[None, :].astype(np.float64)
    se = np.sqrt(_proportion_variance(s_c, n) / n + _proportion_variance(s_t, n) / n)
    diff = (s_t - s_c) / n
    crit = sequential_critical_z(n_per_arm / cap, alpha)[None, :]
    ok = (n >= MIN_SAMPLES_PER_ARM) & (se > 0)
    half = crit * se
    passes = ok & (diff - half > 0)
    fails = ok & (diff + half < 0)
    return Events(_first_true(passes), _first_true(fails))


def msprt_events(s_c: np.ndarray, s_t: np.ndarray, n_per_arm: np.ndarray, alpha: float, tau: float) -> Events:
    """Vectorised ``compare_proportions(method='sequential', mde=tau)``: uncapped normal-mixture SPRT."""
    n = n_per_arm[None, :].astype(np.float64)
    var = _proportion_variance(s_c, n) / n + _proportion_variance(s_t, n) / n
    diff = (s_t - s_c) / n
    ok = (n >= MIN_SAMPLES_PER_ARM) & (var > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        half = np.sqrt(var * (var + tau**2) / tau**2 * (2 * np.log(1 / alpha) + np.log1p(tau**2 / var)))
    passes = ok & (diff - half > 0)
    fails = ok & (diff + half < 0)
    return Events(_first_true(passes), _first_true(fails))


def naive_events(s_c: np.ndarray, s_t: np.ndarray, n_per_arm: np.ndarray, alpha: float) -> Events:
    n = n_per_arm[None, :].astype(np.float64)
    se = np.sqrt(_proportion_variance(s_c, n) / n + _proportion_variance(s_t, n) / n)
    z = (s_t - s_c) / n / se
    crit = stats.norm.ppf(1 - alpha / 2)
    return Events(_first_true(z > crit), _first_true(z < -crit))


def threshold_events(win_t: np.ndarray, n_look: int, baseline: float, tol: float, failures: int) -> Events:
    """``win_t``: candidate successes in each look's interval, shape (experiments, looks)."""
    rate = win_t / n_look
    return Events(
        _first_count(rate > baseline + tol, failures), _first_count(rate < baseline - tol, failures)
    )


def mannwhitney_events(bucket_c: np.ndarray, bucket_t: np.ndarray, alpha: float) -> Events:
    """``bucket_*``: successes per sub-bucket, shape (experiments, looks, sub_buckets)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        res = stats.mannwhitneyu(bucket_t, bucket_c, axis=-1, method="asymptotic", alternative="two-sided")
    b = bucket_t.shape[-1]
    significant = np.nan_to_num(res.pvalue, nan=1.0) < alpha
    higher = res.statistic > b * b / 2.0
    return Events(_first_true(significant & higher), _first_true(significant & ~higher))


def _simulate(
    rng: np.random.Generator, cfg: Settings, n_bucket: int, p_c: float, p_t: float
) -> tuple[Any, ...]:
    shape = (cfg.experiments, cfg.looks, cfg.sub_buckets)
    bucket_c = rng.binomial(n_bucket, p_c, size=shape)
    bucket_t = rng.binomial(n_bucket, p_t, size=shape)
    win_c, win_t = bucket_c.sum(axis=-1), bucket_t.sum(axis=-1)
    return bucket_c, bucket_t, win_c, win_t, np.cumsum(win_c, axis=1), np.cumsum(win_t, axis=1)


def run_benchmark(cfg: Settings) -> dict[str, Any]:
    """Simulate every scenario and return {method: {metric: value}, "settings": {...}}."""
    started = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    n_fixed = sample_size_proportions(cfg.baseline, cfg.mde, alpha=cfg.alpha, power=cfg.power)
    planned_cap = sample_size_sequential_proportions(
        cfg.baseline, cfg.mde, alpha=cfg.alpha, power=cfg.power, looks=cfg.looks
    )
    n_bucket = math.ceil(planned_cap / (cfg.looks * cfg.sub_buckets))
    n_look = n_bucket * cfg.sub_buckets
    cap = n_look * cfg.looks  # the cap as run: the planned cap rounded up to whole looks
    n_per_arm = n_look * np.arange(1, cfg.looks + 1)
    tol = cfg.tolerance_mdes * cfg.mde

    scenarios = {"null": 0.0, "mde": cfg.mde, "2mde": 2 * cfg.mde, "harm": -2 * cfg.mde, "drift": 0.0}
    events: dict[str, dict[str, Events]] = {}
    tradeoff: dict[str, dict[str, Events]] = {}
    for name, effect in scenarios.items():
        # "drift": no true difference, but the metric of BOTH arms has moved one MDE below the baseline
        # that the threshold judge was configured with (e.g. seasonality).  Only the harm monitors use it.
        p_c = cfg.baseline - cfg.mde if name == "drift" else cfg.baseline
        bucket_c, bucket_t, _win_c, win_t, cum_c, cum_t = _simulate(rng, cfg, n_bucket, p_c, p_c + effect)
        if name != "drift":
            events[name] = {
                "ours": ours_events(cum_c, cum_t, n_per_arm, cap, cfg.alpha),
                "naive": naive_events(cum_c, cum_t, n_per_arm, cfg.alpha),
                "threshold": threshold_events(win_t, n_look, cfg.baseline, tol, cfg.failure_threshold),
                "mannwhitney": mannwhitney_events(bucket_c, bucket_t, cfg.mannwhitney_alpha),
                "ours_uncapped_msprt": msprt_events(cum_c, cum_t, n_per_arm, cfg.alpha, cfg.mde),
            }
        if name in ("null", "harm", "drift"):
            rows = {
                f"threshold tol {k:g}xMDE": threshold_events(
                    win_t, n_look, cfg.baseline, k * cfg.mde, cfg.failure_threshold
                )
                for k in SWEEP_TOLERANCES
            }
            rows.update(
                {f"ours alpha {a:g}": ours_events(cum_c, cum_t, n_per_arm, cap, a) for a in SWEEP_ALPHAS}
            )
            tradeoff[name] = rows

    def decided(ev: Events) -> np.ndarray:
        return np.asarray(np.minimum(ev.first_pass, ev.first_fail) != NEVER)

    def passed(ev: Events) -> np.ndarray:
        return np.asarray((ev.first_pass != NEVER) & (ev.first_pass < ev.first_fail))

    def expected_n(ev: Events) -> float:
        stop = np.minimum(np.minimum(ev.first_pass, ev.first_fail), cfg.looks - 1)
        return float(np.mean((stop + 1) * n_look))

    def metrics(m: str) -> dict[str, float]:
        return {
            "type1_error": float(np.mean(decided(events["null"][m]))),
            "power_at_mde": float(np.mean(passed(events["mde"][m]))),
            "en_ratio_1x": expected_n(events["mde"][m]) / n_fixed,
            "en_ratio_2x": expected_n(events["2mde"][m]) / n_fixed,
            "false_rollback_rate": float(np.mean(events["null"][m].first_fail != NEVER)),
            "miss_rate": float(np.mean(events["harm"][m].first_fail == NEVER)),
        }

    results: dict[str, Any] = {m: metrics(m) for m in METHODS}
    mcse = math.sqrt(cfg.alpha * (1 - cfg.alpha) / cfg.experiments)
    results["settings"] = {
        "experiments_per_cell": cfg.experiments,
        "looks": cfg.looks,
        "seed": cfg.seed,
        "baseline": cfg.baseline,
        "mde": cfg.mde,
        "alpha": cfg.alpha,
        "power": cfg.power,
        "n_fixed": n_fixed,
        "planned_cap": planned_cap,
        "cap": cap,
        "cap_over_n_fixed": cap / n_fixed,
        "samples_per_look": n_look,
        "sub_buckets": cfg.sub_buckets,
        "threshold_tolerance": tol,
        "failure_threshold": cfg.failure_threshold,
        "mannwhitney_alpha": cfg.mannwhitney_alpha,
        "type1_target": cfg.alpha + 2 * mcse,
        # the same sequential test without a planned cap (what the product runs when max_samples is None)
        "ours_uncapped_msprt": metrics("ours_uncapped_msprt"),
        "harm_tradeoff": {
            row: {
                "false_rollback_rate": float(np.mean(tradeoff["null"][row].first_fail != NEVER)),
                "miss_rate": float(np.mean(tradeoff["harm"][row].first_fail == NEVER)),
                "false_rollback_under_drift": float(np.mean(tradeoff["drift"][row].first_fail != NEVER)),
            }
            for row in tradeoff["null"]
        },
        "seconds": round(time.perf_counter() - started, 2),
    }
    return results


def format_table(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        f"{s['experiments_per_cell']} experiments per cell, {s['looks']} looks, baseline {s['baseline']:g}, "
        f"MDE {s['mde']:g}, alpha {s['alpha']:g}; n_fixed {s['n_fixed']} per arm, "
        f"cap {s['cap']} per arm ({s['cap_over_n_fixed']:.3f} x n_fixed), seed {s['seed']}",
        "",
        f"{'method':<12}" + "".join(f"{m:>21}" for m in METRICS),
    ]
    for m in METHODS:
        lines.append(f"{m:<12}" + "".join(f"{results[m][k]:>21.4f}" for k in METRICS))
    extra = s["ours_uncapped_msprt"]
    lines.append(f"{'(mSPRT)':<12}" + "".join(f"{extra[k]:>21.4f}" for k in METRICS))
    lines.append("(mSPRT) = ours without max_samples: normal-mixture SPRT with tau = MDE; not a target row")
    lines += [
        "",
        f"type-I target for ours: <= {s['type1_target']:.4f} (alpha + 2 Monte-Carlo SE)",
        "harm monitors (rollback on the first fail; 5 failed checks for the threshold judge):",
        f"  {'monitor':<24}{'false_rollback_rate':>21}{'miss_rate':>12}{'false_rollback_under_drift':>28}",
    ]
    for k, v in s["harm_tradeoff"].items():
        lines.append(
            f"  {k:<24}{v['false_rollback_rate']:>21.4f}{v['miss_rate']:>12.4f}"
            f"{v['false_rollback_under_drift']:>28.4f}"
        )
    lines.append(f"elapsed {s['seconds']} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--experiments", type=int, default=Settings.experiments)
    parser.add_argument("--looks", type=int, default=Settings.looks)
    parser.add_argument("--seed", type=int, default=Settings.seed)
    args = parser.parse_args(argv)
    if args.experiments < 1 or args.looks < 1:
        parser.error("--experiments and --looks must be positive")
    results = run_benchmark(Settings(experiments=args.experiments, looks=args.looks, seed=args.seed))
    print(format_table(results))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
