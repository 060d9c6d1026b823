"""Teams-compatible incoming-webhook JSON: a legacy actionable MessageCard with facts."""

from __future__ import annotations

from typing import Any

from model_rollouts.notify import Notice

#: Theme colours: promoted/started (green), a warning (red), anything else (blue).
COLOURS = {"good": "2EB886", "warning": "D63333", "info": "0076D7"}
GOOD_EVENTS = ("Promoted", "Started")


def _md(text: str) -> str:
    """Teams renders a subset of Markdown: keep an object's text literal."""
    return "".join("\\" + c if c in "\\`*_[]<>#" else c for c in text)


def payload(notice: Notice) -> dict[str, Any]:
    if notice.severity == "warning":
        colour = COLOURS["warning"]
    else:
        colour = COLOURS["good" if notice.event in GOOD_EVENTS else "info"]
    facts = [
        {"name": "Phase", "value": notice.phase},
        {"name": "Reason", "value": notice.reason},
        {"name": "Time", "value": notice.time},
    ]
    if notice.weights:
        facts.append({"name": "Weights", "value": ", ".join(f"{k} {v}%" for k, v in notice.weights.items())})
    if notice.revision:
        facts.append({"name": "Revision", "value": notice.revision})
    return {
        "@type": "MessageCard",
        "@context": "https://schema.org/extensions",
        "summary": notice.title[:256],
        "themeColor": colour,
        "title": _md(notice.title),
        "sections": [
            {
                "activityTitle": _md(f"{notice.kind} {notice.namespace}/{notice.name}"),
                "activitySubtitle": notice.event,
                "text": _md(notice.message)[:4000],
                "facts": [{"name": f["name"], "value": _md(f["value"])} for f in facts],
            }
        ],
    }
