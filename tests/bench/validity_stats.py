"""Type-I error of the sequential test at settings other than the benchmark's: try to break it.

    python -m tests.bench.validity_stats [--runs 2000]

A vectorised copy of ``stats.compare_means_stratified`` / ``compare_proportions_stratified`` for one
stratum (checked against the scalar functions in tests/unit/test_stats_sequential_extras.py) is run
on null data (the true difference is exactly the test's threshold) looked at every interval, for
lognormal (sigma 0.5, 1, 1.5) and zero-inflated rewards and for rare-event proportions, at splits
50/50, 10/90 and 5/95, with a slow start (the first intervals carry a fifth of the traffic), for
both designs: the uncapped mixture SPRT (superiority, tau = 0.1 sd) and the capped design planned
for a non-inferiority margin.  Prints one row per setting and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np

from model_rollouts.analysis import stats


def _sums(
    rng: np.random.Generator, kind: str, sigma: float, n: np.ndarray, shift: float
) -> tuple[np.ndarray, ...]:
    """Per-interval n, Σx, Σx² (exact draws) of a metric with mean 1 (+ shift)."""
    if kind == "proportion":
        p = 0.01 + shift
        s = rng.binomial(n, p).astype(float)
        return n.astype(float), s, s
    nonzero = 0.1 if kind == "zero_inflated" else 1.0
    mu = math.log(1.0 / nonzero) - sigma**2 / 2
    k = rng.binomial(n, nonzero) if nonzero < 1 else n
    flat = k.ravel()
    x = rng.lognormal(mu, sigma, size=int(flat.sum())) + shift
    idx = np.repeat(np.arange(flat.size), flat)
    s1 = np.bincount(idx, weights=x, minlength=flat.size).reshape(n.shape)
    s2 = np.bincount(idx, weights=x * x, minlength=flat.size).reshape(n.shape)
    if nonzero < 1:  # zeros shifted too
        zeros = n - k
        s1 = s1 + zeros * shift
        s2 = s2 + zeros * shift * shift
    return n.astype(float), s1, s2


def decisions(
    nc: np.ndarray,
    sc: np.ndarray,
    qc: np.ndarray,
    nt: np.ndarray,
    st: np.ndarray,
    qt: np.ndarray,
    *,
    alpha: float,
    threshold: float,
    proportion: bool,
    max_information: float | None,
) -> np.ndarray:
    """Verdict per (run, look) on cumulative sums: +1 pass (above threshold), -1 fail, 0 inconclusive."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mc, mt = sc / nc, st / nt
        if proportion:

            def bern(s: np.ndarray, n: np.ndarray) -> np.ndarray:
                p = s / n
                q = 0.5 / (n + 1)
                return np.where((p > 0) & (p < 1), p * (1 - p), q * (1 - q))

            vc, vt = bern(sc, nc), bern(st, nt)
            pooled = bern(sc + st, nc + nt)
        else:
            vc = np.maximum((qc - sc**2 / nc) / (nc - 1), 0)
            vt = np.maximum((qt - st**2 / nt) / (nt - 1), 0)
            pooled = ((nc - 1) * vc + (nt - 1) * vt) / (nc + nt - 2)
        vc, vt = np.maximum(vc, pooled), np.maximum(vt, pooled)
        info = 1.0 / (vc / nc + vt / nt)
        diff = mt - mc
        small, large = np.minimum(nc, nt), np.maximum(nc, nt)
        need = stats.MIN_SAMPLES_PER_ARM * np.maximum(1.0, np.sqrt(large / small))
        ok = (small >= need) & np.isfinite(info) & (info > 0)
        se = np.sqrt(1.0 / info)
        if max_information is not None:
            half = stats.sequential_critical_z(info / max_information, alpha) * se
        else:
            tau = stats.DEFAULT_MIXTURE_EFFECT * np.sqrt((nc * vc + nt * vt) / (nc + nt))
            v, t2 = se**2, tau**2
            half = np.sqrt(v * (v + t2) / t2 * (2 * np.log(1 / alpha) + np.log1p(t2 / v)))
        out = np.where(ok & (diff - half > threshold), 1, np.where(ok & (diff + half < threshold), -1, 0))
    return out


