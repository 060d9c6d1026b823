"""Writes the Grafana dashboards in this folder (``python dashboards/generate.py``; ``--check`` compares).

The JSON files are what users import and what the chart ships; this script is their one source, so
panel ids, variables and datasource references stay consistent. tests/unit/test_dashboards.py
fails when a JSON file differs from what this script writes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}
ROLLOUT, EXPERIMENT = "ModelRollout", "ModelExperiment"


def query_var(name: str, label: str, query: str, *, multi: bool, all_: bool) -> dict[str, Any]:
    v: dict[str, Any] = {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-values"},
        "refresh": 2,  # on time range change: new objects show up
        "sort": 1,
        "multi": multi,
        "includeAll": all_,
        "current": {},
        "hide": 0,
    }
    if all_:
        v["allValue"] = ".*"
    return v


def variables(kind: str | None, extra: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    sel = f'kind="{kind}"' if kind else 'kind=~".+"'
    overview = kind is None
    return {
        "list": [
            {
                "name": "datasource",
                "label": "Data source",
                "type": "datasource",
                "query": "prometheus",
                "current": {},
                "hide": 0,
                "refresh": 1,
            },
            query_var(
                "namespace",
                "Namespace",
                f"label_values(mlrollouts_phase{{{sel}}}, namespace)",
                multi=overview,
                all_=overview,
            ),
            query_var(
                "name",
                "Name",
                f'label_values(mlrollouts_phase{{{sel}, namespace=~"$namespace"}}, name)',
                multi=overview,
                all_=overview,
            ),
            *(extra or []),
        ]
    }


class Board:
    """Panels laid out left to right, top to bottom, on Grafana's 24-column grid; ids in order."""

    def __init__(self, uid: str, title: str, description: str, templating: dict[str, Any]) -> None:
        self.uid, self.title, self.description, self.templating = uid, title, description, templating
        self.panels: list[dict[str, Any]] = []
        self.x = self.y = self.row_h = 0

    def add(self, panel: dict[str, Any], w: int, h: int) -> None:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        panel = {"id": len(self.panels) + 1, "gridPos": {"x": self.x, "y": self.y, "w": w, "h": h}, **panel}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)

    def row(self, title: str, repeat: str | None = None) -> None:
        self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        p: dict[str, Any] = {"type": "row", "title": title, "collapsed": False, "panels": []}
        if repeat:
            p["repeat"] = repeat
        self.add(p, 24, 1)
        self.x, self.y, self.row_h = 0, self.y + 1, 0

    def json(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["model-rollouts"],
            "editable": True,
            "graphTooltip": 1,
            "schemaVersion": 39,
            "version": 1,
            "refresh": "30s",
            "time": {"from": "now-1h", "to": "now"},
            "timezone": "browser",
            "annotations": {
                "list": [
                    {
                        "name": "Annotations & Alerts",
                        "builtIn": 1,
                        "type": "dashboard",
                        "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                        "enable": True,
                        "hide": True,
                        "iconColor": "rgba(0, 211, 255, 1)",
                    }
                ]
            },
            "templating": self.templating,
            "panels": self.panels,
        }


def target(expr: str, legend: str, ref: str = "A", **extra: Any) -> dict[str, Any]:
    return {"refId": ref, "datasource": DS, "expr": expr, "legendFormat": legend, "range": True, **extra}


def timeseries(
    title: str,
    targets: list[dict[str, Any]],
    *,
    unit: str = "short",
    description: str = "",
    overrides: list[dict[str, Any]] | None = None,
    custom: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": [{**t, "refId": chr(ord("A") + i)} for i, t in enumerate(targets)],
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": {
                    "drawStyle": "line",
                    "lineWidth": 2,
                    "fillOpacity": 0,
                    "showPoints": "never",
                    **(custom or {}),
                },
            },
            "overrides": overrides or [],
        },
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        **extra,
    }


def by_name(name: str, **props: Any) -> dict[str, Any]:
    return {
        "matcher": {"id": "byName", "options": name},
        "properties": [{"id": k, "value": v} for k, v in props.items()],
    }


