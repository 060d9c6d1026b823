"""Lifecycle scenarios of ``make bench-stats``: segments, label delay, prediction shift.

Seeded, stats-level simulations of the pure judges in ``model_rollouts.analysis`` (the engine wiring
comes with the judges' spec fields); each returns the same summary keys as the other scenarios
(``false_rollback``, ``bad_promoted``, ``miss``, ``runs``, ``mc_se``) plus its own numbers.

* ``segments``: four regions with different baselines (0.08, 0.10, 0.12, 0.15), equal traffic, a
  canary at 25% for 10 looks then 50%, margin 0.01. A look's decision: any segment harmed -> rollback;
  every segment non-inferior and the pooled comparison too -> promote. Null: the candidate equals the
  stable everywhere. Bad: 0.01 better in three regions and 2x the margin (0.02) worse in one, so the
  pooled comparison alone passes; ``pooled_only_promoted`` is how often that comparison alone would
  have promoted it.
* ``label_delay``: labels arrive D after the prediction, D from a truncated exponential (mean 3 min)
  on [0, 10 min], simulated in 10 s ticks; a canary at 10% (15 min), 25% (15 min), 50% (30 min),
  rate 0.10, margin 0.01, looks every minute. ``ours``: per epoch, labels arriving after S + 10 min
  over trials made up to T - 10 min (``analysis.delay``); ``undelayed``: labels arrived so far over
  predictions made so far (epochs still stratified). ``bias_*``: mean estimated difference (and each
  arm's rate) at the last look minus the truth.
* ``prediction_shift``: scores in 10 bins; stable Beta(mean 0.3, concentration 20), a canary at 10%
  of 1,000 scores per look, 30 looks, ``max_psi`` 0.1. Null: the same distribution. Bad: the same
  mean, concentration chosen for a true PSI of 0.2 (2x the threshold). Stop = ``fail``; promote =
  ``pass``.
"""

from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from scipy import optimize
from scipy import stats as sps

from model_rollouts.analysis import delay, segments, shift, stats

ALPHA = 0.05


def _se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


def summary(fr: np.ndarray, rb: np.ndarray, pr: np.ndarray, look: np.ndarray) -> dict[str, Any]:
    """The keys every scenario reports (see bench_stats._summary)."""
    looks = look[rb]
    return {
        "false_rollback": float(fr.mean()),
        "bad_promoted": float(pr.mean()),
        "miss": float(1 - rb.mean()),
        "power": float(rb.mean()),
        "median_looks_to_rollback": float(np.median(looks + 1)) if looks.size else None,
        "runs": {"null": int(fr.size), "bad": int(rb.size)},
        "mc_se": {
            "false_rollback": _se(float(fr.mean()), fr.size),
            "bad_promoted": _se(float(pr.mean()), pr.size),
            "miss": _se(float(1 - rb.mean()), rb.size),
        },
    }


# --------------------------------------------------------------------------- segments

SEGMENT_BASE = {"north": 0.08, "south": 0.10, "east": 0.12, "west": 0.15}
SEGMENT_BAD = {"north": 0.01, "south": 0.01, "east": 0.01, "west": -0.02}
SEGMENT_MARGIN = 0.01
SEGMENT_STEPS = ((25, 10), (50, 110))
SEGMENT_REQUESTS = 4000  # per look, all segments and both arms


def _segment_run(args: tuple[int, bool]) -> tuple[str, int, bool]:
    """One canary: (outcome, look, whether the pooled comparison alone passed at some look)."""
    seed, bad = args
    rng = np.random.default_rng(seed)
    names = list(SEGMENT_BASE)
    weights = [w for w, k in SEGMENT_STEPS for _ in range(k)]
    epochs: list[dict[str, list[float]]] = []
    current = -1
    pooled_passed = False
    for look, w in enumerate(weights):
        if not epochs or w != current:
            epochs.append({s: [0.0, 0.0, 0.0, 0.0] for s in names})
            current = w
        ep = epochs[-1]
        per = SEGMENT_REQUESTS // len(names)
        n_t = round(per * w / 100)
        for s in names:
            p = SEGMENT_BASE[s]
            q = p + (SEGMENT_BAD[s] if bad else 0.0)
            ep[s][0] += rng.binomial(per - n_t, p)
            ep[s][1] += per - n_t
            ep[s][2] += rng.binomial(n_t, q)
            ep[s][3] += n_t
        data = {
            s: [
                (stats.ProportionData(e[s][0], e[s][1]), stats.ProportionData(e[s][2], e[s][3]))
                for e in epochs
            ]
            for s in names
        }
        res = segments.judge_segments(data, margin=SEGMENT_MARGIN, alpha=ALPHA)
        pooled_passed = pooled_passed or res.pooled.verdict == "pass"
        if res.verdict == "fail" or res.pooled.verdict == "fail":
            return "RolledBack", look, pooled_passed
        if res.verdict == "pass" and res.pooled.verdict == "pass":
            return "Promoted", look, pooled_passed
    return "undecided", len(weights) - 1, pooled_passed


