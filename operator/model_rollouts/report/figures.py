"""The report's panels, drawn with matplotlib (object API on the Agg canvas: no display, no pyplot state).

Every panel is a time series over the analyses in ``status.series``, with the thresholds the
operator decided against and a vertical marker at each decision in ``status.history``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from model_rollouts.report.data import (
    EXPERIMENT,
    Decision,
    Report,
    control_of,
    experiment_variants,
    parse_time,
    rollout_weights,
    series_of,
    values_of,
)

try:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.dates as mdates
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("the decision report needs matplotlib: pip install 'model-rollouts[report]'") from e

WIDTH_IN, PANEL_HEIGHT_IN, DPI = 10.0, 3.6, 110
#: Colors: a colorblind-safe cycle (Okabe-Ito) for variants; red/green for verdicts.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]
BAD = {"RolledBack", "Aborted", "GuardrailFailed", "ComparisonFailed", "VariantDropped", "ErrorLimitReached"}
GOOD = {"Promoted", "Concluded", "AnalysisPassed", "WinnerPromoted"}


@dataclass
class Panel:
    """One titled plot: ``draw`` fills an Axes; ``caption`` says what to read from it."""

    key: str
    title: str
    caption: str
    draw: Callable[[Axes], None]


def _fmt_time_axis(ax: Axes, start: datetime | None, span: tuple[datetime, datetime] | None = None) -> None:
    if span is not None:  # every panel of a report on one time range, even one with a single point
        lo, hi = span
        pad = max((hi - lo) * 0.03, timedelta(seconds=1))
        ax.set_xlim(mdates.date2num(lo - pad), mdates.date2num(hi + pad))
    locator = mdates.AutoDateLocator(tz=UTC, minticks=4, maxticks=9)
    locator.intervald[mdates.SECONDLY] = [1, 2, 5, 10, 15, 30]
    locator.intervald[mdates.MINUTELY] = [1, 2, 5, 10, 15, 30]
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S", tz=UTC))
    day = start.strftime("%Y-%m-%d") if start else ""
    ax.set_xlabel(f"time (UTC{', ' + day if day else ''})")
    ax.grid(True, alpha=0.3)


def _decision_color(d: Decision) -> str:
    if d.event in BAD or d.reason in BAD:
        return "#D55E00"
    if d.event in GOOD or d.reason in GOOD:
        return "#009E73"
    return "#666666"


def _markers(ax: Axes, decisions: Sequence[Decision], label: bool) -> None:
    """A dotted vertical line at each decision; with ``label``, its name at the top of the axes."""
    first = True
    for d in decisions:
        if not d.marked:
            continue
        color = _decision_color(d)
        x = float(mdates.date2num(d.time))
        ax.axvline(x, color=color, linestyle=":", linewidth=1.4, label="decision" if first else None)
        first = False
        if label:
            ax.annotate(
                d.reason or d.event,
                xy=(x, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(2, -4),
                textcoords="offset points",
                rotation=90,
                va="top",
                ha="left",
                fontsize=7,
                color=color,
            )


def _x(ts: Sequence[datetime]) -> list[float]:
    """Times as matplotlib date numbers (the axis formats them as UTC clock times)."""
    return [float(mdates.date2num(t)) for t in ts]


def _xy(pts: Sequence[tuple[datetime, float]]) -> tuple[list[float], list[float]]:
    return _x([t for t, _ in pts]), [y for _, y in pts]


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} recorded", ha="center", va="center", transform=ax.transAxes, color="#666")


def _nums(ys: Sequence[float | None], scale: float = 1.0) -> list[float]:
    return [math.nan if y is None else y * scale for y in ys]


def _zoom(ax: Axes, keep: Sequence[float]) -> None:
    """Y-limits that show ``keep`` (estimates, thresholds, the latest interval) with some room.

    Early confidence sequences are very wide; drawn to scale they would flatten everything after
    them, so they run off the axes instead (which is how wide they are).
    """
    vals = [v for v in keep if math.isfinite(v)]
    if not vals:
        return
    lo, hi = min(vals), max(vals)
    pad = (hi - lo) * 0.15 or max(abs(hi), 1.0) * 0.1
    ax.set_ylim(lo - pad, hi + pad)


def _legend(ax: Axes) -> None:
    handles, _ = ax.get_legend_handles_labels()
    if handles:  # beside the plot: never over the data
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, borderaxespad=0)


# -- rollouts ------------------------------------------------------------------------------------------


def rollout_panels(r: Report) -> list[Panel]:
    spec, analysis = r.spec, r.spec.get("analysis") or {}
    stable = (spec.get("stable") or {}).get("service", "stable")
    candidate = (spec.get("candidate") or {}).get("service", "candidate")
    start = min([t for t, _ in rollout_weights(r)], default=None)

    def weight(ax: Axes) -> None:
        pts = rollout_weights(r)
        if not pts:
            _no_data(ax, "weights")
        else:
            xs, ws = _xy([(t, float(w)) for t, w in pts])
            ax.step(xs, ws, where="post", color=PALETTE[0], linewidth=2, label=f"candidate {candidate}")
            ax.fill_between(xs, ws, step="post", color=PALETTE[0], alpha=0.15)
            analysed = [float(p.get("weight") or 0) for p in r.series]
            ax.scatter(_x(r.times()), analysed, s=12, color=PALETTE[0], zorder=3, label="analysis")
        ax.set_ylim(-3, 103)
        ax.set_ylabel("candidate weight (% of traffic)")
        _markers(ax, r.decisions, label=True)
        _fmt_time_axis(ax, start, r.span())
        _legend(ax)

    panels = [
        Panel(
            "weights",
            f"Traffic: candidate {candidate} vs stable {stable}",
            "Candidate share of traffic after each analysis (dots) and each decision (dotted lines).",
            weight,
        )
    ]
    for c in analysis.get("comparisons") or []:
        panels.append(_comparison_panel(r, c, start))
    for g in analysis.get("guardrails") or []:
        panels.append(_guardrail_panel(r, g, start, variants=["candidate"]))
    return panels + holdout_panels(r)


def holdout_panels(r: Report) -> list[Panel]:
    """One panel per holdout comparison (status.postPromotion.holdout): its effect trajectory."""
    pp = r.status.get("postPromotion") or {}
    post = r.spec.get("postPromotion") or {}
    specs = post.get("comparisons") or (r.spec.get("analysis") or {}).get("comparisons") or []
    by_name = {str(c.get("name")): c for c in specs}
    return [
        _holdout_panel(
            row, by_name.get(str(row.get("name"))) or {}, str(pp.get("previousStable") or "stable")
        )
        for row in pp.get("holdout") or []
        if row.get("trajectory")
    ]


def _holdout_panel(row: dict[str, Any], c: dict[str, Any], previous: str) -> Panel:
    """The effect (candidate - the replaced model) over the holdout with its confidence band, the
    estimate at promotion for reference, and the test's threshold."""
    name, gain = str(row.get("name")), str(row.get("gain") or "undecided")
    test, margin = str(c.get("test") or "nonInferiority"), float(c.get("margin") or 0.0)
    better = str(c.get("better") or "higher")
    scale, unit = (
        (100.0, "percentage points")
        if (c.get("type") or "proportion") == "proportion"
        else (1.0, "metric units")
    )
    threshold = ((-1.0 if better == "higher" else 1.0) * margin if test == "nonInferiority" else 0.0) * scale
    pts = [p for p in row.get("trajectory") or [] if p.get("effect") is not None]
    times = [parse_time(p["time"]) for p in pts]

    def draw(ax: Axes) -> None:
        xs = _x(times)
        eff = _nums([p.get("effect") for p in pts], scale)
        lo, hi = _nums([p.get("lower") for p in pts], scale), _nums([p.get("upper") for p in pts], scale)
        ax.fill_between(xs, lo, hi, color=PALETTE[2], alpha=0.2, label="confidence sequence")
        ax.plot(xs, eff, color=PALETTE[2], marker="o", markersize=3, label=f"effect (candidate - {previous})")
        keep = [0.0, threshold, *eff, lo[-1], hi[-1]]
        then = row.get("atPromotion") or {}
        if then.get("effect") is not None:
            y = float(then["effect"]) * scale
            ax.axhline(
                y, color=PALETTE[1], linestyle=":", linewidth=1.4, label=f"estimate at promotion {y:+.3g}"
            )
            keep.append(y)
        ax.axhline(0.0, color="#333", linewidth=0.8, label="no difference")
        if threshold:
            ax.axhline(
                threshold, color="#D55E00", linestyle="--", linewidth=1.2, label=f"margin {threshold:+.3g}"
            )
        _zoom(ax, keep)
        ax.set_ylabel(f"effect ({unit})")
        _fmt_time_axis(ax, times[0] if times else None)
        _legend(ax)

    return Panel(
        f"holdout-{name}",
        f"Holdout {name}: effect over time, gain {gain}",
        f"The candidate's effect against {previous}, which kept a share of traffic after promotion, with "
        "its always-valid confidence sequence at each analysis (at most 48 points, evenly thinned); held "
        f"when the band clears the {test} threshold again, decayed when it shows the candidate worse.",
        draw,
    )


