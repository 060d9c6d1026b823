"""Planning scenarios of ``make bench-stats``: does a plan the operator calls feasible end in a decision?

    python -m tests.bench.bench_plan [--runs 300] [--workers 2]

For each comparison family (``proportion`` / ``mean`` x ``nonInferiority`` / ``superiority``) rollouts
are driven through the real engine (``model_rollouts.engine.rollout.reconcile``, one call per 60 s
analysis interval, counts since ``status.epochStartedAt``, traffic split at ``status.weight``), with
steps ``10% (analysis 5m), 50% (analysis 10m), 100%``, ``progressDeadline: 15m`` and
``onInconclusive: rollback`` (so a rollout still undecided when the hold before full traffic reaches
the deadline ends, reason ``Inconclusive``: the end of its plan). Each run's traffic is drawn
log-uniformly over two decades around what the family needs, so plans fall on both sides of the
budget. A run's plan is the ``Planned`` condition at the first analysis where it is ``True`` or
``False`` (not ``Estimating``).

* healthy: nonInferiority, the candidate equal to stable; superiority, better by the family's effect;
  ``undecided_when_feasible`` = share of the runs whose plan was feasible that ended ``Inconclusive``
  (the goal is <= 0.05); ``undecided_when_infeasible`` the same for plans called infeasible.
* bad: 2x the margin (superiority: 2x the effect) worse; ``high_weight_at_end`` = share still at
  weight >= 50 when the plan ended (not rolled back on evidence before the deadline), overall and
  among plans called feasible; ``promoted`` should be 0.

The families' metrics: a proportion near 0.10 (higher is better, margin / effect 0.01) and a
lognormal latency (sigma 1, mean 100 ms, lower is better, margin / effect 5 ms).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from model_rollouts.analysis import stats
from model_rollouts.api.common import get_condition
from model_rollouts.api.rollout import ModelRolloutSpec, ModelRolloutStatus
from model_rollouts.engine import rollout as eng

ALPHA = 0.05
INTERVAL = 60
T0 = datetime(2026, 1, 1, tzinfo=UTC)
STEPS = ((10, "5m"), (50, "10m"))
DEADLINE = "15m"
MAX_LOOKS = 60  # the plan ends (Inconclusive) by about look 35


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # "proportion" | "mean"
    test: str  # "nonInferiority" | "superiority"
    better: str
    baseline: float
    margin: float  # nonInferiority: the margin; superiority: the healthy candidate's effect
    requests: tuple[float, float]  # requests per interval, both arms: the log-uniform range drawn from

    def effect(self, healthy: bool) -> float:
        """Candidate - stable of the healthy or the bad candidate (in the good direction when > 0)."""
        good = 0.0 if self.test == "nonInferiority" else self.margin
        sign = 1.0 if self.better == "higher" else -1.0
        return sign * (good if healthy else -2 * self.margin)


FAMILIES = {
    f.name: f
    for f in (
        Family(
            "proportion_nonInferiority", "proportion", "nonInferiority", "higher", 0.10, 0.01, (150, 15000)
        ),
        Family("mean_nonInferiority", "mean", "nonInferiority", "lower", 100.0, 5.0, (300, 30000)),
        Family("proportion_superiority", "proportion", "superiority", "higher", 0.10, 0.01, (150, 15000)),
        Family("mean_superiority", "mean", "superiority", "lower", 100.0, 5.0, (300, 30000)),
    )
}


def spec(f: Family) -> ModelRolloutSpec:
    steps: list[dict[str, Any]] = []
    for weight, duration in STEPS:
        steps += [{"setWeight": weight}, {"analysis": {"duration": duration}}]
    steps.append({"setWeight": 100})
    if f.kind == "proportion":
        metric: dict[str, Any] = {"type": "proportion", "successes": "s", "trials": "t"}
    else:
        metric = {"type": "mean", "sum": "s", "count": "c", "sumSquares": "q"}
    comparison = {"name": "m", **metric, "better": f.better, "test": f.test}
    if f.test == "nonInferiority":
        comparison["margin"] = f.margin
    return ModelRolloutSpec.model_validate(
        {
            "stable": {"service": "v1"},
            "candidate": {"service": "v2"},
            "trafficRouting": {"gatewayAPI": {"httpRoute": "r"}},
            "steps": steps,
            "progressDeadline": DEADLINE,
            "analysis": {
                "interval": f"{INTERVAL}s",
                "prometheus": {"address": "http://prometheus:9090"},
                "comparisons": [comparison],
                "alpha": ALPHA,
                "onInconclusive": "rollback",
            },
        }
    )


def _draw(rng: np.random.Generator, f: Family, n: int, effect: float) -> tuple[float, float, float]:
    """n, Σx, Σx² of one arm's interval (exact draws)."""
    if n <= 0:
        return 0.0, 0.0, 0.0
    if f.kind == "proportion":
        s = float(rng.binomial(n, min(max(f.baseline + effect, 0.0), 1.0)))
        return float(n), s, s
    mean = f.baseline + effect
    x = rng.lognormal(math.log(mean) - 0.5, 1.0, size=n)
    return float(n), float(x.sum()), float((x * x).sum())


