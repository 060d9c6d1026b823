"""Judge: a guardrail's min/max bounds on the candidate's measurement (spec: ``Guardrail``)."""

from __future__ import annotations

from model_rollouts.analysis.judge import Arms, Judge
from model_rollouts.analysis.vocabulary import Finding, Result, measurement
from model_rollouts.api.common import Guardrail, Measurement

NOT_MEASURED = Result("error", message="not measured")


def threshold_text(g: Guardrail) -> str:
    parts = []
    if g.min is not None:
        parts.append(f">= {g.min:g}")
    if g.max is not None:
        parts.append(f"<= {g.max:g}")
    return " and ".join(parts)


def judge(g: Guardrail, arms: Arms[Result]) -> Finding:
    """Only a finite value inside the bounds passes; no data or NaN is ``noData``, a failure ``error``."""
    thr = threshold_text(g)
    result = arms.candidate or NOT_MEASURED
    if result.outcome == "error":
        return Finding("error", f"{g.name}: measurement failed: {result.message}", "error", threshold=thr)
    if result.outcome in ("noData", "nan") or result.value is None:
        why = "no data" if result.outcome == "noData" else f"not a number ({result.message})"
        return Finding("noData", f"{g.name}: {why}", result.outcome, threshold=thr)
    v = result.value
    breached = (g.min is not None and v < g.min) or (g.max is not None and v > g.max)
    return Finding(
        "fail" if breached else "pass",
        f"{g.name} = {v:.4g} ({'breaches' if breached else 'within'} {thr})",
        value=v,
        threshold=thr,
    )


_: Judge[Guardrail, Arms[Result]] = judge


def measure(g: Guardrail, result: Result | None, variant: str) -> Measurement:
    """The guardrail's measurement of one arm as stored in status."""
    return measurement(judge(g, Arms(None, result)), g.name, "guardrail", variant)