SETTINGS = [
    (kind, sigma)
    for kind, sigma in (
        ("lognormal", 0.5),
        ("lognormal", 1.0),
        ("lognormal", 1.5),
        ("zero_inflated", 1.0),
        ("zero_inflated", 1.5),
        ("proportion", 0.0),
    )
]


def run(
    runs: int, seed: int, looks: int = 40, alpha: float = 0.05, traffic: float | None = None
) -> list[dict[str, object]]:
    rng = np.random.default_rng(seed)
    rows = []
    for kind, sigma in SETTINGS:
        for split in (0.5, 0.1, 0.05):
            for design in ("mixture", "capped"):
                # Traffic so the capped design reaches its cap near the last look at this split.
                sd = (
                    math.sqrt(0.0099)
                    if kind == "proportion"
                    else (
                        math.sqrt(math.exp(sigma**2) - 1)
                        if kind == "lognormal"
                        else math.sqrt(10 * math.exp(sigma**2) - 1)
                    )
                )
                margin = 0.1 * sd
                cap = stats.information_cap(margin, alpha=alpha, looks=stats.DEFAULT_PLAN_LOOKS)
                per_look_total = cap * sd**2 / (split * (1 - split)) / looks
                per_look_total = min(per_look_total, 20000.0) if traffic is None else traffic
                ramp = np.minimum(1.0, (np.arange(looks) + 1) / 5.0)  # slow start
                n_tot = np.rint(per_look_total * ramp).astype(np.int64)
                n_t = np.broadcast_to(np.rint(n_tot * split).astype(np.int64), (runs, looks))
                n_c = np.broadcast_to(n_tot - n_t[0], (runs, looks))
                # Null at the threshold: superiority (threshold 0, same distribution) for the mixture;
                # non-inferiority with the candidate exactly one margin worse for the capped design.
                shift = 0.0 if design == "mixture" else -margin
                threshold = 0.0 if design == "mixture" else -margin
                if kind == "proportion" and design == "capped":
                    shift = -min(margin, 0.005)
                    threshold = shift
                c = [np.cumsum(a, axis=1) for a in _sums(rng, kind, sigma, n_c, 0.0)]
                t = [np.cumsum(a, axis=1) for a in _sums(rng, kind, sigma, n_t, shift)]
                d = decisions(
                    *c,
                    *t,
                    alpha=alpha,
                    threshold=threshold,
                    proportion=kind == "proportion",
                    max_information=cap if design == "capped" else None,
                )
                any_dec = (d != 0).any(axis=1)
                first = np.where(any_dec, (d != 0).argmax(axis=1), looks)
                fp = float(any_dec.mean())
                rows.append(
                    {
                        "metric": kind if kind == "proportion" else f"{kind} sigma {sigma:g}",
                        "split": f"{round(split * 100)}/{round((1 - split) * 100)}",
                        "design": design,
                        "type1": fp,
                        "mc_se": math.sqrt(max(fp * (1 - fp), 1e-12) / runs),
                        "early_share": float(np.mean(first[any_dec] < looks // 10)) if any_dec.any() else 0.0,
                        "runs": runs,
                        "requests_per_look": float(per_look_total),
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--looks", type=int, default=40)
    parser.add_argument(
        "--traffic", type=float, default=None, help="requests per look (default: cap at the end)"
    )
    args = parser.parse_args(argv)
    rows = run(args.runs, args.seed, looks=args.looks, traffic=args.traffic)
    for r in rows:
        print(
            f"{r['metric']:<26}{r['split']:>7}{r['design']:>9}  type1 {r['type1']:.4f} ± {r['mc_se']:.4f}"
            f"  (share in first 10% of looks {r['early_share']:.2f})"
        )
    print(json.dumps({"alpha": 0.05, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