def _comparison_panel(r: Report, c: dict[str, Any], start: datetime | None) -> Panel:
    name, test = str(c.get("name")), str(c.get("test") or "nonInferiority")
    margin, better = float(c.get("margin") or 0.0), str(c.get("better") or "higher")
    proportion = (c.get("type") or "proportion") == "proportion"
    scale, unit = (100.0, "percentage points") if proportion else (1.0, "metric units")
    # The difference must lie above (higher is better) or below this line for the test to pass.
    sign = -1.0 if better == "higher" else 1.0
    threshold = sign * margin if test == "nonInferiority" else 0.0

    def draw(ax: Axes) -> None:
        ts, ms = values_of(r, "comparison", name)
        pts = [(t, m) for t, m in zip(ts, ms, strict=True) if m is not None]
        if not pts:
            _no_data(ax, f"measurement of {name}")
        else:
            tt = _x([t for t, _ in pts])
            diff = _nums([m.get("value") for _, m in pts], scale)
            lo = _nums([m.get("ciLow") for _, m in pts], scale)
            hi = _nums([m.get("ciHigh") for _, m in pts], scale)
            ax.fill_between(tt, lo, hi, color=PALETTE[0], alpha=0.2, label="confidence sequence")
            ax.plot(
                tt, diff, color=PALETTE[0], marker="o", markersize=3, label="estimate (candidate - stable)"
            )
            for verdict, color, mark in (("pass", "#009E73", "^"), ("fail", "#D55E00", "v")):
                sel = [(t, d) for (t, m), d in zip(pts, diff, strict=True) if m.get("verdict") == verdict]
                if sel:
                    sx, sy = _xy(sel)
                    ax.scatter(sx, sy, color=color, marker=mark, s=36, zorder=4, label=f"verdict {verdict}")
        ax.axhline(0.0, color="#333", linewidth=0.8, label="no difference")
        if test == "nonInferiority" and margin > 0:
            label = f"non-inferiority margin {threshold * scale:+.3g}"
            ax.axhline(threshold * scale, color="#D55E00", linestyle="--", linewidth=1.2, label=label)
        if pts:
            _zoom(ax, [0.0, threshold * scale, *diff, lo[-1], hi[-1]])
        ax.set_ylabel(f"difference ({unit})")
        _markers(ax, r.decisions, label=False)
        _fmt_time_axis(ax, start, r.span())
        _legend(ax)

    goal = "passes once the whole interval is " + (
        f"{'above' if better == 'higher' else 'below'} {threshold * scale:+.3g} {unit}"
    )
    return Panel(
        f"comparison-{name}",
        f"Comparison {name}: candidate - stable ({test}, {better} is better)",
        f"Estimated difference with its always-valid confidence sequence; the {test} test {goal}.",
        draw,
    )


