"""Guardrail evaluation (pure): a measurement against min/max bounds, with failure counting."""

from __future__ import annotations

from dataclasses import dataclass

from model_rollouts.api.common import Guardrail, Measurement
from model_rollouts.metrics.provider import Result


def threshold_text(g: Guardrail) -> str:
    parts = []
    if g.min is not None:
        parts.append(f">= {g.min:g}")
    if g.max is not None:
        parts.append(f"<= {g.max:g}")
    return " and ".join(parts)


def evaluate(g: Guardrail, result: Result, variant: str) -> Measurement:
    """One guardrail measurement. Only a finite value inside the bounds passes."""
    thr = threshold_text(g)
    if result.outcome == "error":
        return Measurement(
            name=g.name,
            kind="guardrail",
            variant=variant,
            outcome="error",
            threshold=thr,
            verdict="error",
            message=f"{g.name}: measurement failed: {result.message}",
        )
    if result.outcome in ("noData", "nan") or result.value is None:
        why = "no data" if result.outcome == "noData" else f"not a number ({result.message})"
        return Measurement(
            name=g.name,
            kind="guardrail",
            variant=variant,
            outcome=result.outcome,
            threshold=thr,
            verdict="noData",
            message=f"{g.name}: {why}",
        )
    v = result.value
    breached = (g.min is not None and v < g.min) or (g.max is not None and v > g.max)
    verdict = "fail" if breached else "pass"
    return Measurement(
        name=g.name,
        kind="guardrail",
        variant=variant,
        outcome="value",
        value=v,
        threshold=thr,
        verdict=verdict,
        message=f"{g.name} = {v:.4g} ({'breaches' if breached else 'within'} {thr})",
    )


def update_failures(
    previous: dict[str, int], measurements: list[Measurement], key_prefix: str = ""
) -> dict[str, int]:
    """Consecutive-breach counters: a fail adds one, a pass resets, no data or an error leaves it."""
    out = dict(previous)
    for m in measurements:
        key = f"{key_prefix}{m.name}"
        if m.verdict == "fail":
            out[key] = out.get(key, 0) + 1
        elif m.verdict == "pass":
            out[key] = 0
    return out


@dataclass(frozen=True)
class Gate:
    """What the measurements of one analysis allow, the same for both kinds.

    ``noData`` has one meaning everywhere: a measurement with no data or NaN is never a pass and
    never zero. Under ``noData: hold`` it holds (nothing advances, promotes or is decided); under
    ``noData: fail`` it fails at once (``fail`` is that measurement). A failed measurement
    (``error``: provider unreachable, timeout, bad query) always holds and counts toward
    ``errorLimit``; it never fails by itself.
    """

    fail: Measurement | None
    missing: tuple[Measurement, ...]
    error: bool

    @property
    def ok(self) -> bool:
        return self.fail is None and not self.missing

    def reasons(self) -> list[str]:
        return [m.message for m in self.missing]


def gate(measurements: list[Measurement], no_data: str) -> Gate:
    missing = tuple(m for m in measurements if m.verdict in ("noData", "error"))
    fail = next((m for m in missing if m.verdict == "noData"), None) if no_data == "fail" else None
    return Gate(fail=fail, missing=missing, error=any(m.verdict == "error" for m in missing))


def consecutive_errors(previous: int, g: Gate) -> int:
    """Analyses in a row with a failed measurement; any analysis without one resets the count."""
    return previous + 1 if g.error else 0