def segments_scenario(null_runs: int, bad_runs: int, seed: int, workers: int) -> dict[str, Any]:
    args = [(seed + i, False) for i in range(null_runs)] + [(seed + 10**6 + i, True) for i in range(bad_runs)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        out = list(pool.map(_segment_run, args, chunksize=8))
    null, bad = out[:null_runs], out[null_runs:]
    res = summary(
        np.array([o == "RolledBack" for o, _, _ in null]),
        np.array([o == "RolledBack" for o, _, _ in bad]),
        np.array([o == "Promoted" for o, _, _ in bad]),
        np.array([k for _, k, _ in bad]),
    )
    res["promoted_null"] = float(np.mean([o == "Promoted" for o, _, _ in null]))
    res["undecided_null"] = float(np.mean([o == "undecided" for o, _, _ in null]))
    promoted_looks = [k for o, k, _ in null if o == "Promoted"]
    res["median_looks_to_promote_null"] = float(np.median(promoted_looks)) + 1 if promoted_looks else None
    res["pooled_only_promoted"] = float(np.mean([p for _, _, p in bad]))
    res["looks"] = sum(k for _, k in SEGMENT_STEPS)
    res["note"] = (
        "4 segments (baselines 0.08/0.10/0.12/0.15, equal traffic), 4,000 requests per look, canary 25% "
        "then 50%, margin 0.01; bad = +0.01 in three segments, -0.02 in one; promote = every segment and "
        "the pooled comparison non-inferior; false_rollback = a null candidate rolled back (any segment)"
    )
    return res


# --------------------------------------------------------------------------- label delay

TICK = 10.0  # seconds
DELAY_MAX = 600.0
DELAY_MEAN = 180.0
DELAY_STEPS = ((10, 15), (25, 15), (50, 30))  # (weight %, minutes)
DELAY_RATE = 0.10
DELAY_MARGIN = 0.01
DELAY_REQUESTS_PER_TICK = 400


def delay_lag_probs() -> np.ndarray:
    """P(lag = k ticks), k = 0..59 (a label arrives k ticks after its prediction's tick): a truncated
    exponential on [0, 10 min) with mean 3 min before truncation."""
    edges = np.arange(0.0, DELAY_MAX + TICK / 2, TICK)
    probs = np.diff(1 - np.exp(-edges / DELAY_MEAN))
    return np.asarray(probs / probs.sum())


def _delay_schedule() -> tuple[np.ndarray, list[int]]:
    """Candidate weight per tick, and the tick each epoch starts at."""
    per_minute = int(60 / TICK)
    w = np.concatenate([np.full(m * per_minute, wt) for wt, m in DELAY_STEPS])
    starts = [0]
    for _wt, m in DELAY_STEPS[:-1]:
        starts.append(starts[-1] + m * per_minute)
    return w, starts


def simulate_delay(rng: np.random.Generator, runs: int, effect: float) -> dict[str, np.ndarray]:
    """Per (run, tick): predictions made and positive labels ARRIVING, per arm."""
    w, _ = _delay_schedule()
    ticks = w.size
    lag = delay_lag_probs()
    n_t = np.rint(DELAY_REQUESTS_PER_TICK * w / 100).astype(np.int64)
    n_c = DELAY_REQUESTS_PER_TICK - n_t
    out: dict[str, np.ndarray] = {}
    for arm, n, p in (("c", n_c, DELAY_RATE), ("t", n_t, DELAY_RATE + effect)):
        pos = rng.binomial(np.broadcast_to(n, (runs, ticks)), p)
        spread = rng.multinomial(pos, lag)  # (runs, ticks, lags): when each tick's labels arrive
        arrive = np.zeros((runs, ticks + lag.size), dtype=np.int64)
        for k in range(lag.size):
            arrive[:, k : k + ticks] += spread[:, :, k]
        out["n_" + arm] = np.broadcast_to(n, (runs, ticks)).astype(np.float64)
        out["s_" + arm] = arrive[:, :ticks].astype(np.float64)
    return out


T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _at(tick: int) -> datetime:
    return T0 + timedelta(seconds=tick * TICK)


def _tick(at: datetime) -> int:
    return round((at - T0).total_seconds() / TICK)


def _window_sum(x: np.ndarray, lo: int, hi: int) -> float:
    """Sum of ticks lo..hi-1 (ticks are half-open intervals; empty when hi <= lo)."""
    return float(x[lo:hi].sum()) if hi > lo else 0.0


def _delay_strata(sim: dict[str, np.ndarray], run: int, t_end: int, delayed: bool) -> list[Any]:
    _, starts = _delay_schedule()
    strata = []
    for i, s in enumerate(starts):
        if s >= t_end:
            break
        e = starts[i + 1] if i + 1 < len(starts) else t_end
        e = min(e, t_end)
        if delayed:
            # Labels arriving after S + delay, trials made up to E - delay: analysis.delay's windows.
            win = delay.label_window(_at(s), _at(e), DELAY_MAX)
            if win is None:
                continue
            lab = (_tick(win.labels_from), _tick(win.labels_to))
            t_hi = _tick(win.labels_to) - round(win.trials_offset_seconds / TICK)
            tri = (t_hi - round(win.seconds / TICK), t_hi)
        else:
            lab = tri = (s, e)
        pair = []
        for arm in ("c", "t"):
            succ = _window_sum(sim["s_" + arm][run], *lab)
            trials = _window_sum(sim["n_" + arm][run], *tri)
            pair.append(delay.delayed_proportion(succ, trials))
        strata.append(tuple(pair))
    return strata


def _delay_runs(
    args: tuple[int, int, float],
) -> list[tuple[int, int, float, float, float, int, int, float, float, float]]:
    """Per run: first fail look, first pass look, final diff and arm rates, for ours and undelayed."""
    seed, runs, effect = args
    sim = simulate_delay(np.random.default_rng(seed), runs, effect)
    ticks = sim["n_c"].shape[1]
    per_minute = int(60 / TICK)
    out = []
    for r in range(runs):
        row: list[Any] = []
        for delayed in (True, False):
            fail = passed = -1
            res = None
            for look, t_end in enumerate(range(per_minute, ticks + 1, per_minute)):
                strata = _delay_strata(sim, r, t_end, delayed)
                if not strata:
                    continue
                res = stats.compare_proportions_stratified(
                    strata, alpha=ALPHA, test="nonInferiority", margin=DELAY_MARGIN
                )
                if res.verdict == "fail" and fail < 0:
                    fail = look
                if res.verdict == "pass" and passed < 0:
                    passed = look
            assert res is not None
            row += [fail, passed, res.difference, res.control_estimate, res.treatment_estimate]
        out.append(tuple(row))
    return out


def label_delay_scenario(null_runs: int, bad_runs: int, seed: int, workers: int) -> dict[str, Any]:
    chunk = 25

    def jobs(n: int, base: int, effect: float) -> list[tuple[int, int, float]]:
        return [(base + i, min(chunk, n - i), effect) for i in range(0, n, chunk)]

    null_jobs = jobs(null_runs, seed, 0.0)
    bad_jobs = jobs(bad_runs, seed + 10**6, -2 * DELAY_MARGIN)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        done = list(pool.map(_delay_runs, null_jobs + bad_jobs))
    null = np.array([r for b in done[: len(null_jobs)] for r in b], dtype=float)
    bad = np.array([r for b in done[len(null_jobs) :] for r in b], dtype=float)

    def judge(col: int) -> dict[str, Any]:
        # The first decisive verdict decides (a pass before a fail promotes).
        def first(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            f, p = rows[:, col], rows[:, col + 1]
            f = np.where(f < 0, np.inf, f)
            p = np.where(p < 0, np.inf, p)
            return f < p, p < f, np.where(np.isfinite(f), f, 0)

        fr, _, _ = first(null)
        rb, pr, lk = first(bad)
        out = summary(fr, rb, pr, lk.astype(int))
        out["promoted_null"] = float(np.mean(first(null)[1]))
        out["bias_difference_null"] = float(np.mean(null[:, col + 2]) - 0.0)
        out["bias_difference_bad"] = float(np.mean(bad[:, col + 2]) + 2 * DELAY_MARGIN)
        out["bias_rate_stable"] = float(np.mean(null[:, col + 3]) - DELAY_RATE)
        out["bias_rate_candidate"] = float(np.mean(null[:, col + 4]) - DELAY_RATE)
        return out

    ours, undelayed = judge(0), judge(5)
    ours["undelayed"] = undelayed
    ours["note"] = (
        "labels after a truncated-exponential delay (mean 3 min, max 10 min); canary 10% 15 min, 25% 15 "
        "min, 50% 30 min; rate 0.10, margin 0.01, a look per minute; ours = labels arriving after "
        "S + 10 min over trials made up to T - 10 min per epoch; undelayed = everything so far; bias = "
        "mean estimate at the last look minus the truth"
    )
    return ours


# --------------------------------------------------------------------------- prediction shift

SHIFT_EDGES = np.round(np.arange(0.1, 1.0001, 0.1), 2)
SHIFT_MEAN = 0.3
SHIFT_CONCENTRATION = 20.0
SHIFT_MAX_PSI = 0.1
SHIFT_LOOKS = 30
SHIFT_PER_LOOK = 1000
SHIFT_WEIGHT = 0.10


def beta_bin_probs(mean: float, concentration: float) -> np.ndarray:
    cdf = sps.beta.cdf(SHIFT_EDGES, mean * concentration, (1 - mean) * concentration)
    cdf[-1] = 1.0
    return np.asarray(np.diff(cdf, prepend=0.0))


def true_psi(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.sum((q - p) * np.log(q / p)))


def shifted_concentration(target_psi: float) -> float:
    base = beta_bin_probs(SHIFT_MEAN, SHIFT_CONCENTRATION)
    return float(
        optimize.brentq(lambda k: true_psi(base, beta_bin_probs(SHIFT_MEAN, k)) - target_psi, 1.0, 19.9)
    )


def _buckets(counts: np.ndarray) -> dict[float, float]:
    cum = np.cumsum(counts)
    out = {float(e): float(x) for e, x in zip(SHIFT_EDGES[:-1], cum[:-1], strict=True)}
    out[math.inf] = float(cum[-1])
    return out


def _shift_runs(args: tuple[int, int, float]) -> list[tuple[str, int]]:
    seed, runs, conc = args
    rng = np.random.default_rng(seed)
    pb = beta_bin_probs(SHIFT_MEAN, SHIFT_CONCENTRATION)
    pc = beta_bin_probs(SHIFT_MEAN, conc)
    n_t = int(SHIFT_PER_LOOK * SHIFT_WEIGHT)
    out = []
    for _ in range(runs):
        cb, cc = np.zeros(pb.size), np.zeros(pb.size)
        decision: tuple[str, int] = ("undecided", SHIFT_LOOKS - 1)
        for look in range(SHIFT_LOOKS):
            cb += rng.multinomial(SHIFT_PER_LOOK - n_t, pb)
            cc += rng.multinomial(n_t, pc)
            res = shift.judge_shift(
                _buckets(cb), _buckets(cc), max_psi=SHIFT_MAX_PSI, alpha=ALPHA, look=look + 1
            )
            if res.verdict != "inconclusive":
                decision = ("RolledBack" if res.verdict == "fail" else "Promoted", look)
                break
        out.append(decision)
    return out


def prediction_shift_scenario(null_runs: int, bad_runs: int, seed: int, workers: int) -> dict[str, Any]:
    conc = shifted_concentration(2 * SHIFT_MAX_PSI)
    chunk = 50
    null_jobs = [
        (seed + i, min(chunk, null_runs - i), SHIFT_CONCENTRATION) for i in range(0, null_runs, chunk)
    ]
    bad_jobs = [(seed + 10**6 + i, min(chunk, bad_runs - i), conc) for i in range(0, bad_runs, chunk)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        done = list(pool.map(_shift_runs, null_jobs + bad_jobs))
    null = [r for b in done[: len(null_jobs)] for r in b]
    bad = [r for b in done[len(null_jobs) :] for r in b]
    out = summary(
        np.array([o == "RolledBack" for o, _ in null]),
        np.array([o == "RolledBack" for o, _ in bad]),
        np.array([o == "Promoted" for o, _ in bad]),
        np.array([k for _, k in bad]),
    )
    out["promoted_null"] = float(np.mean([o == "Promoted" for o, _ in null]))
    out["true_psi_bad"] = true_psi(
        beta_bin_probs(SHIFT_MEAN, SHIFT_CONCENTRATION), beta_bin_probs(SHIFT_MEAN, conc)
    )
    out["bad_concentration"] = conc
    out["note"] = (
        "10 score bins, stable Beta(mean 0.3, concentration 20); canary 10% of 1,000 scores per look, 30 "
        "looks, max_psi 0.1; bad = the same mean with true PSI 0.2; stop = fail, promote = pass"
    )
    return out


def run_all(null_runs: int, bad_runs: int, seed: int, workers: int) -> dict[str, dict[str, Any]]:
    return {
        "segments": {"ours": segments_scenario(null_runs, bad_runs, seed + 201, workers)},
        "label_delay": {"ours": label_delay_scenario(null_runs, bad_runs, seed + 301, workers)},
        "prediction_shift": {"ours": prediction_shift_scenario(null_runs, bad_runs, seed + 401, workers)},
    }
