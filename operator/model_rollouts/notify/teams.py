"""Teams-compatible incoming-webhook JSON: a legacy actionable MessageCard with facts."""

from __future__ import annotations

from typing import Any

from model_rollouts.notify import Notice

#: Theme colours: promoted/started (green), a warning (red), anything else (blue).
COLOURS = {"good": "2EB886", "warning": "D63333", "info": "0076D7"}
GOOD_EVENTS = ("Promoted", "Started")


#: Markdown characters Teams would act on; each is shown literally after a backslash.
MARKDOWN = "\\`*_[]#~|!"
#: Longest text of a card's section (Teams drops larger cards) and of a fact's value.
TEXT_MAX, FACT_MAX = 4000, 1000


def _md(text: str) -> str:
    """An object's text for a card: Teams renders a subset of Markdown and HTML, so ``& < >`` become
    entities (no tag, no <at> mention), Markdown characters are escaped with a backslash (no emphasis,
    link, image or heading), and it is one line (no list, quote or heading at a line start)."""
    out = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    out = "".join("\\" + c if c in MARKDOWN else c for c in out)
    return " ".join(out.split())


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
        "summary": _cut(" ".join(notice.title.split()), 256),
        "themeColor": colour,
        "title": _cut(_md(notice.title), 512),
        "sections": [
            {
                "activityTitle": _md(f"{notice.kind} {notice.namespace}/{notice.name}"),
                "activitySubtitle": notice.event,
                "text": _cut(_md(notice.message), TEXT_MAX),
                "facts": [{"name": f["name"], "value": _cut(_md(f["value"]), FACT_MAX)} for f in facts],
            }
        ],
    }
