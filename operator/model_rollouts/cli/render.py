"""rich renderables for the views of :mod:`.view` (pure: a view in, a renderable out)."""

from __future__ import annotations

import io
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

_PHASE_STYLE = {
    "Promoted": "bold green", "Concluded": "bold green", "Idle": "green",
    "RolledBack": "bold red", "Aborted": "bold red", "Invalid": "bold red",
    "Paused": "bold yellow", "Progressing": "bold cyan", "Running": "bold cyan", "Pending": "cyan",
}  # fmt: skip
_VERDICT_STYLE = {"pass": "green", "better": "green", "fail": "red", "worse": "red",
                  "inconclusive": "yellow", "noData": "magenta", "error": "red"}  # fmt: skip


def num(x: float | None, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}g}"


def signed(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:+.{digits}g}"


def interval(lo: float | None, hi: float | None) -> str:
    return f"[{signed(lo)}, {signed(hi)}]" if lo is not None or hi is not None else "—"


def count(x: float | None) -> str:
    return "—" if x is None else f"{x:,.0f}"


def phase_text(phase: str) -> Text:
    return Text(phase, style=_PHASE_STYLE.get(phase, ""))


def verdict_text(verdict: str | None) -> Text:
    return Text(verdict or "—", style=_VERDICT_STYLE.get(verdict or "", ""))


#: One glyph per arm, so the split reads without colour too (a log, NO_COLOR).
_GLYPHS = "█░▓▒"


def bar(weights: dict[str, int], width: int = 40) -> Text:
    """A horizontal split bar: one colour per arm, each share's label after it."""
    colours = ["blue", "green", "magenta", "yellow", "cyan", "red"]
    t = Text()
    total = sum(weights.values()) or 1
    for i, (_k, w) in enumerate(weights.items()):
        t.append(_GLYPHS[i % len(_GLYPHS)] * round(width * w / total), style=colours[i % len(colours)])
    t.append("  ")
    t.append("  ".join(f"{k} {w}%" for k, w in weights.items()))
    return t


def _table(title: str) -> Table:
    return Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, title_justify="left", title_style="bold")


def _header(v: dict[str, Any], subtitle: str) -> Table:
    g = Table.grid(padding=(0, 1))
    g.add_column(style="bold")
    g.add_column()
    g.add_row("Name:", f"{v['namespace']}/{v['name']}  ({v['kind']})")
    ph = phase_text(v["phase"])
    if v.get("finished"):
        ph.append("  (finished)", style="dim")
    g.add_row("Phase:", ph)
    g.add_row("Message:", v.get("message") or "")
    if subtitle:
        g.add_row("", subtitle)
    return g


def _guardrails(v: dict[str, Any]) -> Table | None:
    if not v["guardrails"]:
        return None
    t = _table("Guardrails (last analysis)")
    for c in ("guardrail", "variant", "value", "threshold", "verdict", "breaches"):
        t.add_column(c, justify="right" if c in ("value", "breaches") else "left")
    for g in v["guardrails"]:
        t.add_row(
            g["name"], g.get("variant") or "", num(g["value"]), g.get("threshold") or "",
            verdict_text(g["verdict"]), f"{g['failures']}/{g['failureLimit']}",
        )  # fmt: skip
    return t


def _conditions(v: dict[str, Any]) -> Table | None:
    if not v["conditions"]:
        return None
    t = _table("Conditions")
    for c in ("type", "status", "reason"):
        t.add_column(c, no_wrap=True)
    t.add_column("message", overflow="ellipsis", no_wrap=True, max_width=100)
    for c in v["conditions"]:
        style = "green" if c["status"] == "True" else "yellow" if c["status"] == "Unknown" else ""
        t.add_row(
            c["type"],
            Text(str(c["status"]), style=style),
            c.get("reason") or "",
            (c.get("message") or "")[:110],
        )
    return t


def _waiting(v: dict[str, Any]) -> Panel:
    body = Text()
    for i, w in enumerate(v["waitingFor"] or ["—"]):
        if i:
            body.append("\n")
        body.append("• " + w)
    return Panel(body, title="Waiting for", title_align="left", box=box.ROUNDED)


