"""Slack-compatible incoming-webhook JSON: ``text`` (the fallback) and Block Kit ``blocks``.

Text from objects (names, reasons, messages that quote an annotation) can never format, mention or
link: every block carries it as ``plain_text`` (which Slack never parses; ``& < >`` still as
entities, as Slack asks), and the ``text`` fallback,
which Slack reads as mrkdwn, has ``& < >`` as entities (so no ``<!channel>``, ``<@U…>`` or
``<url|label>``), ``* _ ~ `` ` as look-alike characters (no bold, italics, strike or code), ``@``
words broken by a zero-width space, and one line. Every text is cut to Slack's limits.
"""

from __future__ import annotations

from typing import Any

from model_rollouts.notify import Notice

#: Slack's limits: a header's plain text, a section's text, a field's text.
HEADER_MAX, TEXT_MAX, FIELD_MAX = 150, 3000, 2000
ICON = {"info": ":white_check_mark:", "warning": ":warning:"}
#: mrkdwn formatting characters and the look-alikes shown instead in the fallback text.
LOOKALIKES = {"*": "\u2217", "_": "\uff3f", "~": "\u223c", "`": "\u02cb"}


def entities(text: str) -> str:
    """``& < >`` as the entities Slack decodes for display (Slack's own escaping rule)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def escape(text: str) -> str:
    """An object's text for Slack mrkdwn: shown as written, never formatting, a mention or a link."""
    out = entities(text)
    out = "".join(LOOKALIKES.get(c, c) for c in out)
    out = out.replace("@", "@\u200b")  # @channel, @here, @everyone: not a mention word
    return " ".join(out.split())  # one line: no block quote (>) or list at a line start


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _plain(text: str, limit: int = TEXT_MAX) -> dict[str, Any]:
    return {"type": "plain_text", "text": _cut(entities(text), limit) or " "}


def payload(notice: Notice) -> dict[str, Any]:
    fields = [_plain(f"Phase: {notice.phase}", FIELD_MAX), _plain(f"Reason: {notice.reason}", FIELD_MAX)]
    if notice.weights:
        split = ", ".join(f"{k} {v}%" for k, v in notice.weights.items())
        fields.append(_plain(f"Weights: {split}", FIELD_MAX))
    context = f"{notice.kind} · {notice.time}" + (f" · revision {notice.revision}" if notice.revision else "")
    return {
        "text": _cut(f"{ICON[notice.severity]} {escape(notice.title)}: {escape(notice.message)}", TEXT_MAX),
        "blocks": [
            {"type": "header", "text": _plain(notice.title, HEADER_MAX)},
            {"type": "section", "text": _plain(notice.message or notice.event), "fields": fields},
            {"type": "context", "elements": [_plain(context)]},
        ],
    }
