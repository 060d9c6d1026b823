"""Write a decision report: one PNG, a self-contained HTML page, or Markdown with PNGs beside it."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from model_rollouts.analysis import comparison
from model_rollouts.report.data import EXPERIMENT, Report, load
from model_rollouts.report.figures import Panel, panels_of, png_bytes, render_all, render_panel

FORMATS = ("html", "png", "md")


@dataclass
class Written:
    """What was written: the main file, and the images (the main file itself for png)."""

    path: Path
    images: list[Path]
    panels: list[str]  # panel titles, in order


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _ts(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def summary_rows(r: Report) -> list[tuple[str, str]]:
    """Key facts at the top of the report."""
    st = r.status
    rows = [("Phase", r.phase), ("Message", str(st.get("message") or ""))]
    if r.kind == EXPERIMENT:
        rows += [("Decision", _fmt(st.get("decision"))), ("Winner", _fmt(st.get("winner"))),
                 ("SRM p-value", _fmt(st.get("srmPValue")))]  # fmt: skip
    else:
        spec = r.spec
        rows += [
            ("Stable", str((spec.get("stable") or {}).get("service", ""))),
            ("Candidate", str((spec.get("candidate") or {}).get("service", ""))),
            ("Weight", f"{st.get('weight', 0)}% at step {st.get('currentStep', 0)}"),
        ]
        pp = st.get("postPromotion") or {}
        if pp:
            gain = f", gain {pp['gain']}" if pp.get("gain") else ""
            rows.append(
                ("After promotion", f"stage {pp.get('stage')} (replaced: {pp.get('previousStable')}){gain}")
            )
    rows.append(("Analyses in the report", f"{len(r.series)} (status.series keeps the last 120)"))
    ours = r.annotations_of_ours()
    if ours:
        rows.append(("Annotations", ", ".join(f"{k}={v}" for k, v in ours.items())))
    handled = {k: v for k, v in (st.get("handled") or {}).items() if v}
    if handled:
        rows.append(("Acted on (status.handled)", ", ".join(f"{k}={v}" for k, v in sorted(handled.items()))))
    return rows


def decision_rows(r: Report) -> list[list[str]]:
    head = ["time (UTC)", "event", "reason", "triggered by", "phase", "weight", "message"]
    rows = [head]
    for d in r.decisions:
        rows.append([_ts(d.time), d.event, d.reason, d.trigger, d.phase, _fmt(d.weight), d.message])
    return rows


def result_rows(r: Report) -> list[list[str]]:
    """The last numbers: per variant (experiments) or per metric (rollouts)."""
    st = r.status
    if r.kind == EXPERIMENT:
        head = ["variant", "weight %", "n", "estimate", "difference CI", "p", "Holm-adjusted p", "P(best)"]
        rows = [[*head, "verdict"]]
        for v in st.get("variants") or []:
            bounded = v.get("ciLow") is not None or v.get("ciHigh") is not None
            ci = f"[{_fmt(v.get('ciLow'))}, {_fmt(v.get('ciHigh'))}]" if bounded else "—"
            numbers = [v.get(k) for k in ("pValue", "adjustedPValue", "probabilityToBeBest")]
            rows.append(
                [str(v.get("name")), _fmt(v.get("weight")), _fmt(v.get("n"), 6), _fmt(v.get("estimate")), ci]
                + [_fmt(x) for x in numbers]
                + [_fmt(v.get("verdict"))]
            )
        return rows
    rows = [["metric", "kind", "value / difference", "interval", "threshold", "verdict"]]
    for m in st.get("lastAnalysis") or []:
        c = comparison.numbers(m.get("details"))
        bounded = c["ciLow"] is not None or c["ciHigh"] is not None
        ci = f"[{_fmt(c['ciLow'])}, {_fmt(c['ciHigh'])}]" if bounded else "—"
        rows.append([str(m.get("name")), str(m.get("kind")), _fmt(m.get("value")), ci,
                     _fmt(m.get("threshold")), str(m.get("verdict"))])  # fmt: skip
    return rows


def comparison_rows(r: Report) -> list[list[str]]:
    """Each comparison of the last analysis, the same columns for both kinds (candidate vs baseline)."""
    rows = [["metric", "arm", "candidate", "baseline", "n candidate", "n baseline", "difference", "interval",
             "p", "verdict"]]  # fmt: skip
    for m in r.status.get("lastAnalysis") or []:
        if m.get("kind") != "comparison":
            continue
        c = comparison.numbers(m.get("details"))
        bounded = c["ciLow"] is not None or c["ciHigh"] is not None
        ci = f"[{_fmt(c['ciLow'])}, {_fmt(c['ciHigh'])}]" if bounded else "—"
        numbers = [_fmt(c[k]) for k in ("candidate", "baseline")] + [
            _fmt(c[k], 6) for k in ("candidateN", "baselineN")
        ]
        rows.append([str(m.get("name")), str(m.get("variant") or ""), *numbers, _fmt(c["difference"]), ci,
                     _fmt(c["adjustedPValue"] if c["adjustedPValue"] is not None else c["pValue"]),
                     str(m.get("verdict"))])  # fmt: skip
    return rows


def holdout_rows(r: Report) -> list[list[str]]:
    """Each holdout comparison: its gain, the latest effect and band, and the estimate at promotion."""
    rows = [["metric", "gain", "effect now", "confidence sequence", "at promotion", "samples", "points"]]
    for h in (r.status.get("postPromotion") or {}).get("holdout") or []:
        traj = h.get("trajectory") or []
        last, then = (traj[-1] if traj else {}), h.get("atPromotion") or {}
        ci = f"[{_fmt(last.get('lower'))}, {_fmt(last.get('upper'))}]" if traj else "—"
        rows.append([str(h.get("name")), str(h.get("gain")), _fmt(last.get("effect")), ci,
                     _fmt(then.get("effect")), _fmt(last.get("samples"), 6), str(len(traj))])  # fmt: skip
    return rows


def segment_rows(r: Report) -> list[list[str]]:
    """Each segment of each segmented comparison of the last analysis (only the header without any)."""
    rows = [["metric", "segment", "status", "n candidate", "n baseline", "difference", "interval", "Holm p"]]
    for m in r.status.get("lastAnalysis") or []:
        for s in m.get("segments") or []:
            bounded = s.get("ciLow") is not None or s.get("ciHigh") is not None
            ci = f"[{_fmt(s.get('ciLow'))}, {_fmt(s.get('ciHigh'))}]" if bounded else "—"
            n = [_fmt(s.get("candidateN"), 6), _fmt(s.get("stableN"), 6)]
            rows.append([str(m.get("name")), str(s.get("segment")), str(s.get("status")), *n,
                         _fmt(s.get("difference")), ci, _fmt(s.get("pValue"))])  # fmt: skip
    return rows


# -- html ----------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1150px;
color:#222}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0} th,td{border:1px solid #ccc;padding:3px 7px;
text-align:left;vertical-align:top} th{background:#f3f3f3} figure{margin:1em 0} img{max-width:100%}
figcaption{font-size:.9em;color:#444} .bad{color:#b00020} .good{color:#00703c}
"""


