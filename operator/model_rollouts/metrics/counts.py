"""Reading the cumulative counts of a proportion or mean metric from a provider."""

from __future__ import annotations

from typing import Any

from model_rollouts.analysis import stats
from model_rollouts.metrics.provider import MetricProvider, Result, render

#: The query fields of each metric type, in the order read_counts reads them.
METRIC_FIELDS = {"proportion": ("successes", "trials"), "mean": ("count", "sum", "sumSquares")}


def read_counts(
    metric: Any, provider: MetricProvider, values: dict[str, str]
) -> tuple[stats.ProportionData | stats.MeanData | None, Result | None]:
    """Cumulative counts of a proportion (successes, trials) or mean (count, sum, sumSquares) metric.

    ``metric`` is a rollout comparison or an experiment's primary metric (same query fields).
    Returns the data, or the measurement problem (error or NaN) that prevented reading it.
    """
    nums: list[float] = []
    for f in METRIC_FIELDS[metric.type]:
        r = provider.query(render(getattr(metric, f) or "", values))
        # No data is not zero: a query that matches no series (a typo, a counter that does not
        # exist yet) is a measurement problem that holds, never "zero events".
        if not r.ok or r.value is None:
            return None, Result(r.outcome, message=f"{f}: {r.message or r.outcome}")
        nums.append(max(0.0, r.value))
    if metric.type == "proportion":
        successes, trials = nums
        return stats.ProportionData(min(successes, trials), trials), None
    count, total, squares = nums
    if count <= 0:
        return stats.MeanData(0.0, 0.0, 0.0), None
    # increase() extrapolates each counter on its own: keep the sums consistent with one sample.
    return stats.MeanData(count, total, max(squares, total * total / count)), None
