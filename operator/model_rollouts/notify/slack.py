"""Slack-compatible incoming-webhook JSON: ``text`` (the fallback) and Block Kit ``blocks``."""

from __future__ import annotations

from typing import Any

from model_rollouts.notify import Notice

#: Slack's limits: a header's plain text, a section's text.
HEADER_MAX, TEXT_MAX = 150, 3000
ICON = {"info": ":white_check_mark:", "warning": ":warning:"}


def escape(text: str) -> str:
    """Slack mrkdwn control characters: no <!channel>, link or mention can come through an object's text."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def payload(notice: Notice) -> dict[str, Any]:
    fields = [
        {"type": "mrkdwn", "text": f"*Phase*\n{escape(notice.phase)}"},
        {"type": "mrkdwn", "text": f"*Reason*\n{escape(notice.reason)}"},
    ]
    if notice.weights:
        split = ", ".join(f"{escape(k)} {v}%" for k, v in notice.weights.items())
        fields.append({"type": "mrkdwn", "text": f"*Weights*\n{_cut(split, 1900)}"})
    context = f"{escape(notice.kind)} · {notice.time}" + (
        f" · revision {escape(notice.revision)}" if notice.revision else ""
    )
    return {
        "text": _cut(f"{ICON[notice.severity]} {escape(notice.title)}: {escape(notice.message)}", TEXT_MAX),
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": _cut(notice.title, HEADER_MAX)}},
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": _cut(escape(notice.message) or notice.event, TEXT_MAX)},
                "fields": fields,
            },
            {"type": "context", "elements": [{"type": "mrkdwn", "text": _cut(context, TEXT_MAX)}]},
        ],
    }