def _html_table(rows: list[list[str]], cls: str) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows[1:])
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def to_html(r: Report, panels: list[Panel]) -> str:
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    phase_cls = {"RolledBack": "bad", "Aborted": "bad", "Promoted": "good", "Concluded": "good"}.get(
        r.phase, ""
    )
    facts = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary_rows(r)
    )
    figs = []
    for i, p in enumerate(panels, 1):
        data = base64.b64encode(png_bytes(render_panel(p))).decode("ascii")
        figs.append(
            f'<figure id="{html.escape(p.key)}"><img alt="{html.escape(p.title)}" '
            f'src="data:image/png;base64,{data}"><figcaption>Figure {i}. <b>{html.escape(p.title)}</b>. '
            f"{html.escape(p.caption)}</figcaption></figure>"
        )
    seg = segment_rows(r)
    segments = "<h2>Segments</h2>" + _html_table(seg, "segments") if len(seg) > 1 else ""
    hold = holdout_rows(r)
    segments += "<h2>Holdout after promotion</h2>" + _html_table(hold, "holdout") if len(hold) > 1 else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>Decision report: {html.escape(r.title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>Decision report: {html.escape(r.title)} "
        f'<span class="{phase_cls}">({html.escape(r.phase)})</span></h1>'
        f"<p>Generated {generated} by <code>kubectl mlrollouts report</code> from the object's status.</p>"
        f'<table class="summary">{facts}</table>'
        "<h2>Decisions</h2>" + _html_table(decision_rows(r), "decisions") +
        "<h2>Last analysis</h2>" + _html_table(result_rows(r), "results") +
        "<h2>Comparisons</h2>" + _html_table(comparison_rows(r), "comparisons") + segments +
        "<h2>Over time</h2>" + "".join(figs) + "</body></html>\n"
    )  # fmt: skip


# -- markdown ------------------------------------------------------------------------------------------


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _md_table(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(_md_cell(c) for c in rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows[1:]]
    return "\n".join(out)


def to_markdown(r: Report, panels: list[Panel], images: list[str]) -> str:
    lines = [f"# Decision report: {r.title} ({r.phase})", ""]
    lines += [f"- **{k}**: {_md_cell(v)}" for k, v in summary_rows(r)]
    lines += ["", "## Decisions", "", _md_table(decision_rows(r)), "", "## Last analysis", ""]
    lines += [_md_table(result_rows(r)), "", "## Comparisons", "", _md_table(comparison_rows(r))]
    if len(seg := segment_rows(r)) > 1:
        lines += ["", "## Segments", "", _md_table(seg)]
    if len(hold := holdout_rows(r)) > 1:
        lines += ["", "## Holdout after promotion", "", _md_table(hold)]
    lines += ["", "## Over time", ""]
    for i, (p, img) in enumerate(zip(panels, images, strict=True), 1):
        lines += [f"![{p.title}]({img})", "", f"*Figure {i}. {p.title}.* {p.caption}", ""]
    return "\n".join(lines)


# -- entry ---------------------------------------------------------------------------------------------


def write(obj: dict[str, Any], fmt: str, out: Path | None = None) -> Written:
    """Render the report of ``obj`` as ``fmt`` (html, png, md) to ``out`` (default: NAME-report.EXT)."""
    if fmt not in FORMATS:
        raise ValueError(f"-o: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    r = load(obj)
    panels = panels_of(r)
    path = out if out is not None else Path(f"{r.name}-report.{fmt}")
    if path.is_dir() or not path.suffix:  # a directory (existing, or a name without an extension)
        path = path / f"{r.name}-report.{fmt}"
    path.parent.mkdir(parents=True, exist_ok=True)
    titles = [p.title for p in panels]
    if fmt == "png":
        path.write_bytes(png_bytes(render_all(panels, f"Decision report: {r.title} ({r.phase})")))
        return Written(path, [path], titles)
    if fmt == "html":
        path.write_text(to_html(r, panels), encoding="utf-8")
        return Written(path, [], titles)
    images = []
    for i, p in enumerate(panels, 1):
        img = path.with_name(f"{path.stem}-{i:02d}-{p.key}.png")
        img.write_bytes(png_bytes(render_panel(p)))
        images.append(img)
    path.write_text(to_markdown(r, panels, [i.name for i in images]), encoding="utf-8")
    return Written(path, images, titles)