def band(title: str, sel: str, description: str, middle: str = "difference") -> dict[str, Any]:
    """The difference with its confidence interval drawn as a shaded band, and a line at 0."""
    panel = timeseries(
        title,
        [
            target(f"mlrollouts_comparison_ci_low{{{sel}}}", "ciLow"),
            target(f"mlrollouts_comparison_ci_high{{{sel}}}", "ciHigh"),
            target(f"mlrollouts_comparison_difference{{{sel}}}", middle),
        ],
        description=description,
        overrides=[
            by_name(
                "ciHigh", **{"custom.fillBelowTo": "ciLow", "custom.lineWidth": 0, "custom.fillOpacity": 25}
            ),
            by_name("ciLow", **{"custom.lineWidth": 0}),
            by_name(middle, color={"mode": "fixed", "fixedColor": "blue"}),
        ],
        custom={"thresholdsStyle": {"mode": "line"}},
    )
    panel["fieldConfig"]["defaults"]["thresholds"] = {
        "mode": "absolute",
        "steps": [{"color": "transparent", "value": None}, {"color": "text", "value": 0}],
    }
    return panel


def stat(
    title: str, expr: str, legend: str, *, unit: str = "short", description: str = "", **extra: Any
) -> dict[str, Any]:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": [target(expr, legend, range=False, instant=True)],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
        },
        **extra,
    }


def state_timeline(title: str, expr: str, legend: str, description: str = "") -> dict[str, Any]:
    return {
        "type": "state-timeline",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": [target(expr, legend)],
        "fieldConfig": {
            "defaults": {
                "color": {"mode": "thresholds"},
                "thresholds": {
                    "mode": "absolute",
                    "steps": [{"color": "transparent", "value": None}, {"color": "green", "value": 1}],
                },
                "mappings": [{"type": "value", "options": {"0": {"text": " "}, "1": {"text": "current"}}}],
            },
            "overrides": [
                by_name(p, **{"color": {"mode": "fixed", "fixedColor": c}})
                for p, c in (("RolledBack", "red"), ("Aborted", "orange"), ("Invalid", "purple"))
            ],
        },
        "options": {"showValue": "never", "mergeValues": True, "rowHeight": 0.8},
    }


# -- the three dashboards ----------------------------------------------------------------------------


def overview() -> dict[str, Any]:
    obj = 'namespace=~"$namespace", name=~"$name"'
    b = Board(
        "mlrollouts-overview",
        "Model Rollouts / Operator overview",
        "Every ModelRollout and ModelExperiment: phases, decisions, reconcile errors, analysis durations.",
        variables(None),
    )
    b.row("Objects")
    b.add(
        stat(
            "Leader replicas",
            "sum(mlrollouts_leader)",
            "leaders",
            description="1 is healthy: one replica acts.",
        ),
        4,
        4,
    )
    for i, (phase, color) in enumerate(
        (("Progressing|Running", "blue"), ("Paused", "yellow"), ("RolledBack", "red"), ("Invalid", "purple"))
    ):
        b.add(
            stat(
                phase.replace("|", " / "),
                f'count(mlrollouts_phase{{{obj}, phase=~"{phase}"}} == 1) or vector(0)',
                phase,
                description=f"Objects whose phase is {phase.replace('|', ' or ')} now.",
                fieldConfig={
                    "defaults": {"unit": "short", "color": {"mode": "fixed", "fixedColor": color}},
                    "overrides": [],
                },
            ),
            5 if i < 4 else 4,
            4,
        )
    b.add(
        {
            "type": "table",
            "title": "Current phase of each object",
            "datasource": DS,
            "targets": [
                target(f"mlrollouts_phase{{{obj}}} == 1", "", range=False, instant=True, format="table")
            ],
            "fieldConfig": {"defaults": {}, "overrides": []},
            "options": {"showHeader": True},
            "transformations": [
                {
                    "id": "organize",
                    "options": {
                        "excludeByName": {
                            "Time": True,
                            "Value": True,
                            "__name__": True,
                            "instance": True,
                            "job": True,
                        }
                    },
                }
            ],
        },
        12,
        9,
    )
    b.add(
        timeseries(
            "Objects per phase",
            [target(f"count by (kind, phase) (mlrollouts_phase{{{obj}}} == 1)", "{{kind}} {{phase}}")],
            custom={"drawStyle": "line", "stacking": {"mode": "normal"}, "fillOpacity": 30},
        ),
        12,
        9,
    )
    b.row("Decisions and errors")
    b.add(
        timeseries(
            "Decisions",
            [
                target(
                    f"sum by (decision) (increase(mlrollouts_decisions_total{{{obj}}}[$__rate_interval]))",
                    "{{decision}}",
                )
            ],
            description="Transitions the engines decided (Events), by reason.",
            custom={"drawStyle": "bars", "fillOpacity": 60, "stacking": {"mode": "normal"}},
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Reconcile errors",
            [
                target(
                    f"sum by (namespace, name, reason) "
                    f"(increase(mlrollouts_reconcile_errors_total{{{obj}}}[$__rate_interval]))",
                    "{{namespace}}/{{name}} {{reason}}",
                ),
                target(
                    f"mlrollouts_reconcile_errors_consecutive{{{obj}}} > 0",
                    "{{namespace}}/{{name}} failing in a row",
                ),
            ],
            description="Decisions that could not be applied "
            "(route write failed or not verified, API errors).",
            custom={"drawStyle": "bars", "fillOpacity": 60},
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Measurement errors and limits reached",
            [
                target(
                    f"sum by (namespace, name) "
                    f"(increase(mlrollouts_measurement_errors_total{{{obj}}}[$__rate_interval]))",
                    "{{namespace}}/{{name}} query errors",
                ),
                target(
                    f"sum by (namespace, name, reason) "
                    f"(increase(mlrollouts_limits_reached_total{{{obj}}}[$__rate_interval]))",
                    "{{namespace}}/{{name}} {{reason}}",
                ),
            ],
            custom={"drawStyle": "bars", "fillOpacity": 60},
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Analysis duration",
            [
                target(
                    f"histogram_quantile({q}, sum by (le, kind) "
                    "(rate(mlrollouts_analysis_duration_seconds_bucket[$__rate_interval])))",
                    f"{{{{kind}}}} p{int(q * 100)}",
                )
                for q in (0.5, 0.9, 0.99)
            ],
            unit="s",
            description="Time to measure, decide and apply one analysis interval "
            "(quantiles over all objects).",
        ),
        12,
        8,
    )
    return b.json()


