"""The payload format of each ClusterNotificationProvider type (one module each, behind Format)."""

from __future__ import annotations

from model_rollouts.notify import Format, slack, teams, webhook


def formats() -> dict[str, Format]:
    """The payload format of each ClusterNotificationProvider type."""
    return {"webhook": webhook.payload, "slack": slack.payload, "teams": teams.payload}