def rollout(v: dict[str, Any], compact: bool = False) -> RenderableType:
    """The whole view; ``compact``: one line for the steps and no conditions (e.g. a log)."""
    ver = f" ({v['candidateVersion']})" if v.get("candidateVersion") else ""
    sub = f"stable {v.get('stable')}  →  candidate {v.get('candidate')}{ver}"
    sub += f"   revision {v.get('revision') or '—'}"
    parts: list[RenderableType] = [_header(v, sub)]
    w = v["weights"]
    stable, candidate = v.get("stable") or "stable", v.get("candidate") or "candidate"
    if stable == candidate:
        stable, candidate = "stable", "candidate"
    split = {stable: w["stable"], candidate: w["candidate"]}
    parts.append(Text.assemble(("Weights: ", "bold"), bar(split)))
    if v.get("shadowPercent"):
        mirrored = f"{v['shadowPercent']}% of requests mirrored to {candidate} (users see only {stable})"
        parts.append(Text.assemble(("Shadow:  ", "bold"), mirrored))
    if compact:
        now = next((s for s in v["steps"] if s["state"] == "current"), None)
        where = f"#{now['index']} {now['step']}  (steps #0..#{len(v['steps']) - 1})" if now else "—"
        parts.append(Text.assemble(("Step:    ", "bold"), where))
    steps = _table("Steps")
    steps.add_column(" ")
    steps.add_column("#", justify="right")
    steps.add_column("step")
    steps.add_column("state")
    marks = {"done": ("✔", "green"), "current": ("►", "bold cyan"), "pending": (" ", "dim")}
    for s in v["steps"]:
        mark, style = marks[s["state"]]
        current = style if s["state"] == "current" else ""
        steps.add_row(
            Text(mark, style=style),
            str(s["index"]),
            Text(s["step"], style=current),
            Text(s["state"], style=style),
        )
    if not compact:
        parts.append(steps)
    parts.append(_waiting(v))
    if v["comparisons"]:
        t = _table("Comparisons: candidate vs stable")
        for c, j in (("comparison", "left"), ("test", "left"), ("candidate", "right"), ("stable", "right"),
                     ("n cand/stable", "right"), ("difference", "right"), ("CI", "right"), ("p", "right"),
                     ("verdict", "left")):  # fmt: skip
            t.add_column(c, justify=j)  # type: ignore[arg-type]
        for c in v["comparisons"]:
            verdict = verdict_text(c["verdict"])
            if c.get("passed") and c["verdict"] != "pass":
                verdict.append(" (passed earlier)", style="green")
            if c.get("carried"):
                verdict.append(" (carried)", style="dim")
            test = f"{c.get('test')} m={c.get('margin', 0):g}" + (" advisory" if c.get("advisory") else "")
            ci = interval(c.get("ciLow"), c.get("ciHigh"))
            t.add_row(c["name"], test, *_arms(c), ci, num(c.get("pValue"), 3), verdict)
        parts.append(t)
        parts += [_segments(c) for c in v["comparisons"] if c.get("segments")]
    for extra in (_guardrails(v), None if compact else _conditions(v)):
        if extra is not None:
            parts.append(extra)
    return Group(*parts)


def _segments(c: dict[str, Any]) -> RenderableType:
    """A segmented comparison's table: each segment's samples, difference, interval, Holm p, status."""
    label = str(c.get("segmentLabel", "segment"))
    t = _table(f"{c['name']} by {label}")
    for col, j in ((label, "left"), ("n cand/stable", "right"), ("difference", "right"), ("CI", "right"),
                   ("Holm p", "right"), ("status", "left")):  # fmt: skip
        t.add_column(col, justify=j)  # type: ignore[arg-type]
    for r in c["segments"]:
        n = f"{count(r.get('candidateN'))}/{count(r.get('stableN'))}"
        status = r.get("status", "?")
        style = {"pass": "green", "fail": "red", "tooSmall": "yellow"}.get(status, "")
        ci = interval(r.get("ciLow"), r.get("ciHigh"))
        t.add_row(str(r.get("segment")), n, signed(r.get("difference")), ci, num(r.get("pValue"), 3),
                  Text(status, style=style))  # fmt: skip
    return t