def rollout() -> dict[str, Any]:
    obj = f'kind="{ROLLOUT}", namespace="$namespace", name="$name"'
    metric_var = query_var(
        "metric",
        "Comparison",
        f"label_values(mlrollouts_comparison_difference{{{obj}}}, metric)",
        multi=True,
        all_=True,
    )
    b = Board(
        "mlrollouts-rollout",
        "Model Rollouts / Rollout",
        "One ModelRollout: weight over time, guardrails against their thresholds, and each comparison's "
        "candidate vs stable estimates with the difference's confidence band.",
        variables(ROLLOUT, [metric_var]),
    )
    b.row("Traffic and phase")
    b.add(
        timeseries(
            "Weight",
            [target(f"mlrollouts_weight{{{obj}}}", "{{variant}}")],
            unit="percent",
            description="The traffic weight the operator wrote to the route.",
            custom={"drawStyle": "line", "lineInterpolation": "stepAfter", "fillOpacity": 20},
            overrides=[
                by_name("candidate", color={"mode": "fixed", "fixedColor": "orange"}),
                by_name("stable", color={"mode": "fixed", "fixedColor": "green"}),
            ],
        ),
        16,
        8,
    )
    b.add(state_timeline("Phase", f"mlrollouts_phase{{{obj}}} == 1", "{{phase}}"), 8, 8)
    b.add(
        timeseries(
            "Guardrails against their thresholds",
            [
                target(f"mlrollouts_guardrail_value{{{obj}}}", "{{guardrail}} ({{variant}})"),
                target(f"mlrollouts_guardrail_threshold{{{obj}}}", "{{guardrail}} {{bound}}"),
            ],
            description="Each guardrail's latest measurement of the candidate, "
            "and its min/max from the spec (dashed).",
            overrides=[
                {
                    "matcher": {"id": "byFrameRefID", "options": "B"},
                    "properties": [{"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}}],
                }
            ],
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Decisions and deadline",
            [
                target(f"increase(mlrollouts_decisions_total{{{obj}}}[$__rate_interval])", "{{decision}}"),
                target(f"mlrollouts_progress_deadline_exceeded{{{obj}}}", "progress deadline exceeded"),
            ],
            custom={"drawStyle": "bars", "fillOpacity": 60},
        ),
        12,
        8,
    )
    b.row("Comparison $metric", repeat="metric")
    sel = f'{obj}, metric="$metric"'
    b.add(
        timeseries(
            "$metric: candidate vs stable",
            [target(f"mlrollouts_comparison_estimate{{{sel}}}", "{{variant}}")],
            description="Each arm's estimate in the current revision "
            "(counted from the current epoch's start).",
            overrides=[
                by_name("candidate", color={"mode": "fixed", "fixedColor": "orange"}),
                by_name("stable", color={"mode": "fixed", "fixedColor": "green"}),
            ],
        ),
        8,
        8,
    )
    b.add(
        band(
            "$metric: difference (candidate - stable) with its confidence band",
            f'{sel}, variant="candidate"',
            "The shaded band is the anytime-valid confidence sequence of the difference; the test passes "
            "when it clears the margin in the better direction.",
        ),
        10,
        8,
    )
    b.add(
        timeseries(
            "$metric: samples",
            [target(f"mlrollouts_comparison_samples{{{sel}}}", "{{variant}}")],
            description="Trials or counts behind each arm's estimate.",
        ),
        6,
        8,
    )
    return b.json()


def experiment() -> dict[str, Any]:
    obj = f'kind="{EXPERIMENT}", namespace="$namespace", name="$name"'
    variant_var = query_var(
        "variant",
        "Variant",
        f"label_values(mlrollouts_comparison_difference{{{obj}}}, variant)",
        multi=True,
        all_=True,
    )
    b = Board(
        "mlrollouts-experiment",
        "Model Rollouts / Experiment",
        "One ModelExperiment: each variant's estimate, its difference to the control with the confidence "
        "band, the traffic split (set and observed) and the sample-ratio-mismatch check.",
        variables(EXPERIMENT, [variant_var]),
    )
    b.row("Estimates and split")
    b.add(
        timeseries(
            "Primary metric per variant",
            [target(f"mlrollouts_comparison_estimate{{{obj}}}", "{{variant}}")],
            description="Each variant's estimate of the primary metric since the experiment started.",
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Traffic split (set by the operator)",
            [target(f"mlrollouts_weight{{{obj}}}", "{{variant}}")],
            unit="percent",
            custom={
                "drawStyle": "line",
                "lineInterpolation": "stepAfter",
                "fillOpacity": 30,
                "stacking": {"mode": "normal"},
            },
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Observed split (share of requests)",
            [
                target(
                    f"mlrollouts_variant_requests{{{obj}}} / ignoring(variant) group_left "
                    f"sum without (variant) (mlrollouts_variant_requests{{{obj}}})",
                    "{{variant}}",
                )
            ],
            unit="percentunit",
            description="Requests each variant served (analysis.requests) as a share of all: "
            "what the SRM check compares with the set split.",
        ),
        8,
        8,
    )
    b.add(
        timeseries(
            "Sample-ratio mismatch",
            [
                target(f"mlrollouts_srm_p_value{{{obj}}}", "SRM p-value"),
                target(f"mlrollouts_srm_mismatch{{{obj}}}", "paused for SRM"),
            ],
            description="The SRM test's p-value (log scale); "
            "'paused for SRM' is 1 while the experiment holds for it.",
            custom={"scaleDistribution": {"type": "log", "log": 10}},
        ),
        8,
        8,
    )
    b.add(state_timeline("Phase", f"mlrollouts_phase{{{obj}}} == 1", "{{phase}}"), 8, 8)
    b.add(
        timeseries(
            "Guardrails per variant against their thresholds",
            [
                target(f"mlrollouts_guardrail_value{{{obj}}}", "{{guardrail}} ({{variant}})"),
                target(f"mlrollouts_guardrail_threshold{{{obj}}}", "{{guardrail}} {{bound}}"),
            ],
            overrides=[
                {
                    "matcher": {"id": "byFrameRefID", "options": "B"},
                    "properties": [{"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}}],
                }
            ],
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "p-values (unadjusted)",
            [target(f"mlrollouts_comparison_p_value{{{obj}}}", "{{variant}}")],
            custom={"scaleDistribution": {"type": "log", "log": 10}},
        ),
        12,
        8,
    )
    b.row("Variant $variant vs control", repeat="variant")
    b.add(
        band(
            "$variant: difference to the control with its confidence band",
            f'{obj}, variant="$variant"',
            "The shaded band is the confidence interval (sequence) of the variant minus the control.",
        ),
        16,
        8,
    )
    b.add(
        timeseries(
            "$variant: samples",
            [target(f'mlrollouts_comparison_samples{{{obj}, variant="$variant"}}', "{{variant}}")],
        ),
        8,
        8,
    )
    return b.json()


DASHBOARDS = {
    "model-rollouts-overview.json": overview,
    "model-rollouts-rollout.json": rollout,
    "model-rollouts-experiment.json": experiment,
}


def render(make: Any) -> str:
    return json.dumps(make(), indent=2, sort_keys=False) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--check", action="store_true", help="exit 1 if a file differs from what would be written"
    )
    args = ap.parse_args()
    stale = []
    for file, make in DASHBOARDS.items():
        path, text = HERE / file, render(make)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(file)
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)}; run python dashboards/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
