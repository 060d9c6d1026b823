"""Judge: sample-ratio mismatch, the arms' sample counts against the split that was set."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from model_rollouts.analysis import stats
from model_rollouts.analysis.judge import Judge
from model_rollouts.analysis.vocabulary import Finding


@dataclass(frozen=True)
class SrmSpec:
    alpha: float
    names: tuple[str, ...]
    #: The weights in force, in the order of ``names``.
    weights: tuple[float, ...]
    #: The capped boundary's horizon (total samples), when fixed in advance; None: the mixture alone.
    horizon: float | None = None
    #: The p-value at the previous analysis of this count (the running minimum is kept).
    previous: float | None = None


def p_value(spec: SrmSpec, counts: Sequence[float]) -> float:
    """The SRM p-value, valid however often it is looked at.

    ``stats.srm_sequential``: an anytime-valid test (a Dirichlet-multinomial mixture, Lindon & Malek
    2022, with a capped linear boundary when ``horizon`` is known). Its p-value only ever falls during
    one count, so the running minimum is kept.
    """
    p = float(stats.srm_sequential(list(counts), list(spec.weights), horizon=spec.horizon))
    return min(p, spec.previous) if spec.previous is not None else p


def samples_text(spec: SrmSpec, counts: Sequence[float]) -> str:
    return ", ".join(
        f"{n} {c:.0f} at weight {w:.0f}" for n, c, w in zip(spec.names, counts, spec.weights, strict=True)
    )


def judge(spec: SrmSpec, counts: Sequence[float]) -> Finding:
    """``fail`` (a mismatch) when p < alpha, else ``pass``; numbers: the p-value and each arm's count."""
    p = p_value(spec, counts)
    detail = samples_text(spec, counts)
    numbers = {"pValue": p, **{f"n/{n}": c for n, c in zip(spec.names, counts, strict=True)}}
    if p < spec.alpha:
        msg = f"sample-ratio mismatch: p = {p:.3g} < srmAlpha {spec.alpha:g}; samples {detail}"
        return Finding("fail", msg, value=p, numbers=numbers)
    return Finding(
        "pass", f"p = {p:.3g} >= srmAlpha {spec.alpha:g}; samples {detail}", value=p, numbers=numbers
    )


_: Judge[SrmSpec, Sequence[float]] = judge