def _guardrail_panel(r: Report, g: dict[str, Any], start: datetime | None, variants: list[str]) -> Panel:
    name = str(g.get("name"))
    lo, hi = g.get("min"), g.get("max")
    limit = int(g.get("failureLimit") or 1)

    def draw(ax: Axes) -> None:
        any_points = False
        seen: list[float] = []
        for i, v in enumerate(variants):
            ts, ms = values_of(r, "guardrail", name, None if r.kind != EXPERIMENT else v)
            measured = [(t, m) for t, m in zip(ts, ms, strict=True) if m and m.get("value") is not None]
            if not measured:
                continue
            any_points = True
            color = PALETTE[i % len(PALETTE)]
            mx, my = _xy([(t, float(m["value"])) for t, m in measured])
            seen += my
            ax.plot(mx, my, color=color, marker="o", markersize=3, label=v)
            bad = [(t, float(m["value"])) for t, m in measured if m.get("verdict") == "fail"]
            if bad:
                bx, by = _xy(bad)
                label = f"{v}: breach" if len(variants) > 1 else "breach"
                ax.scatter(bx, by, color="#D55E00", marker="x", s=50, zorder=4, label=label)
        if not any_points:
            _no_data(ax, f"value of {name}")
        if hi is not None:
            ax.axhline(float(hi), color="#D55E00", linestyle="--", linewidth=1.2, label=f"max {float(hi):g}")
        if lo is not None:
            ax.axhline(float(lo), color="#D55E00", linestyle="-.", linewidth=1.2, label=f"min {float(lo):g}")
        bottom, top = ax.get_ylim()
        if bottom < 0 and all(v >= 0 for v in seen + [x for x in (lo, hi) if x is not None]):
            ax.set_ylim(0, top)
        ax.set_ylabel(f"{name} (units of its query)")
        _markers(ax, r.decisions, label=False)
        _fmt_time_axis(ax, start, r.span())
        _legend(ax)

    parts = [f"at least {lo:g}" if lo is not None else "", f"at most {hi:g}" if hi is not None else ""]
    bounds = " and ".join(x for x in parts if x)
    return Panel(
        f"guardrail-{name}",
        f"Guardrail {name}: must stay {bounds}",
        f"Measured value at each analysis; {limit} consecutive breach(es) (x) fail the analysis.",
        draw,
    )