def _data(f: Family, n: float, s: float, q: float) -> stats.ProportionData | stats.MeanData:
    if f.kind == "proportion":
        return stats.ProportionData(s, n)
    return stats.MeanData(n, s, max(q, s * s / n)) if n > 0 else stats.MeanData(0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Run:
    requests: float
    feasible: bool | None  # the first known plan
    outcome: str  # "Promoted" | "RolledBack" (on evidence) | "Inconclusive" (the plan ended) | "running"
    weight_at_end: int  # the weight before the plan ended
    expected: float | None  # the first known plan's expected seconds
    budget: float | None


def run_one(args: tuple[str, int, bool], requests: float | None = None) -> Run:
    """One rollout of the family (healthy or bad) at ``requests`` per interval (default: drawn)."""
    name, seed, healthy = args
    f = FAMILIES[name]
    rng = np.random.default_rng(seed)
    lo, hi = f.requests
    drawn = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    requests = drawn if requests is None else requests
    effect = f.effect(healthy)
    sp = spec(f)
    status = eng.reconcile(sp, ModelRolloutStatus(), now=T0, generation=1).status
    now, cur = T0, np.zeros(6)
    feasible: bool | None = None
    expected = budget = None
    last_weight = status.weight
    for _ in range(MAX_LOOKS):
        now += timedelta(seconds=INTERVAL)
        total = int(rng.poisson(requests))
        n_t = int(rng.binomial(total, status.weight / 100))
        cur += np.array([*_draw(rng, f, total - n_t, 0.0), *_draw(rng, f, n_t, effect)])
        obs = None
        if eng.needs_measurement(sp, status, now):
            data = eng.ComparisonData(stable=_data(f, *cur[:3]), candidate=_data(f, *cur[3:]))
            obs = eng.Observations(comparisons={"m": data})
        epoch = status.epochStartedAt
        last_weight = status.weight
        status = eng.reconcile(sp, status, now=now, generation=1, observations=obs).status
        if status.epochStartedAt != epoch:
            cur[:] = 0.0
        planned = get_condition(status.conditions, "Planned")
        if feasible is None and planned is not None and planned.status in ("True", "False"):
            feasible = planned.status == "True"
            p = next((x for x in status.plan), None)
            expected = p.expectedDecisionSeconds if p is not None else 0.0
            budget = p.budgetSeconds if p is not None else None
        if status.phase == "Promoted":
            return Run(requests, feasible, "Promoted", last_weight, expected, budget)
        if status.phase == "RolledBack":
            outcome = "Inconclusive" if status.history[-1].reason == "Inconclusive" else "RolledBack"
            return Run(requests, feasible, outcome, last_weight, expected, budget)
    return Run(requests, feasible, "running", status.weight, expected, budget)


def _share(flags: list[bool]) -> float | None:
    return float(np.mean(flags)) if flags else None


def _se(p: float | None, n: int) -> float | None:
    return None if p is None else math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


def summarize(healthy: list[Run], bad: list[Run]) -> dict[str, Any]:
    undecided = ("Inconclusive", "running")
    feas = [r for r in healthy if r.feasible is True]
    infeas = [r for r in healthy if r.feasible is False]
    bad_feas = [r for r in bad if r.feasible is True]

    def high(r: Run) -> bool:
        return r.outcome in undecided and r.weight_at_end >= 50

    u = _share([r.outcome in undecided for r in feas])
    return {
        "undecided_when_feasible": u,
        "undecided_when_feasible_se": _se(u, len(feas)),
        "undecided_when_infeasible": _share([r.outcome in undecided for r in infeas]),
        "undecided_all": _share([r.outcome in undecided for r in healthy]),
        "called_feasible": _share([r.feasible is True for r in healthy]),
        "never_planned": _share([r.feasible is None for r in healthy]),
        "false_rollback": _share([r.outcome == "RolledBack" for r in healthy]),
        "bad_high_weight_at_end": _share([high(r) for r in bad]),
        "bad_high_weight_at_end_when_feasible": _share([high(r) for r in bad_feas]),
        "bad_promoted": _share([r.outcome == "Promoted" for r in bad]),
        "bad_rolled_back": _share([r.outcome == "RolledBack" for r in bad]),
        "runs": {"healthy": len(healthy), "feasible": len(feas), "bad": len(bad)},
    }


def run_all(
    runs: int, seed: int, workers: int, families: tuple[str, ...] = tuple(FAMILIES)
) -> dict[str, dict[str, Any]]:
    """{family: summary}: ``runs`` healthy and ``runs // 2`` bad rollouts per family."""
    jobs: list[tuple[str, int, bool]] = []
    for i, name in enumerate(FAMILIES):
        if name not in families:
            continue
        base = seed + 100_000 * (i + 1)
        jobs += [(name, base + k, True) for k in range(runs)]
        jobs += [(name, base + 50_000 + k, False) for k in range(max(runs // 2, 1))]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        done = list(pool.map(run_one, jobs, chunksize=8))
    out: dict[str, dict[str, Any]] = {}
    for name in families:
        mine = [(j, r) for j, r in zip(jobs, done, strict=True) if j[0] == name]
        out[name] = summarize([r for j, r in mine if j[2]], [r for j, r in mine if not j[2]])
    return out


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def lines(res: dict[str, dict[str, Any]]) -> list[str]:
    head = (
        f"{'planning family':<28}{'feasible':>9}{'undecided|feas':>15}{'|infeas':>9}"
        f"{'bad>=50%':>10}{'|feas':>8}{'bad_prom':>9}{'runs':>6}"
    )
    out = [head]
    for name, m in res.items():
        out.append(
            f"{name:<28}{_f(m['called_feasible']):>9}{_f(m['undecided_when_feasible']):>15}"
            f"{_f(m['undecided_when_infeasible']):>9}{_f(m['bad_high_weight_at_end']):>10}"
            f"{_f(m['bad_high_weight_at_end_when_feasible']):>8}{_f(m['bad_promoted']):>9}"
            f"{m['runs']['healthy']:>6}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--seed", type=int, default=20261128)  # bench_stats.Settings.seed
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    args = parser.parse_args(argv)
    res = run_all(args.runs, args.seed, args.workers, tuple(args.families))
    print("\n".join(lines(res)))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