def _arms(c: dict[str, Any]) -> tuple[str, str, str, str]:
    """A comparison's candidate and baseline estimates, their samples and the difference (either kind)."""
    n = f"{count(c.get('candidateN'))}/{count(c.get('baselineN'))}"
    return num(c.get("candidate")), num(c.get("baseline")), n, signed(c.get("difference"))


def experiment(v: dict[str, Any], compact: bool = False) -> RenderableType:
    sub = (
        f"primary metric {v.get('primaryMetric')}, {v.get('method')} test, {v.get('strategy')} allocation, "
        f"SRM p {num(v.get('srmPValue'), 3)}" + (f", winner {v['winner']}" if v.get("winner") else "")
    )
    parts: list[RenderableType] = [_header(v, sub)]
    if v["weights"]:
        parts.append(Text.assemble(("Weights: ", "bold"), bar(v["weights"])))
    t = _table("Variants")
    for c in ("variant", "weight", "n", "estimate", "CI", "p", "Holm p", "P(best)", "verdict"):
        t.add_column(c, justify="left" if c in ("variant", "verdict") else "right")
    for x in v["variants"]:
        name = Text(
            x["name"] + (" (control)" if x["control"] else ""), style="" if x["active"] else "dim strike"
        )
        t.add_row(
            name, f"{x['weight']}%", count(x["n"]), num(x["estimate"]), interval(x["ciLow"], x["ciHigh"]),
            num(x["pValue"], 3), num(x["adjustedPValue"], 3), num(x["probabilityToBeBest"], 3),
            verdict_text(x["verdict"]),
        )  # fmt: skip
    parts.append(t)
    parts.append(_waiting(v))
    if v["comparisons"]:
        ct = _table("Comparisons: variant vs control")
        for col in (
            "variant",
            "variant est",
            "control est",
            "n var/ctrl",
            "difference",
            "CI",
            "Holm p",
            "verdict",
        ):
            ct.add_column(col, justify="left" if col in ("variant", "verdict") else "right")
        for m in v["comparisons"]:
            ct.add_row(
                m.get("arm") or "", *_arms(m), interval(m.get("ciLow"), m.get("ciHigh")),
                num(m.get("adjustedPValue"), 3), verdict_text(m["verdict"]),
            )  # fmt: skip
        parts.append(ct)
    for extra in (_guardrails(v), None if compact else _conditions(v)):
        if extra is not None:
            parts.append(extra)
    return Group(*parts)


def view(v: dict[str, Any], compact: bool = False) -> RenderableType:
    return rollout(v, compact) if v["kind"] == "ModelRollout" else experiment(v, compact)


def listing(rows: list[dict[str, Any]], all_namespaces: bool) -> RenderableType:
    t = Table(box=box.SIMPLE_HEAD)
    cols = (["namespace"] if all_namespaces else []) + [
        "kind",
        "name",
        "phase",
        "step",
        "weights",
        "age",
        "message",
    ]
    for c in cols:
        t.add_column(c.upper(), overflow="fold" if c == "message" else "ellipsis", no_wrap=c != "message")
    for r in rows:
        kind = "mro" if r["kind"] == "ModelRollout" else "mexp"
        weights = " ".join(f"{k}:{w}" for k, w in r["weights"].items())
        cells: list[Any] = [r["namespace"]] if all_namespaces else []
        cells += [
            kind,
            r["name"],
            phase_text(r["phase"]),
            r["step"],
            weights,
            r["age"],
            (r["message"] or "")[:100],
        ]
        t.add_row(*cells)
    if not rows:
        return Text("No ModelRollouts or ModelExperiments found.")
    return t


def to_text(renderable: RenderableType, width: int = 160) -> str:
    """The renderable as plain text (no colour), e.g. for the demo's log or a test."""
    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)
    console.print(renderable)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    return str(out)