# -- experiments ---------------------------------------------------------------------------------------


def experiment_panels(r: Report) -> list[Panel]:
    spec = r.spec
    names = experiment_variants(r)
    control = control_of(r) or (names[0] if names else "control")
    treatments = [n for n in names if n != control]
    color = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}
    pm = spec.get("primaryMetric") or {}
    metric = str(pm.get("name") or "primary metric")
    proportion = (pm.get("type") or "proportion") == "proportion"
    scale, unit = (100.0, "percentage points") if proportion else (1.0, "metric units")
    sc = spec.get("successCriteria") or {}
    alpha = float(sc.get("alpha") or 0.05)
    mde = sc.get("minimumDetectableEffect")
    method = str(sc.get("method") or "sequential")
    strategy = str((spec.get("allocation") or {}).get("strategy") or "fixed")
    srm_alpha = float((spec.get("stoppingRules") or {}).get("srmAlpha") or 0.001)
    start = r.times()[0] if r.series else None

    def allocation(ax: Axes) -> None:
        if not r.series:
            _no_data(ax, "allocation")
        else:
            ts = r.times()
            stacks = [_nums(series_of(r, n, "weight")[1]) for n in names]
            stacks = [[0.0 if math.isnan(y) else y for y in s] for s in stacks]
            ax.stackplot(
                _x(ts), stacks, labels=names, colors=[color[n] for n in names], alpha=0.8, step="post"
            )
        ax.set_ylim(0, 100)
        ax.set_ylabel("weight (% of traffic)")
        _markers(ax, r.decisions, label=True)
        _fmt_time_axis(ax, start, r.span())
        _legend(ax)

    def estimates(ax: Axes) -> None:
        drawn = False
        for n in names:
            ts, ys = series_of(r, n, "estimate")
            if any(y is not None for y in ys):
                drawn = True
                label = f"{n} (control)" if n == control else n
                ax.plot(_x(ts), _nums(ys, scale), color=color[n], marker="o", markersize=3, label=label)
        if not drawn:
            _no_data(ax, "estimate")
        ax.set_ylabel(f"{metric} ({'%' if proportion else 'metric units'})")
        _markers(ax, r.decisions, label=False)
        _fmt_time_axis(ax, start, r.span())
        _legend(ax)

    def differences(ax: Axes) -> None:
        drawn = False
        keep: list[float] = [0.0] + ([float(mde) * scale, -float(mde) * scale] if mde is not None else [])
        for n in treatments:
            ts, d = series_of(r, n, "difference")
            _, lo = series_of(r, n, "ciLow")
            _, hi = series_of(r, n, "ciHigh")
            if not any(y is not None for y in d):
                continue
            drawn = True
            xs = _x(ts)
            ax.fill_between(xs, _nums(lo, scale), _nums(hi, scale), color=color[n], alpha=0.18,
                            label=f"{n}: interval")  # fmt: skip
            ax.plot(xs, _nums(d, scale), color=color[n], marker="o", markersize=3, label=f"{n} - {control}")
            keep += _nums(d, scale) + _nums(lo[-1:], scale) + _nums(hi[-1:], scale)
        if not drawn:
            _no_data(ax, "comparison")
        ax.axhline(0.0, color="#333", linewidth=0.8, label="no difference")
        _zoom(ax, keep)
        if mde is not None:
            for s in (1, -1):
                ax.axhline(s * float(mde) * scale, color="#999", linestyle="--", linewidth=1,
                           label=f"± MDE {float(mde) * scale:.3g}" if s == 1 else None)  # fmt: skip
        ax.set_ylabel(f"difference ({unit})")
        _markers(ax, r.decisions, label=False)
        _fmt_time_axis(ax, start, r.span())
        _legend(ax)

    def pvalues(ax: Axes) -> None:
        key = "probabilityToBeBest" if method == "bayesian" else "adjustedPValue"
        drawn = False
        for n in treatments if key == "adjustedPValue" else names:
            ts, ys = series_of(r, n, key)
            if any(y is not None for y in ys):
                drawn = True
                vals = _nums(ys)
                if key == "adjustedPValue":
                    vals = [max(v, 1e-12) if not math.isnan(v) else v for v in vals]
                ax.plot(_x(ts), vals, color=color[n], marker="o", markersize=3, label=n)
        if not drawn:
            _no_data(ax, key)
        if key == "adjustedPValue":
            ax.set_yscale("log")
            ax.axhline(alpha, color="#D55E00", linestyle="--", linewidth=1.2, label=f"alpha {alpha:g}")
            ax.set_ylabel("Holm-adjusted p-value (log)")
        else:
            ax.set_ylim(0, 1)
            thr = float(sc.get("probabilityToBeBest") or 0.95)
            ax.axhline(thr, color="#009E73", linestyle="--", linewidth=1.2, label=f"threshold {thr:g}")
            ax.set_ylabel("P(best)")
        _markers(ax, r.decisions, label=False)
        _fmt_time_axis(ax, start, r.span())
        _legend(ax)

    def srm(ax: Axes) -> None:
        tested = [(t, p) for t, p in zip(r.times(), r.series, strict=True) if p.get("srmPValue") is not None]
        if tested:
            xs, ys = _xy([(t, max(float(p["srmPValue"]), 1e-12)) for t, p in tested])
            ax.plot(xs, ys, color=PALETTE[0], marker="o", markersize=3, label="SRM p-value")
            ax.set_yscale("log")
            bad = [
                (x, y)
                for x, y, (_, p) in zip(xs, ys, tested, strict=True)
                if p.get("srm") == "SampleRatioMismatch"
            ]
            if bad:
                bx, by = [x for x, _ in bad], [y for _, y in bad]
                ax.scatter(bx, by, color="#D55E00", marker="x", s=50, zorder=4, label="mismatch")
        else:
            states = sorted({str(p.get("srm")) for p in r.series if p.get("srm")})
            _no_data(ax, "SRM p-value" + (f" (state: {', '.join(states)})" if states else ""))
        ax.axhline(srm_alpha, color="#D55E00", linestyle="--", linewidth=1.2, label=f"srmAlpha {srm_alpha:g}")
        ax.set_ylabel("p-value (log)")
        _markers(ax, r.decisions, label=False)
        _fmt_time_axis(ax, start, r.span())
        _legend(ax)

    bandit = strategy == "thompson"
    panels = [
        Panel(
            "allocation",
            "Traffic allocation by variant" + (" (Thompson-sampling bandit)" if bandit else " (fixed split)"),
            "Each variant's weight after each analysis; dotted lines are decisions.",
            allocation,
        ),
        Panel(
            "estimates",
            f"Primary metric {metric}: estimate per variant",
            "Each variant's cumulative estimate at each analysis.",
            estimates,
        ),
        Panel(
            "differences",
            f"Difference from the control {control} with its {method} interval",
            "A variant wins when its interval clears zero in the better direction (after Holm's correction "
            "for the number of comparisons).",
            differences,
        ),
        Panel(
            "pvalues",
            "Probability to be best" if method == "bayesian" else "Holm-adjusted p-values vs the control",
            "Below alpha (dashed) is significant at the family-wise level."
            if method != "bayesian"
            else "Above the threshold (dashed) wins.",
            pvalues,
        ),
        Panel(
            "srm",
            "Sample-ratio mismatch (SRM) test",
            "Anytime-valid test that the observed traffic matches the configured split; "
            "below srmAlpha (dashed) the experiment pauses.",
            srm,
        ),
    ]
    for g in spec.get("guardrails") or []:
        panels.append(_guardrail_panel(r, g, start, variants=names))
    return panels


def panels_of(r: Report) -> list[Panel]:
    return experiment_panels(r) if r.kind == EXPERIMENT else rollout_panels(r)


# -- rendering -----------------------------------------------------------------------------------------


def render_panel(p: Panel, suptitle: str | None = None) -> Figure:
    fig = Figure(figsize=(WIDTH_IN, PANEL_HEIGHT_IN), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(p.title, fontsize=11, loc="left")
    p.draw(ax)
    if suptitle:
        fig.suptitle(suptitle, fontsize=12, fontweight="bold")
    return fig


def render_all(panels: Sequence[Panel], title: str) -> Figure:
    """All panels stacked in one figure (``-o png``), sharing the time axis."""
    fig = Figure(figsize=(WIDTH_IN, PANEL_HEIGHT_IN * len(panels) + 0.6), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, p in zip(axes, panels, strict=True):
        ax.set_title(p.title, fontsize=11, loc="left")
        p.draw(ax)
    fig.suptitle(title, fontsize=13, fontweight="bold")
    return fig


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": "model-rollouts report"})
    return buf.getvalue()
